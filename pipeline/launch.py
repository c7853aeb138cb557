"""Starting N training workers with Ray Train: in-process Ray by default, or a cluster given by address.

`run` takes a spec that pipeline/run.py has resolved (checked, saved with the run) and maps it onto Ray Train:
one worker per rank with its CPUs and GPUs, gloo or NCCL, and FailureConfig restarts of the worker group when a
worker dies; restarted workers resume from the newest committed checkpoint on their own.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from pipeline import config as config_lib
from pipeline.config import Spec

# Environment the workers need whatever the cluster's defaults: DeepSpeed's CPU accelerator when there is no GPU.
WORKER_ENV = ("DS_ACCELERATOR", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def _worker(cfg: dict[str, Any]) -> None:
    for key, value in cfg["env"].items():
        os.environ.setdefault(key, value)
    from pipeline.train import train

    train(config_lib.from_dict(cfg["spec"]), resume_from=cfg["resume_from"])


def run(spec: Spec, *, ray_address: str | None = None, resume_from: str | None = None,
        storage_path: str | None = None) -> Any:
    """Train a resolved spec on `spec.cluster.workers` Ray Train workers; returns Ray Train's result."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.ray_cluster import init_ray

    init_ray(ray_address)
    c = spec.cluster
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if c.gpus_per_worker == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")
    resources = {"CPU": c.cpus_per_worker}
    if c.gpus_per_worker:
        resources["GPU"] = c.gpus_per_worker
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"spec": spec.to_dict(), "resume_from": resume_from, "env": env},
        scaling_config=ray.train.ScalingConfig(num_workers=c.workers, use_gpu=c.gpus_per_worker > 0,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if c.gpus_per_worker else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"mixer-{spec.hash()}",
            storage_path=storage_path or os.path.join(tempfile.gettempdir(), "mixer-ray-train"),
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
        ),
    )
    return trainer.fit()
