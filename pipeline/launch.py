"""Starting N training workers with Ray Train: in-process Ray by default, or a cluster given by address.

`run` takes a spec that pipeline/run.py has resolved (checked, saved with the run) and maps it onto Ray Train:
one worker per rank with its CPUs and GPUs, gloo or NCCL, and FailureConfig restarts of the worker group when a
worker dies; restarted workers resume from the newest committed checkpoint on their own. An error that such a
restart would meet again (a `pipeline.errors.FinalError`: the loss diverged, too many samples skipped) ends the run
at once instead, and `run` raises it with its whole message. With `cluster.elastic`, Ray Train's elastic scaling
restarts the group on as many workers as the cluster holds (`cluster.min_workers` to `cluster.workers`) after a
host is lost; when hosts come back, the workers stop right after a commit (they look for room at most every
`cluster.resize_check_s`) and `run` starts the group again, larger. The workers resume through the universal
checkpoint when the world size changed.

Each `run` is one launch with its own id (`MIXER_LAUNCH_ID` in its workers): the run's lease is held in that id's
name, so workers Ray Train restarts re-take it, another launch is refused, and `run` drops it once the workers are
gone, however they ended.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import tempfile
import uuid
from typing import Any

from pipeline import config as config_lib
from pipeline import lease
from pipeline.config import Spec
from pipeline.errors import FinalError

log = logging.getLogger(__name__)

# Environment the workers need whatever the cluster's defaults: DeepSpeed's CPU accelerator when there is no GPU;
# the driver's object store; its storage retry budget and shard verification when set there (the trainer sets both
# from the spec as well: pipeline.storage.RETRY_ENV, pipeline.data.VERIFY_ENV).
WORKER_ENV = ("DS_ACCELERATOR", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION",
              "MIXER_IO_RETRY_S", "MIXER_DATA_VERIFY")
FINAL_ERROR, GROW_TO = "final_error", "grow_to"


def _worker(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """One rank's run. Two ends that are not failures (Ray Train would retry them) come back to the driver as rank
    0's return value: a FinalError, raised by every rank together, and an elastic run's stop to grow."""
    for key, value in cfg["env"].items():
        os.environ.setdefault(key, value)
    # Not setdefault: a worker process is this launch's whatever its environment says.
    os.environ[lease.LAUNCH_ENV] = cfg["launch_id"]
    from pipeline.train import train

    try:
        result = train(config_lib.from_dict(cfg["spec"]), resume_from=cfg["resume_from"])
    except FinalError as e:
        log.error("%s: %s", type(e).__name__, e)
        return {FINAL_ERROR: f"{type(e).__module__}.{type(e).__qualname__}", "message": str(e)}
    return {GROW_TO: result["grow_to"]} if result["grow_to"] else None


def _raise_final(returned: Any) -> None:
    """Raise on the driver the FinalError the workers ended with, if any, as its own class."""
    if not isinstance(returned, dict) or FINAL_ERROR not in returned:
        return
    module, _, name = returned[FINAL_ERROR].rpartition(".")
    try:
        kind = getattr(importlib.import_module(module), name, None)
    except ImportError:  # the workers' message matters more than its class
        kind = None
    if not (isinstance(kind, type) and issubclass(kind, FinalError)):
        kind = FinalError
    raise kind(returned["message"])


def run(spec: Spec, *, ray_address: str | None = None, resume_from: str | None = None,
        storage_path: str | None = None) -> Any:
    """Train a resolved spec on `spec.cluster.workers` Ray Train workers; returns Ray Train's result. An elastic
    run that stopped to grow is started again at once, on the workers the cluster now holds."""
    from pipeline.ray_cluster import init_ray, refresh_node_view

    init_ray(ray_address)
    launch = f"mixer-train-{uuid.uuid4().hex[:16]}"
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    if spec.cluster.gpus_per_worker == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")
    config = {"spec": spec.to_dict(), "resume_from": resume_from, "env": env, "launch_id": launch}
    try:
        while True:
            if spec.cluster.elastic:
                refresh_node_view()
            result = _trainer(spec, config, storage_path).fit()
            _raise_final(result.return_value)
            if not (result.return_value or {}).get(GROW_TO):  # else rank 0 has said why the workers stopped
                return result
    finally:
        _release(spec.run.url, launch)


def _trainer(spec: Spec, config: dict[str, Any], storage_path: str | None) -> Any:
    """The spec mapped onto Ray Train. An elastic group is resized only by the failures that shrink it and by the
    workers' own stops to grow, made right after a commit: Ray Train's own resize would restart a healthy group at
    any moment, redoing the steps since the newest checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig

    from pipeline.ray_cluster import worker_resources

    c = spec.cluster
    return _trainer_class()(
        _worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=(c.min_workers, c.workers) if c.elastic else c.workers, use_gpu=c.gpus_per_worker > 0,
            resources_per_worker=worker_resources(c), elastic_resize_monitor_interval_s=math.inf),
        torch_config=TorchConfig(backend="nccl" if c.gpus_per_worker else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"mixer-{spec.hash()}",
            storage_path=storage_path or os.path.join(tempfile.gettempdir(), "mixer-ray-train"),
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
        ),
    )


def _trainer_class() -> type:
    """Ray Train's TorchTrainer without its Ray Data hook. The trainer reads its shards itself and passes Ray Train
    no datasets, yet the hook starts a DatasetManager actor for every worker group anyway: one more process, which
    imports Ray Data, on the path of every start and restart (about 4 s on a small machine). Relies on
    `DataParallelTrainer._create_default_callbacks` and `DatasetsCallback` (Ray 2.60)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, DatasetsCallback)]

    return Trainer


def _release(run_url: str, launch: str) -> None:
    """Drop the run's lease if the workers left it held (they failed for good): the next launch need not wait
    for it to expire. Never masks how the workers ended."""
    try:
        if lease.release_if_held(run_url, launch):
            log.info("%s: released the lease of launch %s, whose workers have ended", run_url, launch)
    except Exception as e:
        log.warning("%s: could not release the lease of launch %s (%s: %s); it expires on its own", run_url,
                    launch, type(e).__name__, e)
