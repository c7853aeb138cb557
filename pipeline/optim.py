"""What the optimizer does, from the spec: parameter groups, the learning-rate schedule, the DeepSpeed config."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from pipeline import deepspeed_compat
from pipeline.config import Spec

log = logging.getLogger(__name__)


@dataclass
class StepShape:
    """How the spec's batch and schedule fall on this world: decided once, before the engine is built."""

    total_steps: int
    steps_per_epoch: int
    micro_batches_per_rank: int  # DeepSpeed's gradient accumulation steps


def total_steps(spec: Spec, steps_per_epoch: int) -> int:
    """`schedule.total_steps`, or `schedule.epochs` (possibly fractional) of `steps_per_epoch`, the last one
    rounded up. Exact arithmetic: 0.55 epochs of 100 steps is 55 steps, not 56."""
    if spec.schedule.total_steps is not None:
        return spec.schedule.total_steps
    return math.ceil(Fraction(str(spec.schedule.epochs)) * steps_per_epoch)


def step_shape(spec: Spec, world_size: int, steps_per_epoch: int) -> StepShape:
    per_rank = spec.batch.global_ // world_size
    return StepShape(total_steps(spec, steps_per_epoch), steps_per_epoch, per_rank // spec.batch.micro)


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on kernels only: biases and LayerNorm parameters (all 1-d) are not decayed."""
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, spec: Spec, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) over the peak: a linear warmup whose first step is
    peak / warmup_steps and whose last reaches the peak, then linear or cosine decay that reaches `end_lr` at the
    last step (`total_steps - 1`) and stays there."""
    s = spec.schedule
    peak, end = spec.optim.lr, s.end_lr
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.decay == "constant":
        return 1.0
    decay_steps = max(1, total_steps - 1 - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / decay_steps)
    if s.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return (end + (peak - end) * shape) / peak


def deepspeed_config(spec: Spec, shape: StepShape, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of a run: batch split, clipping, ZeRO stage and its overlap, bf16 and its overflow test,
    and the optimizer for Adam (SGD is built by the trainer and handed to DeepSpeed)."""
    o, d = spec.optim, spec.deepspeed
    cfg: dict[str, Any] = {
        "train_batch_size": spec.batch.global_,
        "train_micro_batch_size_per_gpu": spec.batch.micro,
        "gradient_accumulation_steps": shape.micro_batches_per_rank,
        "gradient_clipping": o.clip_grad_norm or 0.0,
        "zero_optimization": {"stage": d.zero_stage, "overlap_comm": d.overlap_comm or d.zero_stage == 3},
        "bf16": {"enabled": d.bf16, "check_grad_overflow": d.check_overflow},
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


def build_engine(spec: Spec, net: torch.nn.Module, shape: StepShape, on_gpu: bool) -> Any:
    """The DeepSpeed engine, with the schedule of `lr_factor` stepped by the engine after each optimizer step."""
    import deepspeed

    deepspeed_compat.skip_muon_import()
    deepspeed_compat.grad_norm_in_fp32(spec.deepspeed.fp32_grad_norm)
    deepspeed_compat.clip_without_host_sync()
    if on_gpu and (arch_list := deepspeed_compat.arch_list_for_jit_builds()):
        log.info("TORCH_CUDA_ARCH_LIST=%s for DeepSpeed's op builds (it cannot parse family suffixes)", arch_list)
    optimizer = None
    if spec.optim.name == "sgd":
        optimizer = torch.optim.SGD(param_groups(net, spec.optim.weight_decay), lr=spec.optim.lr,
                                    momentum=spec.optim.momentum)
    engine, _, _, _ = deepspeed.initialize(
        model=net,
        model_parameters=param_groups(net, spec.optim.weight_decay),
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, spec, shape.total_steps)),
        config=deepspeed_config(spec, shape, on_gpu),
    )
    if spec.model.compile:
        engine.compile()
    return engine
