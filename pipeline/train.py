"""The trainer: build -> resume -> loop of `train_step` (log, save and evaluate when `due`) -> finish.

`train(spec)` runs in every worker of an initialised torch.distributed group, whoever started it: Ray Train
(`mixer train`, see pipeline/launch.py), torchrun or the deepspeed launcher:

    torchrun --nproc-per-node 8 -m pipeline.train jobs/mixer_b16_i21k.yaml --set run.url=s3://bucket/runs/b16
    deepspeed --num_gpus 8 --module pipeline.train jobs/mixer_b16_i21k.yaml

The spec comes resolved (pipeline/run.py: absolute paths, preflight, config.yaml). Resume is automatic: a run URL
that holds committed checkpoints continues from the newest one.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import data, deepspeed_compat, fewshot, metrics, optim, run, storage
from pipeline.checkpoint import CheckpointStore, StepRecord
from pipeline.config import Spec
from pipeline.dataset_json import DatasetInfo
from pipeline.errors import FinalError
from pipeline.evaluate import evaluate, loss_fn
from pipeline.lease import Lease, LeaseError
from pipeline.skips import SkipLog
from pipeline.units import format_duration

log = logging.getLogger("mixer.train")


class DivergedError(FinalError):
    """The loss became non-finite: the weights no longer hold numbers, and nothing after them is saved."""


@dataclass
class TrainState:
    """Where the run is: the step and the data stream's position (shared by all ranks, saved as JSON)."""

    step: int
    stream: data.TrainStream
    saved_by: int | None = None  # the workers that saved the step resumed from (None: a fresh start)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.stream.load_state_dict(state["stream"])


@dataclass
class Parts:
    """What `build` makes for one process of the run."""

    spec: Spec
    rank: int
    world_size: int
    device: torch.device
    info: DatasetInfo
    stream: data.TrainStream
    shape: optim.StepShape
    engine: Any
    store: CheckpointStore
    metrics: metrics.MetricsLog | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    flops_per_image: float = 0.0
    peak_flops: float | None = None


def train(spec: Spec, *, resume_from: str | None = None) -> dict[str, Any]:
    """Train `spec` on this process's rank of the current torch.distributed group. Returns the final metrics.

    The run's own newest committed checkpoint always wins, so that workers restarted after a failure continue the
    run; `resume_from` (a step URL, possibly of another run) is used only while the run has no checkpoint yet."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parts = build(spec)
    state = resume(parts, resume_from)
    parts.metrics = metrics.MetricsLog(spec.run.url, enabled=parts.rank == 0, resume_step=state.step)
    log_start(parts, state)
    stop_at = min(parts.shape.total_steps, spec.run.stop_after or parts.shape.total_steps)
    progress = _progress(parts.rank, state.step, parts.shape.total_steps)
    window = LossWindow(torch.zeros((), device=parts.device))
    skips = SkipLog(spec, enabled=parts.rank == 0, resume_step=state.step)
    last_eval: dict[str, float] = {}
    downstream = prepare_fewshot(parts)
    growth, grow_to = GrowthCheck(), 0
    batches = iter(state.stream)
    while state.step < stop_at:
        batch = next(batches)
        window.add(train_step(parts, batch))
        state.step += 1
        skips.add(state.step, batch.skipped)
        if due(state.step, spec.run.log_every, parts.shape.total_steps):
            log_train(parts, state.step, window, progress, skips)
        committing = due(state.step, spec.checkpoint.every_steps, stop_at)
        if committing:
            check_finite(parts, window, state.step)
            skips.settle(state.step, parts.metrics)  # a resume from this step must find every skip up to it on file
            save(parts, state)
        if spec.data.eval_split and due(state.step, spec.eval.every_steps, parts.shape.total_steps):
            last_eval = evaluate(parts.engine, spec, parts.info, parts.rank, parts.world_size, parts.device,
                                 input_dtype(spec))
            parts.metrics.log({"kind": "eval", "step": state.step, **last_eval})
        if downstream and due(state.step, spec.eval.fewshot.every_steps, parts.shape.total_steps):
            log_fewshot(parts, state.step, downstream)
        if progress is not None:
            progress.update(1)
        if committing and state.step < stop_at:
            grow_to = room_to_grow(parts, growth, state.step)
            if grow_to:
                break
    return finish(parts, state, last_eval, progress, grow_to)


def prepare_fewshot(parts: Parts) -> list[fewshot.Downstream]:
    """Draw the shots of every few-shot dataset and read this rank's share of them, once for the run."""
    spec = parts.spec
    if not spec.eval.fewshot.datasets:
        return []
    start = time.monotonic()
    downstream = fewshot.prepare(spec.eval.fewshot, spec.model.image_size, spec.data.eval_resize,
                                 spec.eval.batch_size, parts.rank, parts.world_size, spec.seed)
    if parts.rank == 0:
        for ds in downstream:
            log.info("few-shot %s: %d draws of %d classes, %d images drawn (%.1f s for all datasets)", ds.name,
                     len(ds.draws), ds.info.num_classes, len(ds.picks), time.monotonic() - start)
    return downstream


