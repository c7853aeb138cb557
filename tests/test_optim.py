"""pipeline.optim: the learning-rate schedule, the step shape, the DeepSpeed config and the weight-decay groups."""

from __future__ import annotations

import math
import os
from fractions import Fraction

import pytest
import torch

from pipeline import config, model
from pipeline.optim import StepShape, deepspeed_config, lr_factor, param_groups, step_shape

PEAK, END = 3e-3, 1e-4


def make_spec(**sections) -> config.Spec:
    """A minimal valid spec; each keyword is a section whose keys replace the defaults below."""
    raw = {
        "model": {"variant": "tiny", "image_size": 32},
        "data": {"dataset": "ds", "streams": 8, "loader_workers": 0},
        "optim": {"lr": PEAK},
        "schedule": {"warmup_steps": 5, "total_steps": 60, "end_lr": END, "decay": "linear"},
        "batch": {"global": 64, "micro": 8},
        "run": {"url": "run"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section] = {**raw.get(section, {}), **values}
        else:
            raw[section] = values
    return config.from_dict(raw)


def factors(spec: config.Spec, total: int, extra: int = 0) -> list[float]:
    return [lr_factor(step, spec, total) for step in range(total + extra)]


# --- lr_factor -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_warmup_starts_at_one_over_warmup_steps_and_reaches_the_peak_on_its_last_step(decay):
    warmup = 5
    spec = make_spec(schedule={"warmup_steps": warmup, "decay": decay})
    assert lr_factor(0, spec, 60) == pytest.approx(1 / warmup, rel=1e-12)
    for step in range(warmup):
        assert lr_factor(step, spec, 60) == pytest.approx((step + 1) / warmup, rel=1e-12), step
    assert lr_factor(warmup - 1, spec, 60) == 1.0


@pytest.mark.parametrize("decay", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 5])
def test_decay_reaches_end_lr_on_the_last_step_and_stays_there(decay, warmup):
    total = 60
    spec = make_spec(schedule={"warmup_steps": warmup, "decay": decay})
    assert lr_factor(total - 2, spec, total) > END / PEAK  # not there one step early
    for step in (total - 1, total, total + 1, 10 * total):
        assert lr_factor(step, spec, total) == pytest.approx(END / PEAK, rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_decay_starts_from_the_peak_and_halfway_is_midway_between_peak_and_end(decay):
    # both shapes are symmetric about the middle of the decay: half way from the peak down to end_lr
    warmup, total = 5, 60  # decay from step 5 to step 59: the midpoint is step 32
    spec = make_spec(schedule={"warmup_steps": warmup, "decay": decay})
    assert lr_factor(warmup, spec, total) == pytest.approx(1.0, rel=1e-12)
    midpoint = warmup + (total - 1 - warmup) // 2
    assert lr_factor(midpoint, spec, total) == pytest.approx((END + (PEAK - END) * 0.5) / PEAK, rel=1e-12)


def test_linear_decay_falls_by_the_same_amount_each_step():
    warmup, total = 5, 60
    spec = make_spec(schedule={"warmup_steps": warmup, "decay": "linear"})
    drops = [a - b for a, b in zip(factors(spec, total)[warmup:], factors(spec, total)[warmup + 1:], strict=False)]
    assert drops == pytest.approx([(1 - END / PEAK) / (total - 1 - warmup)] * len(drops), rel=1e-9)


def test_cosine_decay_follows_the_cosine_between_peak_and_end():
    warmup, total = 4, 44
    spec = make_spec(schedule={"warmup_steps": warmup, "decay": "cosine"})
    span = total - 1 - warmup
    for step in range(warmup, total):
        shape = 0.5 * (1 + math.cos(math.pi * (step - warmup) / span))
        assert lr_factor(step, spec, total) == pytest.approx((END + (PEAK - END) * shape) / PEAK, rel=1e-9), step
    # a cosine is flat at both ends: the first and last steps of the decay move less than the middle one
    f = factors(spec, total)
    assert f[warmup] - f[warmup + 1] < f[warmup + span // 2] - f[warmup + span // 2 + 1]


def test_constant_holds_the_peak_after_warmup():
    spec = make_spec(schedule={"warmup_steps": 3, "decay": "constant"})
    assert factors(spec, 20, extra=5)[3:] == [1.0] * 22
    assert lr_factor(0, spec, 20) == pytest.approx(1 / 3)


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
def test_without_warmup_the_first_step_is_at_the_peak(decay):
    spec = make_spec(schedule={"warmup_steps": 0, "decay": decay})
    assert lr_factor(0, spec, 60) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_the_schedule_never_rises_after_warmup(decay, warmup):
    total = 50
    spec = make_spec(schedule={"warmup_steps": warmup, "decay": decay})
    after = factors(spec, total, extra=10)[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False)), after
    assert all(f > 0 for f in after)
    ramp = factors(spec, total)[:warmup]
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False)), ramp


