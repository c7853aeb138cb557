"""The job spec: a YAML file mapped onto dataclasses, with `--set a.b=c` overrides and validation.

Every field has a default except `data.dataset` and `run.url`; an unknown key, a wrong type or an inconsistent
combination raises `SpecError` with the key's dotted path and what is allowed, before any worker starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import MixerError


class SpecError(MixerError):
    """A job spec that cannot run; the message names the key and what to change."""


@dataclass
class ModelSpec:
    variant: str = "B/16"
    image_size: int = 224
    num_classes: int | None = None  # None: taken from the dataset's classes
    stoch_depth: float = 0.0
    dropout: float = 0.0
    head_bias: float = 0.0
    gelu: Literal["tanh", "exact"] = "tanh"
    activation_checkpointing: bool = False
    compile: bool = False
    # Weights to start from: a run's checkpoint URL, an export (.safetensors) or an official .npz.
    init: str | None = None
    # Keep the initial weights' head only when its classes match; "reset" always starts a fresh head.
    init_head: Literal["auto", "reset"] = "auto"


@dataclass
class RandAugSpec:
    layers: int = 0
    magnitude: int = 0


@dataclass
class DataSpec:
    dataset: str = ""
    train_split: str = "train"
    eval_split: str | None = "val"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    randaug: RandAugSpec = field(default_factory=RandAugSpec)
    mixup: float = 0.0
    # The global sample order is cut into this many independent streams; it depends on (dataset, seed, epoch,
    # global batch, streams) and never on the world size. workers x max(loader_workers, 1) must divide it.
    streams: int = 512
    loader_workers: int = 2
    eval_resize: int | None = None  # short side before the centre crop; None: image_size * 8 / 7
    # Training skips (and replaces) samples it cannot decode; past this fraction of the samples read, the run stops
    # (judged once the fraction allows 10 skips; 0 stops at the first). See pipeline/train.py SkipLog.
    max_skipped_fraction: float = 0.001
    # A shard read to its end is checked against dataset.json's sha256 as it streams (partial reads cannot be):
    # fail stops the run, warn logs once per shard, off skips the hash. A mismatch is never a brief fault (those are
    # retried below it): the bytes differ from what was prepared, so the default stops rather than train on them.
    verify: Literal["off", "warn", "fail"] = "fail"
    # Where training views are made: "cpu" in the loader processes, or "gpu": the loader processes draw each view's
    # parameters and read the bytes, the trainer's GPU decodes the JPEGs (nvJPEG) and crops, flips, RandAugments and
    # mixes them (pipeline/device_views.py). Same sample order, parameters and resume either way.
    decode: Literal["cpu", "gpu"] = "cpu"


@dataclass
class OptimSpec:
    name: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_grad_norm: float | None = 1.0


@dataclass
class ScheduleSpec:
    warmup_steps: int = 0
    decay: Literal["linear", "cosine", "constant"] = "linear"
    end_lr: float = 0.0
    epochs: float | None = None
    total_steps: int | None = None


@dataclass
class BatchSpec:
    global_: int = 4096  # YAML key: global
    micro: int = 64


@dataclass
class DeepSpeedSpec:
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = False  # GPU specs turn it on; DeepSpeed's bf16 mode runs on CPU too
    offload_optimizer: bool = False
    # Per-step work of the engine, each measured by `bench/train_e2e.py --knobs`:
    # reduce gradients bucket by bucket while the backward pass runs (stages 1-2; stage 3 always overlaps);
    overlap_comm: bool = True
    # bf16: test the gradients for inf/nan before every optimizer step and skip such steps (a host sync a step).
    # Off, a non-finite loss stops the run at the next log line or checkpoint, before anything is saved;
    check_overflow: bool = False
    # the clipping norm accumulated in fp32 as torch's clip_grad_norm_ does (DeepSpeed's own: an fp64 copy of every
    # gradient).
    fp32_grad_norm: bool = True


@dataclass
class ClusterSpec:
    workers: int = 1  # with `elastic`: the most workers
    gpus_per_worker: int = 0
    cpus_per_worker: int = 1
    max_failures: int = 3
    # Continue on the workers that remain when hosts are lost (down to min_workers), resuming from the newest
    # checkpoint; the global batch and the sample order stay those of the run. When hosts return, the run grows back
    # right after a commit, redoing no step.
    elastic: bool = False
    min_workers: int = 1
    resize_check_s: float = 60.0  # an elastic run below `workers` looks for room at commits at most this often


@dataclass
class FewShotSpec:
    """Few-shot linear evaluation (pipeline/fewshot.py) on downstream datasets made by `mixer prepare`: shots from
    their train split, top-1 on their test split."""

    datasets: list[str] = field(default_factory=list)  # URLs; none: off
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    # A list: picked per shot count and draw by the accuracy on holdout_per_class more images of each class.
    l2: float | list[float] = 1024.0
    seeds: int = 3  # draws of the shots; reported accuracies are their mean
    every_steps: int = 0  # 0: only at the end
    train_split: str = "train"
    test_split: str = "val"
    holdout_per_class: int = 5


@dataclass
class EvalSpec:
    every_steps: int = 0  # 0: only at the end
    batch_size: int = 128
    fewshot: FewShotSpec = field(default_factory=FewShotSpec)


@dataclass
class CheckpointSpec:
    every_steps: int = 1000
    keep_last: int = 3
    keep_every: int | None = None  # also keep every Nth step for ever
    # Node-local folder under which each save and load makes its own private (0700) folder; it must belong to the
    # user running the job and not be writable by others. null: the system temp directory.
    staging_dir: str | None = None


@dataclass
class RunSpec:
    url: str = ""
    log_every: int = 10
    # Stop after this step, checkpointed, as a preemption would; the same command later resumes the run.
    stop_after: int | None = None
    # One writer per run URL: the run holds RUN/lease.json, renewed every third of this; a run that dies without
    # releasing it blocks the URL for at most this long.
    lease_ttl_s: float = 300.0
    # How long one storage operation retries brief faults (5xx, SlowDown, resets, timeouts, cut reads) with
    # backoff before it gives up; counted from its first failure.
    io_retry_s: float = 300.0


@dataclass
class Spec:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    loss: Literal["softmax", "sigmoid"] = "softmax"
    optim: OptimSpec = field(default_factory=OptimSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    batch: BatchSpec = field(default_factory=BatchSpec)
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    run: RunSpec = field(default_factory=RunSpec)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Identity of what is trained: changes with model, data, loss, optimizer, schedule, batch and seed, but not
        with the cluster size or where the run lives, so a run can resume on another number of workers."""
        d = self.to_dict()
        kept = {k: d[k] for k in ("model", "data", "loss", "optim", "schedule", "batch", "seed")}
        # max_skipped_fraction only decides when to give up: raising it must let a stopped run resume; verify
        # likewise only decides how reads are checked.
        kept["data"] = {k: v for k, v in kept["data"].items()
                        if k not in ("loader_workers", "max_skipped_fraction", "verify", "decode")}
        kept["model"] = {k: v for k, v in kept["model"].items() if k not in ("compile", "activation_checkpointing")}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _yaml_key(name: str) -> str:
    return name.rstrip("_")


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {_yaml_key(f.name): _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_to_plain(v) for v in obj]
    return obj


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(_yaml_key(f.name) for f in dataclasses.fields(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(next(a for a in typing.get_args(tp) if a == value)):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except SpecError:
                continue
    elif origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, list | tuple) and len(value) == len(args):
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    elif origin is list:
        if isinstance(value, list | tuple):
            return [_coerce(v, typing.get_args(tp)[0], f"{path}[{i}]") for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, path)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise SpecError(f"{path}: got {value!r} ({type(value).__name__}); expected {_describe(tp)}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f.name): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise SpecError(f"unknown key '{path}'; allowed here: {', '.join(fields)}")
        f = fields[key]
        kwargs[f.name] = _coerce(value, hints[f.name], path)
    return cls(**kwargs)


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """`["optim.lr=3e-3", "batch.global=64"]` -> nested dict; values are read as YAML scalars or lists."""
    nested: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-3")
        key, text = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: '{part}' is set both as a value and as a section")
        node[parts[-1]] = yaml.safe_load(text)
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"a job spec is a YAML mapping at the top level, got {type(raw).__name__}")
    spec = _build(Spec, _merge(raw, parse_overrides(overrides)))
    validate(spec)
    return spec


def load(path: str | Path, overrides: list[str] | None = None) -> Spec:
    """Read a job spec (a local path or any fsspec URL), apply `--set` overrides and validate it."""
    import fsspec

    try:
        with fsspec.open(str(path), "r") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise SpecError(f"{path}: no such job spec file") from e
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {e}") from e
    try:
        return from_dict(raw, overrides)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from e


# Spec keys that may hold a path: a relative local path means nothing to a worker in another directory or machine.
PATH_KEYS = (("data", "dataset"), ("run", "url"), ("model", "init"))


def absolute_local_paths(spec: Spec, base: str) -> list[str]:
    """Make the spec's relative local paths absolute against `base`, in place; returns the keys changed."""
    import os

    changed = []
    for section, key in PATH_KEYS:
        part = getattr(spec, section)
        value = getattr(part, key)
        if value and "://" not in value and not os.path.isabs(value):
            setattr(part, key, os.path.normpath(os.path.join(base, value)))
            changed.append(f"{section}.{key}")
    fewshot = spec.eval.fewshot
    for i, value in enumerate(fewshot.datasets):
        if value and "://" not in value and not os.path.isabs(value):
            fewshot.datasets[i] = os.path.normpath(os.path.join(base, value))
            changed.append(f"eval.fewshot.datasets[{i}]")
    return changed


def world_sizes(cluster: ClusterSpec) -> range:
    """The numbers of workers a run may train on: `workers`, or with `elastic` every size down to `min_workers`."""
    return range(cluster.min_workers if cluster.elastic else cluster.workers, cluster.workers + 1)


def check_world_size(global_batch: int, micro: int, streams: int, loader_workers: int, workers: int) -> None:
    """Whether `workers` ranks can train the batch: whole micro batches on every rank, whole streams per reader."""
    if global_batch % (micro * workers):
        raise SpecError(
            f"batch.global={global_batch} is not divisible by batch.micro x cluster.workers = {micro} x {workers}; "
            f"choose a global batch that is a multiple of {micro * workers}, or change the micro batch or workers")
    check_stream_layout(streams, global_batch, workers, loader_workers)


def _fits(global_batch: int, micro: int, streams: int, loader_workers: int, workers: int) -> bool:
    try:
        check_world_size(global_batch, micro, streams, loader_workers, workers)
    except SpecError:
        return False
    return True


def check_stream_layout(streams: int, global_batch: int, workers: int, loader_workers: int) -> None:
    """The sample order's one structural rule: every global batch takes the same number of samples from each of
    the `streams`, and each reader (a worker's loader process, or the worker itself) owns whole streams."""
    if streams <= 0 or global_batch % streams:
        raise SpecError(f"batch.global={global_batch} is not divisible by data.streams={streams}; "
                        "each global batch takes the same number of samples from every stream")
    readers = workers * max(loader_workers, 1)
    if streams % readers:
        raise SpecError(
            f"data.streams={streams} is not divisible by cluster.workers x max(data.loader_workers, 1) = "
            f"{workers} x {max(loader_workers, 1)} = {readers}; set data.streams to a multiple of it (it must stay "
            "fixed for the life of a run)"
        )


def _check_cluster(spec: Spec) -> None:
    """The world sizes the run may train on (one, or an elastic range) each fit the batch and the streams."""
    b, c, d = spec.batch, spec.cluster, spec.data
    if c.elastic and not 1 <= c.min_workers <= c.workers:
        raise SpecError(f"cluster.min_workers: {c.min_workers} must be between 1 and cluster.workers={c.workers}")
    if c.elastic and c.max_failures < 1:
        raise SpecError("cluster.elastic: a lost host is a failure of the worker group before it is a resize; set "
                        "cluster.max_failures >= 1 (e.g. 10) so that the run restarts on the workers that remain")
    if c.resize_check_s < 0:
        raise SpecError(f"cluster.resize_check_s: must be >= 0 seconds, got {c.resize_check_s}")
    for workers in world_sizes(c):
        try:
            check_world_size(b.global_, b.micro, d.streams, d.loader_workers, workers)
        except SpecError as e:
            if not c.elastic:
                raise
            fits = [w for w in range(1, c.workers + 1) if _fits(b.global_, b.micro, d.streams, d.loader_workers, w)]
            raise SpecError(f"cluster.elastic: every size from cluster.min_workers={c.min_workers} to cluster.workers="
                            f"{c.workers} must fit the batch and the streams, and {workers} does not: {e}. The sizes "
                            f"that fit are {', '.join(map(str, fits))}: raise cluster.min_workers, or choose a global "
                            "batch and data.streams with more divisors") from None


def validate(spec: Spec) -> None:
    """Checks that need no I/O. `check_dataset` (in pipeline.data) checks the dataset URL."""
    from pipeline.model import VARIANTS, num_tokens

    m, d, b, c, s = spec.model, spec.data, spec.batch, spec.cluster, spec.schedule
    if not d.dataset:
        raise SpecError("data.dataset is required: the URL of a dataset written by `mixer prepare`")
    if not spec.run.url:
        raise SpecError("run.url is required: where the run keeps its config, metrics and checkpoints")
    if m.variant not in VARIANTS:
        raise SpecError(f"model.variant: unknown variant {m.variant!r}; known: {', '.join(VARIANTS)}")
    try:
        num_tokens(VARIANTS[m.variant], m.image_size)
    except ValueError as e:
        raise SpecError(f"model.image_size: {e} of {m.variant}") from e
    for name, value in (("model.stoch_depth", m.stoch_depth), ("model.dropout", m.dropout), ("data.mixup", d.mixup),
                        ("data.max_skipped_fraction", d.max_skipped_fraction)):
        if not 0.0 <= value < 1.0:
            raise SpecError(f"{name}: {value} is outside [0, 1)")
    lo, hi = d.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise SpecError(f"data.crop_scale: {list(d.crop_scale)} must satisfy 0 < low <= high <= 1")
    positive = {"batch.global": b.global_, "batch.micro": b.micro, "cluster.workers": c.workers,
                "data.streams": d.streams, "checkpoint.keep_last": spec.checkpoint.keep_last,
                "eval.batch_size": spec.eval.batch_size, "run.log_every": spec.run.log_every,
                "run.lease_ttl_s": spec.run.lease_ttl_s}
    if s.total_steps is not None:
        positive["schedule.total_steps"] = s.total_steps
    if s.epochs is not None:
        positive["schedule.epochs"] = s.epochs
    if spec.run.stop_after is not None:
        positive["run.stop_after"] = spec.run.stop_after
    staging = spec.checkpoint.staging_dir
    if staging is not None and ("://" in staging or not staging.startswith("/")):
        raise SpecError(f"checkpoint.staging_dir: {staging!r} must be an absolute node-local path (each worker "
                        "stages there on its own host), or null for the system temp directory")
    for name, value in positive.items():
        if value <= 0:
            raise SpecError(f"{name}: must be positive, got {value}")
    _check_cluster(spec)
    if d.eval_resize is not None and d.eval_resize < m.image_size:
        raise SpecError(f"data.eval_resize: {d.eval_resize} is smaller than model.image_size={m.image_size}; the "
                        "centre crop needs at least image_size pixels on the short side (null: image_size * 8 / 7)")
    if (s.epochs is None) == (s.total_steps is None):
        raise SpecError("schedule: give exactly one of schedule.epochs or schedule.total_steps")
    for name, value in (("checkpoint.every_steps", spec.checkpoint.every_steps),
                        ("eval.every_steps", spec.eval.every_steps)):
        if value < 0:
            raise SpecError(f"{name}: must be >= 0 (0 turns it off), got {value}")
    if s.warmup_steps < 0:
        raise SpecError(f"schedule.warmup_steps: must be >= 0, got {s.warmup_steps}")
    if spec.run.io_retry_s < 0:
        raise SpecError(f"run.io_retry_s: must be >= 0 seconds (0: no retries), got {spec.run.io_retry_s}")
    if spec.optim.name == "sgd" and spec.deepspeed.offload_optimizer:
        raise SpecError("deepspeed.offload_optimizer works with optim.name=adam only")
    _check_fewshot(spec.eval.fewshot)


def _check_fewshot(f: FewShotSpec) -> None:
    if not f.datasets:
        return
    names = [posixpath.basename(url.rstrip("/")) for url in f.datasets]
    if len(set(names)) != len(names) or not all(names):
        raise SpecError(f"eval.fewshot.datasets: {f.datasets} must end in distinct names (metrics are reported "
                        "as fewshot/<name>/<n>shot, <name> the URL's last part)")
    if not f.shots or min(f.shots) < 1:
        raise SpecError(f"eval.fewshot.shots: {f.shots} must be a non-empty list of positive shot counts")
    l2s = f.l2 if isinstance(f.l2, list) else [f.l2]
    if not l2s or min(l2s) <= 0:
        raise SpecError(f"eval.fewshot.l2: {f.l2} must be a positive strength or a non-empty list of them")
    for name, value in (("seeds", f.seeds), ("holdout_per_class", f.holdout_per_class)):
        if value < 1:
            raise SpecError(f"eval.fewshot.{name}: must be positive, got {value}")
    if f.every_steps < 0:
        raise SpecError(f"eval.fewshot.every_steps: must be >= 0 (0: only at the end), got {f.every_steps}")