def log_fewshot(parts: Parts, step: int, downstream: list[fewshot.Downstream]) -> None:
    spec = parts.spec
    results = fewshot.evaluate(parts.engine.module, spec.eval.fewshot, downstream, spec.model.image_size,
                               spec.data.eval_resize, spec.eval.batch_size, parts.rank, parts.world_size,
                               parts.device, input_dtype(spec))
    parts.metrics.log({"kind": "fewshot", "step": step, **results})
    if parts.rank == 0:
        log.info("step %d few-shot: %s", step, ", ".join(f"{k.removeprefix('fewshot/')} {v:.4g}"
                                                         for k, v in results.items()))


def due(step: int, every: int, last: int) -> bool:
    """Whether something done every `every` steps (0: only at the end) is due after step `step`; always after the
    last step."""
    return step == last or (every > 0 and step % every == 0)


# ---------------------------------------------------------------------------------------------------------------
# build and resume


def build(spec: Spec) -> Parts:
    """Join the process group, pick the device, and build the data stream's shape, the model, the DeepSpeed engine
    and the checkpoint store. The run's lease is taken first: a run URL in use fails here, before any engine."""
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    storage.set_retry_budget(spec.run.io_retry_s)
    data.set_verify(spec.data.verify)
    held = take_lease(spec, rank)
    on_gpu = torch.cuda.is_available() and spec.cluster.gpus_per_worker > 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, spec.cluster.cpus_per_worker))
    info = data.check_dataset(spec.data.dataset)
    if spec.data.decode == "gpu" and not on_gpu and rank == 0:
        log.warning("data.decode: gpu but this worker has no GPU: the views are made on the CPU by the device path "
                    "(correct, and slower than data.decode: cpu)")
    stream = data.TrainStream(info, stream_config(spec), rank, world_size, device)
    shape = optim.step_shape(spec, world_size, stream.batches_per_epoch)
    seed_everything(spec.seed, 0, rank)
    net = build_model(spec, spec.model.num_classes or info.num_classes)
    engine = optim.build_engine(spec, net, shape, on_gpu)
    store = CheckpointStore(spec.run.url, keep_last=spec.checkpoint.keep_last, keep_every=spec.checkpoint.keep_every,
                            staging_dir=spec.checkpoint.staging_dir, lease=held)
    store.check_staging(engine)
    peak = metrics.peak_flops(torch.cuda.get_device_name(device)) if on_gpu else None
    return Parts(spec, rank, world_size, device, info, stream, shape, engine, store,
                 model_config=net.init_kwargs(), flops_per_image=3 * net.forward_flops(), peak_flops=peak)


def take_lease(spec: Spec, rank: int) -> Lease | None:
    """Collective: rank 0 takes the run's lease (one writer per run URL; workers restarted within the same launch
    re-take it) and renews it while the process lives. A refusal, which names the holder, is raised on every rank.
    Returns the lease on rank 0, None elsewhere."""
    held, refused = None, None
    if rank == 0:
        lease = Lease(spec.run.url, ttl_s=spec.run.lease_ttl_s)
        try:
            lease.take()
            lease.start_renewing()
            held = lease
        except LeaseError as e:
            refused = str(e)
        except Exception as e:  # the store itself failing: still every rank must hear of it
            refused = f"{lease.url}: cannot take the run's lease ({type(e).__name__}: {e})"
    box = [refused]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise LeaseError(box[0])
    return held


