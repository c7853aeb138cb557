"""Starting N training workers with Ray Train: in-process Ray by default, or a cluster given by address.

Everything that can be checked from the driver is checked before any worker starts: the spec, the dataset, the run
folder. Ray Train's FailureConfig restarts the worker group when a worker dies; the restarted workers resume from the
newest committed checkpoint on their own (pipeline.train resumes automatically).
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

from pipeline import config as config_lib
from pipeline import data, storage
from pipeline.config import Spec, SpecError
from pipeline.dataset_json import DatasetError

# Environment the workers need whatever the cluster's defaults: DeepSpeed's CPU accelerator when there is no GPU.
WORKER_ENV = ("DS_ACCELERATOR", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION")


def preflight(spec: Spec, *, resume: bool = True, resume_from: str | None = None) -> None:
    """Fail fast, in the driver, with a message that says what to change."""
    try:
        info = data.check_dataset(spec.data.dataset)
    except DatasetError as e:
        raise SpecError(f"data.dataset: {e}") from e
    if spec.model.num_classes is not None and spec.model.num_classes != info.num_classes:
        raise SpecError(f"model.num_classes={spec.model.num_classes} but {spec.data.dataset} has {info.num_classes} "
                        "classes; drop model.num_classes to take the dataset's")
    if info.multi_label and spec.loss != "sigmoid":
        raise SpecError(f"loss: {spec.data.dataset} is multi-label; multi-label datasets need `loss: sigmoid`")
    for split in filter(None, (spec.data.train_split, spec.data.eval_split)):
        if split not in info.splits:
            raise SpecError(f"data: split {split!r} is not in {spec.data.dataset} (it has {', '.join(info.splits)})")
    shards = len(info.splits[spec.data.train_split].shards)
    if shards < spec.data.streams:
        raise SpecError(
            f"data.streams={spec.data.streams} but {spec.data.dataset} has only {shards} train shards; lower "
            f"data.streams to at most {shards} (a multiple of the workers), or prepare with a smaller --shard-size")
    committed = _committed_steps(spec.run.url)
    if committed and not resume and not resume_from:
        raise SpecError(
            f"run.url: {spec.run.url} already holds checkpoints (newest step {committed[-1]}) and --no-resume was "
            "given; choose a new run.url, or drop --no-resume to continue that run")
    if committed and resume and not resume_from:
        saved = storage.join(spec.run.url, "config.yaml")
        if storage.exists(saved):
            previous = config_lib.from_dict(_yaml(storage.read_bytes(saved)))
            if previous.hash() != spec.hash():
                raise SpecError(
                    f"run.url: {spec.run.url} was started with a different spec (see {saved}); resuming it with "
                    "this one would not continue the same run. Use a new run.url, or --resume-from a checkpoint "
                    "to start a new run from its weights")


def _yaml(raw: bytes) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(raw)


def _committed_steps(run_url: str) -> list[int]:
    from pipeline.checkpoint import CheckpointStore

    return [c.step for c in CheckpointStore(storage.join(run_url, "checkpoints")).list()]


def _worker(cfg: dict[str, Any]) -> None:
    for key, value in cfg["env"].items():
        os.environ.setdefault(key, value)
    from pipeline.train import train

    spec = config_lib.from_dict(cfg["spec"])
    train(spec, resume_from=cfg["resume_from"])


def run(spec: Spec, *, ray_address: str | None = None, resume: bool = True, resume_from: str | None = None,
        storage_path: str | None = None) -> Any:
    """Check the spec, save it with the run, and train on `spec.cluster.workers` Ray Train workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.ray_cluster import connect

    spec = copy.deepcopy(spec)
    config_lib.absolute_local_paths(spec, os.getcwd())
    preflight(spec, resume=resume, resume_from=resume_from)
    storage.write_bytes_atomic(storage.join(spec.run.url, "config.yaml"), spec.to_yaml().encode())
    connect(ray_address)
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


def resolve(spec_path: str, overrides: list[str], workers: int | None = None) -> Spec:
    """Load a spec with `--set` overrides; `--workers N` is shorthand for `--set cluster.workers=N`."""
    extra = list(overrides)
    if workers is not None:
        extra.append(f"cluster.workers={workers}")
    return config_lib.load(spec_path, extra)
