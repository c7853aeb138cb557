"""The trainer: build -> resume -> loop (step, log, eval, checkpoint) -> export.

`train(spec)` runs in every worker of an initialised torch.distributed group, whoever started it: Ray Train
(`mixer train`, see pipeline/launch.py), torchrun or the deepspeed launcher:

    torchrun --nproc-per-node 8 -m pipeline.train jobs/mixer_b16_i21k.yaml --set run.url=s3://bucket/runs/b16
    deepspeed --num_gpus 8 --module pipeline.train jobs/mixer_b16_i21k.yaml

Resume is automatic: a run URL that holds committed checkpoints continues from the newest one.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline import config as config_lib
from pipeline import data, metrics, storage
from pipeline.config import Spec

log = logging.getLogger("mixer.train")


class ResumeError(RuntimeError):
    """A checkpoint that this spec cannot continue from."""


@dataclass
class Plan:
    """What the spec and the dataset decide before the first step."""

    num_classes: int
    total_steps: int
    micro_batches_per_rank: int  # DeepSpeed's gradient accumulation steps
    steps_per_epoch: int


# ---------------------------------------------------------------------------------------------------------------
# build


def make_plan(spec: Spec, info: Any, world_size: int, steps_per_epoch: int) -> Plan:
    per_rank = spec.batch.global_ // world_size
    if spec.schedule.total_steps is not None:
        total = spec.schedule.total_steps
    else:
        total = math.ceil(spec.schedule.epochs * steps_per_epoch)
    return Plan(
        num_classes=spec.model.num_classes or info.num_classes,
        total_steps=total,
        micro_batches_per_rank=per_rank // spec.batch.micro,
        steps_per_epoch=steps_per_epoch,
    )


def model_kwargs(spec: Spec) -> dict[str, Any]:
    m = spec.model
    return {
        "dropout": m.dropout,
        "stoch_depth": m.stoch_depth,
        "head_bias": m.head_bias,
        "gelu": m.gelu,
        "activation_checkpointing": m.activation_checkpointing,
    }


def build_model(spec: Spec, num_classes: int) -> torch.nn.Module:
    from pipeline import model

    if spec.model.init:
        net = _load_any_weights(spec.model.init, num_classes=num_classes, image_size=spec.model.image_size,
                                **model_kwargs(spec))
        if spec.model.init_head == "reset":
            net.reset_head()
        return net
    return model.build(spec.model.variant, num_classes=num_classes, image_size=spec.model.image_size,
                       **model_kwargs(spec))


def _load_any_weights(src: str, **kwargs: Any) -> torch.nn.Module:
    """Weights from a file (.npz, .safetensors, timm .pth/.bin) or from a run or step URL, consolidated on the fly."""
    from pipeline import convert
    from pipeline.checkpoint import export

    if src.endswith(tuple(convert.WEIGHT_FORMATS)):
        return convert.load_weights(src, **kwargs)
    with tempfile.TemporaryDirectory(prefix="mixer-weights-") as tmp:
        return convert.load_weights(export(src, os.path.join(tmp, "weights.safetensors")), **kwargs)


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on kernels only: biases and LayerNorm parameters (all 1-d) are not decayed."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, spec: Spec, total_steps: int) -> float:
    """Linear warmup from 0 to the peak, then linear or cosine decay to `end_lr` at the last step."""
    s = spec.schedule
    peak, end = spec.optim.lr, s.end_lr
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return 1.0
    progress = min(1.0, (step - s.warmup_steps) / max(1, total_steps - s.warmup_steps))
    if s.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return (end + (peak - end) * shape) / peak


def deepspeed_config(spec: Spec, plan: Plan, world_size: int, on_gpu: bool) -> dict[str, Any]:
    o = spec.optim
    cfg: dict[str, Any] = {
        "train_batch_size": spec.batch.global_,
        "train_micro_batch_size_per_gpu": spec.batch.micro,
        "gradient_accumulation_steps": plan.micro_batches_per_rank,
        "gradient_clipping": o.clip_grad_norm or 0.0,
        "zero_optimization": {"stage": spec.deepspeed.zero_stage},
        "bf16": {"enabled": spec.deepspeed.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if o.name == "adam":
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": 1e-8, "weight_decay": o.weight_decay,
                       "torch_adam": not on_gpu},
        }
    else:
        cfg["zero_allow_untested_optimizer"] = True
    if spec.deepspeed.offload_optimizer:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# loss, evaluation, RNG


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    logits = logits.float()
    if kind == "sigmoid":
        # big_vision's sigmoid cross-entropy: summed over classes, averaged over examples.
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    targets = targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)
    return -(targets * F.log_softmax(logits, -1)).sum(-1).mean()


@torch.no_grad()
def evaluate(engine: Any, spec: Spec, info: Any, rank: int, world_size: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, float]:
    """Top-1/top-5 (a prediction counts when it is one of the image's labels: for multi-label data top-1 is
    precision@1) and the loss over the whole eval split, summed across ranks; images go in as `dtype`, the model's."""
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss*n, n
    for batch in data.eval_batches(info, spec.data.eval_split, spec.model.image_size, spec.eval.batch_size, rank,
                                   world_size, resize=spec.data.eval_resize,
                                   loader_workers=spec.data.loader_workers):
        images, targets = batch.images.to(device).to(dtype), batch.targets.to(device)
        logits = engine(images).float()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = targets.gather(1, top5) > 0
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += loss_fn(logits, targets, spec.loss).double() * len(images)
        sums[3] += len(images)
    dist.all_reduce(sums)
    engine.train()
    n = max(sums[3].item(), 1.0)
    out = {"top1": sums[0].item() / n, "top5": sums[1].item() / n, "loss": sums[2].item() / n, "samples": int(n)}
    if info.multi_label:
        out["prec1"] = out["top1"]
    return out