def build_model(spec: Spec, num_classes: int) -> torch.nn.Module:
    """The spec's Mixer, freshly initialised or from `model.init` (weights file, run or step URL)."""
    from pipeline import convert, model

    m = spec.model
    kwargs = {"dropout": m.dropout, "stoch_depth": m.stoch_depth, "head_bias": m.head_bias, "gelu": m.gelu,
              "activation_checkpointing": m.activation_checkpointing}
    if not m.init:
        return model.build(m.variant, num_classes=num_classes, image_size=m.image_size, **kwargs)
    net = convert.load_weights(m.init, num_classes=num_classes, image_size=m.image_size, **kwargs)
    if m.init_head == "reset":
        net.reset_head()
    return net


def resume(parts: Parts, resume_from: str | None) -> TrainState:
    """The state to start from: the run's newest committed step, else `resume_from`, else step 0."""
    spec = parts.spec
    state = TrainState(0, parts.stream)
    own = parts.store.latest() is not None
    if not (own or resume_from):
        return state
    record, rank_state = parts.store.load(parts.engine, url=None if own else resume_from)
    state.load_state_dict(record.train_state)
    state.saved_by = record.world_size
    if rank_state is not None:
        set_rng_state(rank_state)
    else:
        seed_everything(spec.seed, state.step, parts.rank)
    return state


def log_start(parts: Parts, state: TrainState) -> None:
    """Collective: a `start` record of where this (re)start of the run begins and on which hosts; the resume in the
    log, a warning that says why when the world size is not the one the resumed step was saved with."""
    hosts: list[str | None] = [None] * parts.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    if parts.rank != 0:
        return
    c, shape, b = parts.spec.cluster, parts.shape, parts.spec.batch
    parts.metrics.log({"kind": "start", "step": state.step, "time": time.time(), "workers": parts.world_size,
                       "saved_by": state.saved_by, "hosts": sorted(set(hosts))})
    if state.saved_by is None:
        return
    log.info("resumed from step %d (saved by %d workers, now %d)", state.step, state.saved_by, parts.world_size)
    if state.saved_by == parts.world_size:
        return
    workers = f"{parts.world_size} worker{'s' if parts.world_size > 1 else ''}"
    why = (f"the cluster holds {workers} now (cluster.elastic: {c.min_workers} to {c.workers})" if c.elastic
           else f"the run was started with {workers}")
    log.warning("world size %d -> %d at step %d: %s; same global batch %d (%d micro batches of %d on each worker) "
                "and sample order, through the universal checkpoint", state.saved_by, parts.world_size, state.step,
                why, b.global_, shape.micro_batches_per_rank, b.micro)


# ---------------------------------------------------------------------------------------------------------------
# the step, and what happens between steps


def train_step(parts: Parts, batch: data.Batch) -> torch.Tensor:
    """One optimizer step over this rank's share of a global batch, in micro batches; returns the mean loss."""
    spec, engine = parts.spec, parts.engine
    # Moved first, cast on the device: the copy stays asynchronous and the host does no conversion.
    images = batch.images.to(parts.device, non_blocking=True).to(input_dtype(spec))
    targets = batch.targets.to(parts.device, non_blocking=True)
    step_loss = torch.zeros((), device=parts.device)
    n = parts.shape.micro_batches_per_rank
    for i in range(n):
        rows = slice(i * spec.batch.micro, (i + 1) * spec.batch.micro)
        loss = loss_fn(engine(images[rows]), targets[rows], spec.loss)
        engine.backward(loss)
        engine.step()
        step_loss += loss.detach() / n
    return step_loss


@dataclass
class LossWindow:
    """The losses and wall time since the last log line."""

    loss_sum: torch.Tensor
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.started = 0, time.perf_counter()