def test_end_lr_zero_ends_at_zero():
    spec = make_spec(schedule={"end_lr": 0.0})
    assert lr_factor(59, spec, 60) == 0.0
    assert lr_factor(58, spec, 60) > 0.0


# --- step_shape ------------------------------------------------------------------------------------------------------


def test_total_steps_from_the_schedule_win_over_epochs():
    spec = make_spec(schedule={"total_steps": 123})
    shape = step_shape(spec, world_size=1, steps_per_epoch=7)
    assert (shape.total_steps, shape.steps_per_epoch) == (123, 7)


@pytest.mark.parametrize("epochs, steps_per_epoch", [(3, 10), (2.5, 7), (0.25, 10), (1, 1), (0.55, 100), (1.09, 200)])
def test_total_steps_from_epochs_round_up_a_fractional_last_epoch(epochs, steps_per_epoch):
    spec = make_spec(schedule={"warmup_steps": 0, "total_steps": None, "epochs": epochs})
    shape = step_shape(spec, world_size=1, steps_per_epoch=steps_per_epoch)
    # the rule, in exact arithmetic on the epochs as written: ceil(epochs x steps_per_epoch)
    assert shape.total_steps == math.ceil(Fraction(str(epochs)) * steps_per_epoch)
    assert shape.steps_per_epoch == steps_per_epoch


@pytest.mark.parametrize("world_size, workers", [(1, 1), (2, 2), (4, 4), (8, 8)])
def test_micro_batches_per_rank_split_the_global_batch(world_size, workers):
    glob, micro = 64, 8
    spec = make_spec(batch={"global": glob, "micro": micro}, cluster={"workers": workers, "cpus_per_worker": 1},
                     data={"streams": 8 * workers})
    shape = step_shape(spec, world_size, steps_per_epoch=10)
    assert shape.micro_batches_per_rank == glob // (micro * world_size)
    # every rank's micro batches over one optimizer step make up the global batch
    assert shape.micro_batches_per_rank * micro * world_size == glob


# --- deepspeed_config ------------------------------------------------------------------------------------------------


