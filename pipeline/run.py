"""Resolving a spec for a run: the one path by which every way of starting training begins.

`mixer train`, `mixer submit` (on the cluster, through `mixer train`), torchrun and the deepspeed launcher
(`python -m pipeline.train`) all call `resolve`, once, before any engine exists:

1. `load_spec`: the YAML with `--set` overrides, `--workers N` as `cluster.workers=N`, validated;
2. `absolute_paths`: relative local paths made absolute, since workers run elsewhere;
3. `preflight`: what the dataset and the run folder decide (splits, classes, shards per stream, whether the
   run's checkpoints were written by this same spec, and whether another launch holds the run's lease);
4. `save_config`: `RUN/config.yaml`, the resolved spec.
Every problem is a `SpecError` that names the key or URL and what to change.
"""

from __future__ import annotations

import copy
import os

from pipeline import config as config_lib
from pipeline import data, lease, storage
from pipeline.checkpoint import CheckpointStore
from pipeline.config import Spec, SpecError
from pipeline.dataset_json import DatasetError
from pipeline.lease import LeaseError

CONFIG_NAME = "config.yaml"


def load_spec(path: str, overrides: list[str] | None = None, workers: int | None = None) -> Spec:
    """Read and validate a spec; `workers` is shorthand for `--set cluster.workers=N`."""
    extra = list(overrides or [])
    if workers is not None:
        extra.append(f"cluster.workers={workers}")
    return config_lib.load(path, extra)


def absolute_paths(spec: Spec, base: str | None = None) -> tuple[Spec, list[str]]:
    """A copy of the spec with its relative local paths made absolute against `base` (the working directory), and
    the keys changed."""
    spec = copy.deepcopy(spec)
    return spec, config_lib.absolute_local_paths(spec, base or os.getcwd())


def preflight(spec: Spec, *, resume: bool = True, resume_from: str | None = None, check_lease: bool = True) -> None:
    """Fail fast, before any worker or engine, with a message that says what to change. `check_lease`: refuse a
    run URL another launch holds (the process that will write the run's config checks it; the trainer's own
    conditional take of the lease is what settles a race)."""
    if check_lease:
        _check_lease(spec)
    try:
        info = data.check_dataset(spec.data.dataset)
        data.check_split(info, spec.data.train_split, spec.data.streams, spec.batch.global_)
        data.check_shards_present(info, [spec.data.train_split, spec.data.eval_split])
    except DatasetError as e:
        raise SpecError(f"data.dataset: {e}") from e
    if spec.model.num_classes is not None and spec.model.num_classes != info.num_classes:
        raise SpecError(f"model.num_classes={spec.model.num_classes} but {spec.data.dataset} has {info.num_classes} "
                        "classes; drop model.num_classes to take the dataset's")
    if info.multi_label and spec.loss != "sigmoid":
        raise SpecError(f"loss: {spec.data.dataset} is multi-label; multi-label datasets need `loss: sigmoid`")
    if spec.data.eval_split and spec.data.eval_split not in info.splits:
        raise SpecError(f"data.eval_split: {spec.data.eval_split!r} is not in {spec.data.dataset} (it has "
                        f"{', '.join(info.splits)}); name one of those, or null for no evaluation")
    _check_fewshot_datasets(spec)
    _check_run_identity(spec, resume=resume, resume_from=resume_from)


def _check_fewshot_datasets(spec: Spec) -> None:
    f = spec.eval.fewshot
    for url in f.datasets:
        try:
            info = data.check_dataset(url)
            data.check_shards_present(info, [f.train_split, f.test_split])
        except DatasetError as e:
            raise SpecError(f"eval.fewshot.datasets: {e}") from e
        if info.multi_label:
            raise SpecError(f"eval.fewshot.datasets: {url} is multi-label; few-shot linear evaluation takes "
                            "single-label datasets")


def _check_lease(spec: Spec) -> None:
    """One writer per run URL: a live lease of another launch refuses this one, naming its holder."""
    try:
        holder = lease.live_holder(spec.run.url)
    except LeaseError as e:
        raise SpecError(f"run.url: {e}") from e
    if holder is not None:
        raise SpecError(
            f"run.url: {spec.run.url} is in use by {lease.describe(holder)} (see {lease.lease_url(spec.run.url)}); "
            "wait for that run to end, or, if it died, for its lease to expire; or use another run.url")


def _check_run_identity(spec: Spec, *, resume: bool, resume_from: str | None) -> None:
    """A run folder holds one run: its newest checkpoint must have been written by this spec (cluster size and
    where the run lives aside), unless the user asks to start from other weights on purpose."""
    store = CheckpointStore(spec.run.url)
    newest = store.latest()
    if newest is None or resume_from:
        return
    if not resume:
        raise SpecError(
            f"run.url: {spec.run.url} already holds checkpoints (newest step {newest}) and --no-resume was "
            "given; choose a new run.url, or drop --no-resume to continue that run")
    saved = store.record(newest).spec_hash
    if saved != spec.hash():
        raise SpecError(
            f"run.url: {spec.run.url} was written by a different spec (hash {saved}, this one {spec.hash()}; see "
            f"{storage.join(spec.run.url, CONFIG_NAME)}); resuming it with this one would not continue the same "
            "run. Use a new run.url, or --resume-from a checkpoint to start a new run from its weights")


def save_config(spec: Spec) -> None:
    """Write RUN/config.yaml: also the proof, before any worker starts, that the run URL takes writes."""
    url = storage.join(spec.run.url, CONFIG_NAME)
    try:
        storage.write_bytes_atomic(url, spec.to_yaml().encode())
    except (PermissionError, OSError) as e:
        raise SpecError(f"run.url: cannot write {url} ({type(e).__name__}: {e}); check the credentials, the "
                        "bucket or folder permissions, or choose another run.url") from e


def resolve(spec: Spec, *, resume: bool = True, resume_from: str | None = None, write: bool = True) -> Spec:
    """The spec a run trains with: absolute paths, checked against its dataset and run folder, saved with the run
    (`write`: only one process of a launch writes it)."""
    spec, _ = absolute_paths(spec)
    preflight(spec, resume=resume, resume_from=resume_from, check_lease=write)
    if write:
        save_config(spec)
    return spec