def evaluate_weights(spec: Spec, weights: str, split: str | None = None) -> dict[str, float]:
    """`mixer eval`: one process evaluates a checkpoint (run or step URL) or exported weights on a split."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    info = data.check_dataset(spec.data.dataset)
    net = _load_any_weights(weights, image_size=spec.model.image_size, gelu=spec.model.gelu)
    if net.num_classes != info.num_classes:
        raise ResumeError(f"{weights}: a head of {net.num_classes} classes cannot be scored on {spec.data.dataset}, "
                          f"which has {info.num_classes}")
    if split:
        spec.data.eval_split = split
    return evaluate(net, spec, info, 0, 1, torch.device("cpu"), torch.float32)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, step: int, rank: int) -> None:
    """Seed the per-rank RNGs (dropout, stochastic depth) from (seed, step, rank): a fresh start, or a resume on a
    different world size where the saved per-rank states no longer apply."""
    s = (seed * 1_000_003 + step * 10_007 + rank) % 2**31
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ---------------------------------------------------------------------------------------------------------------
# the loop


def train(spec: Spec, *, resume_from: str | None = None) -> dict[str, Any]:
    """Train `spec` on this process's rank of the current torch.distributed group. Returns the final metrics.

    The run's own newest committed checkpoint always wins, so that workers restarted after a failure continue the
    run; `resume_from` (a step URL, possibly of another run) is used only while the run has no checkpoint yet."""
    import deepspeed

    from pipeline.checkpoint import CheckpointStore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    on_gpu = torch.cuda.is_available() and spec.cluster.gpus_per_worker > 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, spec.cluster.cpus_per_worker))

    # Build
    info = data.check_dataset(spec.data.dataset)
    stream = data.TrainStream(info, stream_config(spec), rank, world_size)
    plan = make_plan(spec, info, world_size, stream.batches_per_epoch)
    seed_everything(spec.seed, 0, rank)
    net = build_model(spec, plan.num_classes)
    flops_per_image = 3 * net.forward_flops()
    ds_cfg = deepspeed_config(spec, plan, world_size, on_gpu)
    optimizer = None
    if spec.optim.name == "sgd":
        optimizer = torch.optim.SGD(param_groups(net, spec.optim.weight_decay), lr=spec.optim.lr,
                                    momentum=spec.optim.momentum)
    engine, _, _, scheduler = deepspeed.initialize(
        model=net,
        model_parameters=param_groups(net, spec.optim.weight_decay),
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, spec, plan.total_steps)),
        config=ds_cfg,
    )
    if spec.model.compile:
        engine.compile()
    store = CheckpointStore(storage.join(spec.run.url, "checkpoints"), keep_last=spec.checkpoint.keep_last,
                            keep_every=spec.checkpoint.keep_every)

    # Resume
    step = 0
    own = store.latest() is not None
    if own or resume_from:
        step, client, rank_state = store.load(engine) if own else store.load(engine, url=resume_from)
        if client.get("spec_hash") != spec.hash() and own:
            raise ResumeError(
                f"{spec.run.url}: its checkpoints were written by a different spec (hash {client.get('spec_hash')} "
                f"vs {spec.hash()}); use a new run.url, or --resume-from to start from these weights on purpose")
        stream.load_state_dict(client["stream"])
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        else:
            seed_everything(spec.seed, step, rank)
        if rank == 0:
            log.info("resumed from step %d (saved by %d workers, now %d)", step, client.get("world_size"),
                     world_size)
    peak = metrics.peak_flops(torch.cuda.get_device_name(device)) if on_gpu else None
    mlog = metrics.MetricsLog(spec.run.url, enabled=rank == 0, resume_step=step)

    def save(at_step: int) -> None:
        client = {"stream": stream.state_dict(), "step": at_step, "spec_hash": spec.hash(),
                  "world_size": world_size, "zero_stage": spec.deepspeed.zero_stage}
        meta = {"model_config": net.init_kwargs(), "spec_hash": spec.hash(), "world_size": world_size,
                "zero_stage": spec.deepspeed.zero_stage, "step": at_step, "time": time.time()}
        store.save(engine, at_step, client_state=client, rank_state={"rng": rng_state()}, meta=meta)
        mlog.flush()

    # Loop
    engine.train()
    batches = iter(stream)
    progress = _progress(rank, step, plan.total_steps)
    last_eval: dict[str, float] = {}
    window_start, window_steps, loss_sum = time.perf_counter(), 0, torch.zeros((), device=device)
    stop_at = min(plan.total_steps, spec.run.stop_after or plan.total_steps)
    while step < stop_at:
        batch = next(batches)
        # Moved first, cast on the device: the copy stays asynchronous and the host does no conversion.
        images = batch.images.to(device, non_blocking=True).to(input_dtype(spec))
        targets = batch.targets.to(device, non_blocking=True)
        step_loss = torch.zeros((), device=device)
        for i in range(plan.micro_batches_per_rank):
            sl = slice(i * spec.batch.micro, (i + 1) * spec.batch.micro)
            loss = loss_fn(engine(images[sl]), targets[sl], spec.loss)
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach() / plan.micro_batches_per_rank
        step += 1
        loss_sum += step_loss
        window_steps += 1

        if step % spec.run.log_every == 0 or step == plan.total_steps:
            # One all-reduce per log interval, not per step: the loss logged is the global mean.
            dist.all_reduce(loss_sum)
            elapsed = time.perf_counter() - window_start
            step_time = elapsed / window_steps
            images_per_s = spec.batch.global_ / step_time
            grad_norm = engine.get_global_grad_norm()
            record = {
                "kind": "train", "step": step, "epoch": step / plan.steps_per_epoch, "time": time.time(),
                "loss": loss_sum.item() / (world_size * window_steps),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "images_per_s": images_per_s, "step_time_s": step_time,
                "mfu": metrics.mfu(images_per_s, flops_per_image, peak, world_size),
                "eta_s": step_time * (plan.total_steps - step),
            }
            mlog.log(record)
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     img_s=f"{images_per_s:.0f}", eta=metrics.format_eta(record["eta_s"]))
            window_start, window_steps = time.perf_counter(), 0
            loss_sum.zero_()
        if progress is not None:
            progress.update(1)

        if spec.eval.every_steps and step % spec.eval.every_steps == 0 and step < plan.total_steps and \
                spec.data.eval_split:
            last_eval = evaluate(engine, spec, info, rank, world_size, device, input_dtype(spec))
            mlog.log({"kind": "eval", "step": step, **last_eval})
        if spec.checkpoint.every_steps and step % spec.checkpoint.every_steps == 0:
            save(step)

    if step < plan.total_steps:  # stopped on request (run.stop_after): leave a checkpoint to resume from
        if not spec.checkpoint.every_steps or step % spec.checkpoint.every_steps:
            save(step)
        store.wait()
        mlog.close()
        if progress is not None:
            progress.close()
        dist.barrier()
        return {"step": step, "eval": last_eval, "export": None, "stopped": True}

    # Finish: a last evaluation, a last checkpoint, an fp32 export of the weights.
    if spec.data.eval_split:
        last_eval = evaluate(engine, spec, info, rank, world_size, device, input_dtype(spec))
        mlog.log({"kind": "eval", "step": step, **last_eval})
    if not spec.checkpoint.every_steps or step % spec.checkpoint.every_steps:
        save(step)
    store.wait()
    dist.barrier()
    export_url = None
    if rank == 0:
        from pipeline.checkpoint import export

        export_url = export(spec.run.url, storage.join(spec.run.url, "exports", f"step-{step:09d}.safetensors"))
        log.info("exported %s", export_url)
    mlog.close()
    if progress is not None:
        progress.close()
    dist.barrier()
    return {"step": step, "eval": last_eval, "export": export_url}


def init_distributed() -> None:
    """Join (or, under torchrun, create) the process group DeepSpeed will use.

    On CPU, DeepSpeed compiles a shared-memory all-reduce the first time it starts (over a minute) and compiles it
    again whenever another process left a differently built copy in the shared cache; gloo's own all-reduce is what
    CPU runs use instead."""
    import deepspeed
    import deepspeed.ops

    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def stream_config(spec: Spec) -> data.StreamConfig:
    d = spec.data
    return data.StreamConfig(
        split=d.train_split, seed=spec.seed, global_batch=spec.batch.global_, streams=d.streams,
        image_size=spec.model.image_size, crop_scale=d.crop_scale, flip=d.flip,
        randaug_layers=d.randaug.layers, randaug_magnitude=d.randaug.magnitude, mixup=d.mixup,
        loader_workers=d.loader_workers,
    )


def input_dtype(spec: Spec) -> torch.dtype:
    """DeepSpeed's bf16 mode holds the model in bf16 and, unlike its fp16 mode, does not cast the inputs; it also
    turns an outer autocast off inside the engine. So images go in as bf16, and LayerNorm, GELU and the residual
    stream all run on bf16 tensors (statistics in fp32 inside the kernels), with fp32 master weights in the
    optimizer."""
    return torch.bfloat16 if spec.deepspeed.bf16 else torch.float32


def _progress(rank: int, start: int, total: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    from pipeline import launch

    spec = config_lib.load(args.spec, args.overrides)
    config_lib.absolute_local_paths(spec, os.getcwd())
    launch.preflight(spec, resume=not args.no_resume, resume_from=args.resume_from)
    if os.environ.get("RANK", "0") == "0":
        storage.write_bytes_atomic(storage.join(spec.run.url, "config.yaml"), spec.to_yaml().encode())
    train(spec, resume_from=args.resume_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