def test_deepspeed_config_of_an_adam_run():
    spec = make_spec(optim={"lr": 2e-3, "betas": [0.8, 0.95], "weight_decay": 0.05, "clip_grad_norm": 0.5},
                     deepspeed={"zero_stage": 3, "bf16": True})
    shape = StepShape(total_steps=60, steps_per_epoch=10, micro_batches_per_rank=4)
    cfg = deepspeed_config(spec, shape, on_gpu=False)
    assert cfg["train_batch_size"] == 64
    assert cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert cfg["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert cfg["optimizer"]["type"] == "AdamW"
    params = cfg["optimizer"]["params"]
    assert params["lr"] == 2e-3
    assert list(params["betas"]) == [0.8, 0.95]
    assert params["weight_decay"] == 0.05
    assert params["torch_adam"] is True  # DeepSpeed's fused Adam needs a GPU
    assert "zero_allow_untested_optimizer" not in cfg
    assert deepspeed_config(spec, shape, on_gpu=True)["optimizer"]["params"]["torch_adam"] is False


def test_deepspeed_config_follows_the_spec_flags():
    shape = StepShape(60, 10, 8)
    plain = deepspeed_config(make_spec(deepspeed={"zero_stage": 1, "bf16": False}), shape, on_gpu=False)
    assert plain["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert plain["bf16"]["enabled"] is False
    assert plain["gradient_clipping"] == 1.0  # the spec's default clip
    assert plain["gradient_accumulation_steps"] == 8


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_lean_knobs_reach_deepspeed_and_can_be_turned_back(stage):
    """Overlap and no per-step overflow test by default; off, ZeRO 1-2 reduce after backward (stage 3 always
    overlaps) and bf16 skips non-finite steps."""
    lean = deepspeed_config(make_spec(deepspeed={"zero_stage": stage, "bf16": True}), StepShape(60, 10, 8), True)
    assert lean["zero_optimization"]["overlap_comm"] is True
    assert lean["bf16"]["check_grad_overflow"] is False
    stock = deepspeed_config(make_spec(deepspeed={"zero_stage": stage, "bf16": True, "overlap_comm": False,
                                                  "check_overflow": True}), StepShape(60, 10, 8), True)
    assert stock["zero_optimization"]["overlap_comm"] is (stage == 3)
    assert stock["bf16"]["check_grad_overflow"] is True


def test_the_clipping_norm_dtype_follows_the_knob(monkeypatch):
    """build_engine sets the ZeRO optimizers' norm dtype from deepspeed.fp32_grad_norm before DeepSpeed builds them
    (`deepspeed.initialize` stands in here: the engine itself needs a process group)."""
    import deepspeed
    import deepspeed.runtime.zero.stage3 as stage3
    import deepspeed.runtime.zero.stage_1_and_2 as stage12

    from pipeline import deepspeed_compat, optim

    seen = []
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: seen.append(stage12.get_norm_dtype()) or (None,) * 4)
    net = model.build("tiny", num_classes=10, image_size=32)
    try:
        for fp32, dtype in ((True, torch.float32), (False, torch.float64)):  # float64: DeepSpeed's own
            optim.build_engine(make_spec(deepspeed={"fp32_grad_norm": fp32}), net, StepShape(60, 10, 8), False)
            assert seen[-1] == stage12.get_norm_dtype() == stage3.get_norm_dtype() == dtype
    finally:
        deepspeed_compat.grad_norm_in_fp32(True)


def test_no_clipping_is_zero_for_deepspeed():
    cfg = deepspeed_config(make_spec(optim={"clip_grad_norm": None}), StepShape(60, 10, 8), on_gpu=False)
    assert cfg["gradient_clipping"] == 0.0


@pytest.mark.parametrize("on_gpu", [False, True])
def test_sgd_brings_its_own_optimizer(on_gpu):
    cfg = deepspeed_config(make_spec(optim={"name": "sgd"}), StepShape(60, 10, 8), on_gpu=on_gpu)
    assert "optimizer" not in cfg
    assert cfg["zero_allow_untested_optimizer"] is True


@pytest.mark.parametrize("on_gpu", [False, True])
def test_offload_moves_the_optimizer_to_cpu_pinned_only_on_gpu(on_gpu):
    spec = make_spec(deepspeed={"offload_optimizer": True, "zero_stage": 2})
    cfg = deepspeed_config(spec, StepShape(60, 10, 8), on_gpu=on_gpu)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": on_gpu}
    assert "offload_optimizer" not in deepspeed_config(make_spec(), StepShape(60, 10, 8), on_gpu)["zero_optimization"]


@pytest.mark.parametrize("sections", [
    {},
    {"optim": {"clip_grad_norm": None, "weight_decay": 0.1}, "deepspeed": {"zero_stage": 3, "bf16": True}},
    {"optim": {"name": "sgd"}, "deepspeed": {"zero_stage": 1}},
    {"deepspeed": {"zero_stage": 2, "offload_optimizer": True}},
    {"deepspeed": {"zero_stage": 1, "bf16": True, "overlap_comm": False, "check_overflow": True}},
])
def test_deepspeed_accepts_the_config(sections):
    """DeepSpeed's own config parser reads the dict back (one process, no group: it takes the world size as 1)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    spec = make_spec(**sections)
    cfg = deepspeed_config(spec, step_shape(spec, world_size=1, steps_per_epoch=10), on_gpu=False)
    ds = DeepSpeedConfig(dict(cfg))
    assert ds.world_size == 1
    assert ds.train_batch_size == spec.batch.global_
    assert ds.train_micro_batch_size_per_gpu == spec.batch.micro
    assert ds.gradient_accumulation_steps == spec.batch.global_ // spec.batch.micro
    assert ds.zero_optimization_stage == spec.deepspeed.zero_stage
    assert ds.bfloat16_config.enabled == spec.deepspeed.bf16
    assert ds.gradient_clipping == (spec.optim.clip_grad_norm or 0.0)
    if spec.optim.name == "adam":
        assert ds.optimizer_name == "adamw"
        assert ds.optimizer_params["lr"] == spec.optim.lr
    else:
        assert ds.optimizer_name is None
        assert ds.zero_allow_untested_optimizer
    assert (ds.zero_config.offload_optimizer is not None) == spec.deepspeed.offload_optimizer
    assert ds.zero_config.overlap_comm == (spec.deepspeed.overlap_comm or spec.deepspeed.zero_stage == 3)
    assert ds.bfloat16_config.check_grad_overflow == spec.deepspeed.check_overflow


# --- param_groups ----------------------------------------------------------------------------------------------------


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def test_param_groups_decay_kernels_only():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 2), torch.nn.Flatten(), torch.nn.LayerNorm(4),
                              torch.nn.Linear(4, 3))
    conv, _, norm, fc = net
    decay, no_decay = param_groups(net, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    assert sorted(_ids(decay["params"])) == sorted(_ids([conv.weight, fc.weight]))
    assert sorted(_ids(no_decay["params"])) == sorted(_ids([conv.bias, norm.weight, norm.bias, fc.bias]))


def test_param_groups_of_a_mixer_hold_every_parameter_once():
    net = model.build("tiny", num_classes=5, image_size=32)
    groups = param_groups(net, weight_decay=0.1)
    assigned = [i for g in groups for i in _ids(g["params"])]
    assert sorted(assigned) == sorted(_ids(net.parameters()))  # each parameter in exactly one group
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    decayed = {i for g in groups if g["weight_decay"] == 0.1 for i in _ids(g["params"])}
    for name, module in net.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            is_kernel = isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and pname == "weight"
            assert (id(p) in decayed) == is_kernel, f"{name}.{pname} ({type(module).__name__})"
    assert len(decayed) > 0



def test_arch_list_suffixes_are_dropped_for_deepspeed_op_builds(monkeypatch):
    """A Hopper image's TORCH_CUDA_ARCH_LIST ("9.0a") made DeepSpeed's FusedAdam build fail on an H200; the trainer
    rewrites it so the JIT builder parses it."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    from pipeline import deepspeed_compat

    builder = FusedAdamBuilder()
    builder.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 9.0a;9.0;10.0f+PTX")
    with pytest.raises(ValueError, match="0a"):
        builder.compute_capability_args()
    assert deepspeed_compat.arch_list_for_jit_builds() == "8.0;9.0;10.0+PTX"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0+PTX"
    builder.compute_capability_args()
    assert deepspeed_compat.arch_list_for_jit_builds() is None
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert deepspeed_compat.arch_list_for_jit_builds() is None


@pytest.mark.parametrize("norm", [3.0, 0.5, float("inf"), float("nan"), -1.0])
def test_zero_clips_as_deepspeed_does_without_asking_the_host(norm, monkeypatch):
    """DeepSpeed's ZeRO 1-2 clipping reads the norm's validity on the host every step (a GPU sync); the replacement
    scales the gradients exactly as DeepSpeed's own code does, for valid norms and for each kind of invalid one,
    and never asks."""
    import types

    from deepspeed.runtime.zero import stage_1_and_2

    from pipeline import deepspeed_compat

    def run(method) -> list[torch.Tensor]:
        grads = [torch.linspace(-2, 2, 7), [torch.linspace(1, 3, 5), torch.full((3,), -4.0)]]
        flat = [grads[0], *grads[1]]
        me = types.SimpleNamespace(clip_grad=1.0, loss_scale=1.0, device=torch.device("cpu"))
        method(me, grads, torch.tensor(norm))
        return flat

    deepspeed_compat.clip_without_host_sync()  # as build_engine does; DeepSpeed's method is kept aside
    deepspeeds = run(deepspeed_compat.REPLACED["DeepSpeedZeroOptimizer.unscale_and_clip_grads"])
    monkeypatch.setattr(stage_1_and_2, "is_invalid_grad_norm", lambda n: pytest.fail("asked the host"))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: pytest.fail("asked the host"))
    ours = run(deepspeed_compat._unscale_and_clip_on_device)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(ours, deepspeeds, strict=True)), (ours, deepspeeds)
    if norm == 3.0:
        assert torch.allclose(ours[0], torch.linspace(-2, 2, 7) / (3.0 + 1e-6))
    if not norm >= 0 or norm == float("inf"):
        assert all(not t.any() for t in ours)  # an invalid norm zeroes the step's gradients


def test_build_engine_clips_without_a_host_sync(monkeypatch):
    """(`deepspeed.initialize` stands in, as above.)"""
    import deepspeed
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from pipeline import deepspeed_compat, optim

    deepspeed_compat.clip_without_host_sync()  # DeepSpeed's own method kept aside before it is taken away here
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "unscale_and_clip_grads", None)
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: (None,) * 4)
    optim.build_engine(make_spec(), model.build("tiny", num_classes=10, image_size=32), StepShape(60, 10, 8), False)
    assert DeepSpeedZeroOptimizer.unscale_and_clip_grads is deepspeed_compat._unscale_and_clip_on_device