def log_train(parts: Parts, step: int, window: LossWindow, progress: Any, skips: SkipLog) -> None:
    """One all-reduce per log interval, not per step: the loss logged is the global mean over the window. Then,
    with the record logged, the run stops if it skipped too many samples."""
    spec, shape = parts.spec, parts.shape
    dist.all_reduce(window.loss_sum)
    skipped = skips.gather(step)
    step_time = (time.perf_counter() - window.started) / window.steps
    images_per_s = spec.batch.global_ / step_time
    grad_norm = parts.engine.get_global_grad_norm()
    record = {
        "kind": "train", "step": step, "epoch": step / shape.steps_per_epoch, "time": time.time(),
        "loss": window.loss_sum.item() / (parts.world_size * window.steps),
        "lr": spec.optim.lr * optim.lr_factor(step - 1, spec, shape.total_steps),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "images_per_s": images_per_s, "step_time_s": step_time,
        "mfu": metrics.mfu(images_per_s, parts.flops_per_image, parts.peak_flops, parts.world_size),
        "eta_s": step_time * (shape.total_steps - step), "skipped_samples": skipped,
    }
    parts.metrics.log(record)
    if not math.isfinite(record["loss"]) and not skips_nonfinite_steps(parts.spec):
        parts.metrics.flush(wait=True)
        raise DivergedError(diverged_message(parts, step - window.steps + 1, step))
    if progress is not None:
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{images_per_s:.0f}",
                             eta=format_duration(record["eta_s"]))
    window.reset()
    skips.stop_if_over(parts.metrics)


def skips_nonfinite_steps(spec: Spec) -> bool:
    """Whether DeepSpeed tests each step's gradients and skips a non-finite step (bf16 with check_overflow), so
    that a non-finite loss leaves the weights as they were."""
    return spec.deepspeed.bf16 and spec.deepspeed.check_overflow


def check_finite(parts: Parts, window: LossWindow, step: int) -> None:
    """Collective, before a checkpoint: stop if any rank's loss since the last log line, or any weight this rank
    holds (ZeRO-3: its partition), is non-finite, so that weights no longer holding numbers are never committed.
    One pass over the weights and one all-reduce of a scalar a checkpoint."""
    if skips_nonfinite_steps(parts.spec):
        return
    weights = [getattr(p, "ds_tensor", p) for p in parts.engine.module.parameters()]
    bad = (~torch.stack([torch.isfinite(w).all() for w in weights]).all()).to(torch.float32)
    if window.steps:
        bad += (~torch.isfinite(window.loss_sum)).to(torch.float32)
    dist.all_reduce(bad)
    if bad.item():
        raise DivergedError(diverged_message(parts, step - max(window.steps, 1) + 1, step))


def diverged_message(parts: Parts, first: int, last: int) -> str:
    newest = parts.store.latest()
    since = f"step {newest}" if newest is not None else "none yet"
    return (f"the training loss or weights became non-finite (nan or inf) between steps {first} and {last}; the run "
            f"stops without saving (its newest checkpoint: {since}). Lower optim.lr or set optim.clip_grad_norm and "
            "start a new run, from that checkpoint with --resume-from if there is one; or, in bf16, set "
            "deepspeed.check_overflow: true to skip steps whose gradients are non-finite")


def save(parts: Parts, state: TrainState) -> None:
    """A checkpoint of the step just done: one record for the whole run, plus this rank's RNG state."""
    record = StepRecord(step=state.step, world_size=parts.world_size,
                        zero_stage=int(parts.engine.zero_optimization_stage()), spec_hash=parts.spec.hash(),
                        model_config=parts.model_config, train_state=state.state_dict())
    parts.store.save(parts.engine, record, rank_state=rng_state())
    parts.metrics.flush()


@dataclass
class GrowthCheck:
    """When an elastic run below its most workers last looked for room to grow (rank 0's clock; its start counts)."""

    looked: float = field(default_factory=time.monotonic)


