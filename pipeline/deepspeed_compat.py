"""The DeepSpeed calls that reach past its public API, in one place. Checked against DeepSpeed 0.19.8.

Each function names what it relies on, so that a DeepSpeed upgrade is checked here and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import types
import warnings
from typing import Any

DEEPSPEED_VERSION_CHECKED = "0.19.8"


def quiet_deprecated_collectives() -> None:
    """Silence torch's FutureWarning for `all_gather_into_tensor` and `reduce_scatter_tensor`, which ZeRO calls on
    every step: the warning is about DeepSpeed's code, not the user's, and it is printed again at every step (two
    lines a rank a step in the run's log, all forwarded to the driver by Ray)."""
    deprecated = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
    warnings.filterwarnings("ignore", message=deprecated, category=FutureWarning)


MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def skip_muon_import() -> None:
    """Keep DeepSpeed from importing its Muon optimizer, which the trainer never uses (Adam or SGD). ZeRO's sanity
    check, its optimizers and their gradient reduction import `MuonWithAuxAdam` from `runtime.zero.muon.
    muon_optimizer` and `muon_update` from `runtime.zero.muon.original_muon` on every engine build and step, only
    to find that the optimizer is not one; and those imports compile Muon's kernels: torch.compile pulls in
    inductor, 3-4 s of CPU in every worker of every start. Stand-in modules answer those checks the same way."""
    if any(name in sys.modules for name in MUON_MODULES):
        return
    optimizer, original = (types.ModuleType(name) for name in MUON_MODULES)

    class MuonWithAuxAdam:
        """Never instantiated: no optimizer of the trainer's is one."""

    def muon_update(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("DeepSpeed's Muon was left out (pipeline.deepspeed_compat.skip_muon_import): the trainer "
                           "optimizes with Adam or SGD")

    optimizer.MuonWithAuxAdam = MuonWithAuxAdam
    original.muon_update = muon_update
    sys.modules.update(zip(MUON_MODULES, (optimizer, original), strict=True))


def universal_info_client_state() -> dict[str, Any]:
    """The client-state entry `ds_to_universal` requires before it converts a checkpoint. For a plain model (no
    tensor or pipeline parallelism) an empty record is enough."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    return {UNIVERSAL_CHECKPOINT_INFO: {}}


def load_checkpoint(engine: Any, root: str, tag: str, universal: bool) -> str | None:
    """`engine.load_checkpoint` of `root/tag`, optimizer and scheduler included; returns the path DeepSpeed loaded,
    or None when it found nothing.

    Relies on `engine._config.load_universal_checkpoint`, which DeepSpeed reads at load time only: switching it
    for this one load lets a run read a universal checkpoint without fixing that mode at initialize(). And mends
    two faults of ZeRO-3's universal load with more than one parameter group: it gives every group the settings of
    the checkpoint's first (weight decay on the biases and norms that have none), put back here as the engine was
    built with them (the same spec, so the same values); and it hands every group one and the same `step` tensor,
    which torch's Adam then advances once per group each step (a wrong bias correction from the first step on), so
    each group gets a copy of its own."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = getattr(inner, "param_groups", []) if universal else []
    own = {key: [g.get(key) for g in groups] for key in (groups[0] if groups else {})
           if key != "params" and len({repr(g.get(key)) for g in groups}) > 1}
    previous = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = previous
    for key, values in own.items():
        for group, value in zip(groups, values, strict=True):
            group[key] = value
    if universal:
        for state in getattr(inner, "state", {}).values():
            if hasattr(state.get("step"), "clone"):
                state["step"] = state["step"].clone()
    return path


def to_universal(src: str, out: str) -> None:
    """Convert the DeepSpeed checkpoint folder `src` (one tag) into a universal checkpoint at `out`.

    Relies on `ds_to_universal.main` taking the argparse namespace of its own command line."""
    from deepspeed.checkpoint import ds_to_universal

    # One worker: the converter's process pools do not mix with the threads of a running training process.
    args = argparse.Namespace(input_folder=src, output_folder=out, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal.main(args)


def fp32_state_dict(root: str, tag: str, zero_stage: int) -> dict[str, Any]:
    """The full fp32 weights of the checkpoint `root/tag`, gathered from its ZeRO shards (stage 0: the module's own
    state dict). DeepSpeed's files are pickles: only a trusted run folder may be read this way."""
    import torch

    if zero_stage == 0:
        return torch.load(os.path.join(root, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                          weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)


def use_gloo_allreduce_on_cpu() -> None:
    """On CPU, DeepSpeed JIT-builds a shared-memory all-reduce the first time it starts (over a minute), and again
    whenever another process left a differently built copy in the shared cache; gloo's own all-reduce serves.

    Relies on `deepspeed.ops.__compatible_ops__`, the table DeepSpeed's CPU accelerator consults."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def arch_list_for_jit_builds() -> str | None:
    """Drop the family suffix of TORCH_CUDA_ARCH_LIST's entries in this process ("9.0a" -> "9.0", "+PTX" kept) and
    return the new list, or None when nothing changed. Images for Hopper and Blackwell set such lists, and DeepSpeed's
    JIT op builder (FusedAdam's, built by the first engine on each machine) sorts them as dotted integers and fails
    with "invalid literal for int() with base 10: '0a'". The ops it builds use no family-specific instructions.

    Relies on `OpBuilder.compute_capability_args` reading the variable when the op is first built."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return None
    entries = [re.sub(r"^(\d+\.\d+)[a-z]+", r"\1", cc) for cc in value.replace(" ", ";").split(";") if cc]
    fixed = ";".join(dict.fromkeys(entries))
    if fixed == value:
        return None
    os.environ["TORCH_CUDA_ARCH_LIST"] = fixed
    return fixed


_NORM_MODULES = ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3")


def grad_norm_in_fp32(enabled: bool) -> None:
    """ZeRO's gradient norm for clipping with each gradient converted to fp32 (`enabled`) or, DeepSpeed's own
    choice, fp64. fp64 writes a double-width copy of every gradient each step, and GPUs run fp64 at a fraction of
    fp32's rate; torch's clip_grad_norm_ accumulates in the gradients' own dtype, fp32 here.

    Relies on the ZeRO optimizers calling `get_norm_dtype` through their own module's global name."""
    import torch
    from deepspeed.runtime.zero import utils

    for name in _NORM_MODULES:
        module = importlib.import_module(name)
        module.get_norm_dtype = (lambda: torch.float32) if enabled else utils.get_norm_dtype


# DeepSpeed's own methods where a function here took their place, kept to compare with.
REPLACED: dict[str, Any] = {}


def _unscale_and_clip_on_device(self: Any, grad_groups_flat: list, total_norm: Any) -> None:
    """DeepSpeed's arithmetic, with an invalid norm (inf, nan, or its -1 sentinel) replaced by inf on the device, so
    that the gradients are zeroed as DeepSpeed zeroes them, without asking the host first."""
    import torch

    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        norm = torch.as_tensor(total_norm, dtype=torch.float, device=self.device)
        norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, float("inf")))
        clip = torch.clamp(((norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


def clip_without_host_sync() -> None:
    """ZeRO 1-2 clip the gradients without the host sync DeepSpeed adds to every step: before it scales them it asks
    the host whether the norm is valid (`is_invalid_grad_norm`, a `bool()` of a device tensor), which holds the host
    until the GPU has finished the backward pass, so the next batch and the next step's kernels are not queued while
    the optimizer runs. The same arithmetic on the device instead (`_unscale_and_clip_on_device`).

    Relies on `DeepSpeedZeroOptimizer.unscale_and_clip_grads(grad_groups_flat, total_norm)` and the optimizer's
    `clip_grad`, `loss_scale` and `device`. ZeRO-3 decides on the host whether to skip a step with an invalid norm,
    so its sync stays."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    REPLACED.setdefault("DeepSpeedZeroOptimizer.unscale_and_clip_grads", DeepSpeedZeroOptimizer.unscale_and_clip_grads)
    DeepSpeedZeroOptimizer.unscale_and_clip_grads = _unscale_and_clip_on_device