def room_to_grow(parts: Parts, check: GrowthCheck, step: int) -> int:
    """Collective, after a commit: the larger world size an elastic run below `cluster.workers` stops to grow to,
    when the cluster has room again (looked for at most every `cluster.resize_check_s`); 0 when none. Stopping
    here redoes no step: the group starts again from the step just committed."""
    c = parts.spec.cluster
    if not c.elastic or parts.world_size >= c.workers:
        return 0
    import ray  # here, not at the top: a trainer under torchrun does without Ray and its 0.3 s of imports

    from pipeline import ray_cluster

    if not ray.is_initialized():
        return 0
    size = [0]
    if parts.rank == 0 and time.monotonic() - check.looked >= c.resize_check_s:
        check.looked = time.monotonic()
        try:
            most = ray_cluster.most_workers(c, parts.world_size)
        except Exception as e:  # a look for room must never fail the group: the other ranks wait in the broadcast
            log.warning("could not look for room to grow (%s: %s); looking again at a later commit",
                        type(e).__name__, e)
            most = parts.world_size
        size[0] = most if most > parts.world_size else 0
    dist.broadcast_object_list(size, src=0)
    if size[0] and parts.rank == 0:
        log.info("the cluster has room for %d workers again (now %d): stopping once the checkpoint of step %d is "
                 "committed, to go on with them from there (cluster.elastic)", size[0], parts.world_size, step)
    return size[0]


def finish(parts: Parts, state: TrainState, last_eval: dict[str, float], progress: Any,
           grow_to: int = 0) -> dict[str, Any]:
    """Wait for the last upload; when the schedule is done, export the fp32 weights (rank 0); release the run,
    unless the workers stop only to start again on `grow_to` workers."""
    parts.store.wait()
    state.stream.close()
    dist.barrier()
    done = state.step >= parts.shape.total_steps
    export_url = None
    if done and parts.rank == 0:
        from pipeline.convert import export_weights

        export_url = export_weights(parts.spec.run.url,
                                    storage.join(parts.spec.run.url, "exports", f"step-{state.step:09d}.safetensors"))
        log.info("exported %s", export_url)
    parts.metrics.close()
    if progress is not None:
        progress.close()
    if parts.store.lease is not None and not grow_to:  # rank 0, the run's writes all done: the next launch may take it
        parts.store.lease.release()
    dist.barrier()
    return {"step": state.step, "eval": last_eval, "export": export_url, "stopped": not done, "grow_to": grow_to}


# ---------------------------------------------------------------------------------------------------------------
# processes, RNG, inputs


def init_distributed() -> None:
    """Join (or, under torchrun, create) the process group DeepSpeed will use."""
    import deepspeed

    deepspeed_compat.quiet_deprecated_collectives()
    if not torch.cuda.is_available():
        deepspeed_compat.use_gloo_allreduce_on_cpu()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers only, so that loading them runs no pickled code."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"python": [version, torch.tensor(internal, dtype=torch.int64), gauss_next],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, step: int, rank: int) -> None:
    """Seed the per-rank RNGs (dropout, stochastic depth) from (seed, step, rank): a fresh start, or a resume on a
    different world size where the saved per-rank states no longer apply."""
    s = (seed * 1_000_003 + step * 10_007 + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def stream_config(spec: Spec) -> data.StreamConfig:
    d = spec.data
    return data.StreamConfig(
        split=d.train_split, seed=spec.seed, global_batch=spec.batch.global_, streams=d.streams,
        image_size=spec.model.image_size, crop_scale=d.crop_scale, flip=d.flip,
        randaug_layers=d.randaug.layers, randaug_magnitude=d.randaug.magnitude, mixup=d.mixup,
        loader_workers=d.loader_workers, decode=d.decode,
    )


def input_dtype(spec: Spec) -> torch.dtype:
    """DeepSpeed's bf16 mode holds the model in bf16 and, unlike its fp16 mode, does not cast the inputs; it also
    turns an outer autocast off inside the engine. So images go in as bf16, and LayerNorm, GELU and the residual
    stream all run on bf16 tensors (statistics in fp32 inside the kernels), with fp32 master weights in the
    optimizer."""
    return torch.bfloat16 if spec.deepspeed.bf16 else torch.float32


def _progress(rank: int, start: int, total: int) -> Any:
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point for torchrun and the deepspeed launcher (`python -m pipeline.train SPEC`)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--no-resume", action="store_true")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # The launcher decides the world size; the spec is checked against it.
    workers = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    spec = run.resolve(run.load_spec(args.spec, args.overrides, workers), resume=not args.no_resume,
                       resume_from=args.resume_from, write=os.environ.get("RANK", "0") == "0")
    train(spec, resume_from=args.resume_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
