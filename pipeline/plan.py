"""`mixer plan`: what a spec needs before it runs: memory per GPU under ZeRO 1, 2 and 3, steps, checkpoint size, time.

Model states, per parameter (the ZeRO paper's accounting). With bf16: the bf16 parameter (2 bytes) and gradient (2),
the fp32 master copy (4) and the optimizer state (Adam m and v: 8; momentum SGD: 4). Without bf16 (fp32, e.g. on
CPU) the parameter and gradient take 4 bytes each, and DeepSpeed's ZeRO optimizers still keep their own fp32 copy of
what they update (only at stage 0 does the optimizer work on the model's parameters directly). ZeRO-1 partitions the
master copy and the optimizer state over the N ranks, ZeRO-2 the gradients too, ZeRO-3 the parameters too. With
`deepspeed.offload_optimizer` the master copy and the optimizer state live in CPU memory instead. A checkpoint holds
the weights at the parameter dtype, the master copy and the optimizer state: 14 bytes per parameter with bf16 and
Adam, 16 in fp32 (for the quickstart's 87,880 parameters 1.41 MB; its committed step folder was 1.5 MB).

Activations, per image of the micro batch, counted from the Mixer's tensor shapes (S tokens, C channels, token-MLP
width D_S, channel-MLP width D_C, L blocks), at 2 bytes (bf16) or 4 (fp32): what autograd keeps for the backward
pass. Each block keeps the outputs of its two LayerNorms (2 x S x C), the token and channel MLP hidden activations
before and after GELU (2 x D_S x C + 2 x S x D_C) and the LayerNorms' inputs (2 x S x C); the stem keeps the image,
the head the last LayerNorm's input plus another S x C as a margin for the norms' statistics and the pooled
features, and the fp32 logits. The trainer's bf16 mode runs a bf16 module without autocast, so all of these are 2
bytes. tests/test_plan.py checks the count against the tensors autograd saves, in fp32 and in bf16: the estimate is
at most 2% above them, never below. With activation checkpointing each block keeps only its input (S x C) and one
block's activations are alive at a time, while it is recomputed: an upper bound (it counts a recomputed block in
full). Left out are transient buffers (DeepSpeed's reduce/gather buckets, the CUDA context, allocator
fragmentation): a plan over 90% of the GPU's memory is flagged as tight.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass

from pipeline import config as config_lib
from pipeline import dataset_json, storage
from pipeline.config import Spec
from pipeline.data import batches_per_epoch
from pipeline.dataset_json import DatasetInfo
from pipeline.errors import MixerError
from pipeline.model import VARIANTS, MixerConfig, count_params, num_tokens
from pipeline.optim import total_steps
from pipeline.units import format_duration, format_size

GiB = 2**30
NATIVE_IMAGE_SIZE = 224  # the resolution official and pre-training checkpoints are saved at
TIGHT_FRACTION = 0.9


class EstimateError(MixerError):
    """A plan that cannot be made from what is known; the message says which option to add."""


@dataclass
class BytesPerParam:
    param: int
    grad: int
    master: int
    optim: int


@dataclass
class StageMemory:
    """Bytes per GPU for one ZeRO stage."""

    stage: int
    params: float
    grads: float
    optimizer: float  # fp32 master copy + optimizer state
    activations: float
    activations_checkpointed: float

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    def total(self, checkpointing: bool) -> float:
        return self.model_states + (self.activations_checkpointed if checkpointing else self.activations)


@dataclass
class ResourcePlan:
    spec_path: str
    variant: str
    image_size: int
    num_classes: int
    num_params: int
    gpus: int
    micro_batch: int
    global_batch: int
    bytes_per_param: BytesPerParam
    stages: list[StageMemory]  # ZeRO 1, 2, 3
    this_spec: StageMemory  # the spec's own ZeRO stage
    unpartitioned: StageMemory  # ZeRO-0: every GPU holds all the model states
    train_samples: int | None
    steps: int | None  # None: the train split size is unknown
    unknown_steps_reason: str
    checkpoint_bytes: int
    export_bytes: int
    images_per_s_per_gpu: float | None
    gpu_memory_gib: float | None

    @property
    def wall_time_s(self) -> float | None:
        if not self.images_per_s_per_gpu or self.steps is None:
            return None
        return self.steps * self.global_batch / (self.images_per_s_per_gpu * self.gpus)


def bytes_per_param(spec: Spec) -> BytesPerParam:
    width = 2 if spec.deepspeed.bf16 else 4
    return BytesPerParam(param=width, grad=width, master=4, optim=8 if spec.optim.name == "adam" else 4)


def model_config(spec: Spec) -> MixerConfig:
    """The Mixer the trainer will build. Weights loaded from model.init at a larger image size are expanded from the
    native 224 px (paper Appendix C): the token-MLP width grows by k^2."""
    cfg = VARIANTS[spec.model.variant]
    if spec.model.init and spec.model.image_size > NATIVE_IMAGE_SIZE:
        k = spec.model.image_size // NATIVE_IMAGE_SIZE
        cfg = dataclasses.replace(cfg, tokens_mlp_dim=cfg.tokens_mlp_dim * k * k)
    return cfg


def activation_bytes(cfg: MixerConfig, image_size: int, num_classes: int, micro_batch: int, element_bytes: int,
                     checkpointing: bool) -> float:
    """Bytes autograd keeps for one micro batch (see the module docstring for what is counted)."""
    s, c = num_tokens(cfg, image_size), cfg.hidden_dim
    per_block = (4 * s * c + 2 * cfg.tokens_mlp_dim * c + 2 * s * cfg.channels_mlp_dim) * element_bytes
    stem = 3 * image_size * image_size * element_bytes
    head = 2 * s * c * element_bytes
    if checkpointing:
        blocks = cfg.num_blocks * s * c * element_bytes + per_block
    else:
        blocks = cfg.num_blocks * per_block
    logits = 4 * num_classes  # fp32 for the loss
    return micro_batch * (stem + blocks + head + logits)


def stage_memory(stage: int, num_params: int, bpp: BytesPerParam, gpus: int, offload_optimizer: bool,
                 activations: float, activations_checkpointed: float) -> StageMemory:
    params = num_params * bpp.param / (gpus if stage >= 3 else 1)
    grads = num_params * bpp.grad / (gpus if stage >= 2 else 1)
    master = 0 if stage == 0 and bpp.param == 4 else bpp.master
    optimizer = 0.0 if offload_optimizer else num_params * (master + bpp.optim) / (gpus if stage >= 1 else 1)
    return StageMemory(stage, params, grads, optimizer, activations, activations_checkpointed)


def read_dataset(spec: Spec) -> tuple[DatasetInfo | None, str]:
    """The dataset's description, or None and why it could not be read."""
    try:
        return dataset_json.load(spec.data.dataset), ""
    except Exception as e:  # unreachable for any reason (no credentials, no bucket, not prepared): said in the plan
        return None, f"{spec.data.dataset}/dataset.json cannot be read ({type(e).__name__}: {e})"


def measured_images_per_s_per_gpu(run_url: str) -> float:
    """Median throughput of a run's logged train steps, per GPU (per worker on CPU runs)."""
    from pipeline.metrics import MetricsError, read_records

    try:
        records = read_records(run_url)
    except MetricsError as e:
        raise EstimateError(str(e)) from e
    speeds = [r["images_per_s"] for r in records if r.get("kind", "train") == "train" and r.get("images_per_s")]
    if not speeds:
        raise EstimateError(f"{run_url}/metrics.jsonl has no images_per_s yet; pass --images-per-sec instead")
    saved = storage.join(run_url, "config.yaml")
    try:
        import yaml

        run_spec = config_lib.from_dict(yaml.safe_load(storage.read_bytes(saved)))
    except FileNotFoundError as e:
        raise EstimateError(f"{saved} does not exist: cannot tell how many GPUs measured that throughput") from e
    devices = run_spec.cluster.workers * max(run_spec.cluster.gpus_per_worker, 1)
    return statistics.median(speeds) / devices


def plan_resources(spec: Spec, gpus: int, *, spec_path: str = "", gpu_memory_gib: float | None = None,
              images_per_s_per_gpu: float | None = None, train_samples: int | None = None,
              num_classes: int | None = None) -> ResourcePlan:
    if gpus <= 0:
        raise EstimateError(f"--gpus must be positive, got {gpus}")
    s = spec.schedule
    info, unreadable = None, ""
    if not (spec.model.num_classes or num_classes) or (s.total_steps is None and train_samples is None):
        info, unreadable = read_dataset(spec)
    classes = spec.model.num_classes or num_classes or (info.num_classes if info else None)
    if not classes:
        raise EstimateError(f"model.num_classes is not set and {unreadable}; pass --num-classes K")
    cfg = model_config(spec)
    n = count_params(cfg, spec.model.image_size, classes)
    bpp = bytes_per_param(spec)
    element = 2 if spec.deepspeed.bf16 else 4
    acts = activation_bytes(cfg, spec.model.image_size, classes, spec.batch.micro, element, False)
    acts_ckpt = activation_bytes(cfg, spec.model.image_size, classes, spec.batch.micro, element, True)
    stages = [stage_memory(z, n, bpp, gpus, spec.deepspeed.offload_optimizer, acts, acts_ckpt)
              for z in (1, 2, 3, spec.deepspeed.zero_stage, 0)]

    if s.total_steps is not None:
        steps, samples = s.total_steps, train_samples
    else:
        split = info.splits.get(spec.data.train_split) if info else None
        if info and split is None:
            unreadable = f"{spec.data.dataset} has no split {spec.data.train_split!r}"
        samples = train_samples or (split.samples if split else None)
        # As the trainer counts: whole global batches per epoch (the tails are dropped), epochs may be fractional.
        per_epoch = batches_per_epoch(samples, spec.data.streams, spec.batch.global_) if samples else 0
        steps = total_steps(spec, per_epoch) if samples else None

    # A DeepSpeed checkpoint holds the module weights (at the parameter dtype) and the optimizer shards (fp32 master
    # copy and state); the export is fp32 weights.
    checkpoint_bytes = n * (bpp.param + bpp.master + bpp.optim)
    return ResourcePlan(
        spec_path=spec_path, variant=spec.model.variant, image_size=spec.model.image_size, num_classes=classes,
        num_params=n, gpus=gpus, micro_batch=spec.batch.micro, global_batch=spec.batch.global_,
        bytes_per_param=bpp, stages=stages[:3], this_spec=stages[3], unpartitioned=stages[4],
        train_samples=samples, steps=steps, unknown_steps_reason=unreadable,
        checkpoint_bytes=checkpoint_bytes, export_bytes=4 * n,
        images_per_s_per_gpu=images_per_s_per_gpu, gpu_memory_gib=gpu_memory_gib,
    )


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _fit(total: float, gpu_memory_gib: float | None) -> str:
    if gpu_memory_gib is None:
        return ""
    if total > gpu_memory_gib * GiB:
        return "DOES NOT FIT"
    if total > TIGHT_FRACTION * gpu_memory_gib * GiB:
        return "tight"
    return "fits"


def _unpartitioned_line(plan: ResourcePlan, ckpt: bool) -> str:
    """ZeRO partitions the model states only to save memory, and each stage adds collectives to a step: say what
    no partitioning would take, so that a model whose states fit is not partitioned for nothing."""
    whole = plan.unpartitioned
    line = (f"without partitioning (ZeRO-0) the model states take {_gib(whole.model_states)} GiB per GPU, "
            f"{_gib(whole.total(ckpt))} GiB in all")
    if plan.gpu_memory_gib is None or whole.total(ckpt) > TIGHT_FRACTION * plan.gpu_memory_gib * GiB:
        return line
    return (f"{line}: that fits, so ZeRO saves memory this run does not need; measure ZeRO-0/1 against the spec's "
            "stage with bench/train_e2e.py before a long run (its per-step collectives are the cost)")


def render(plan: ResourcePlan, spec: Spec) -> str:
    b = plan.bytes_per_param
    dtype = "bf16" if spec.deepspeed.bf16 else "fp32"
    state = "Adam m,v" if spec.optim.name == "adam" else "SGD momentum"
    parts = [f"{dtype} param {b.param}", f"{dtype} grad {b.grad}", f"fp32 master {b.master}", f"{state} {b.optim}"]
    lines = [
        f"plan for {plan.spec_path or 'spec'}: Mixer-{plan.variant} at {plan.image_size} px, {plan.num_classes:,} "
        f"classes, micro batch {plan.micro_batch}, global batch {plan.global_batch}, {plan.gpus} GPUs",
        f"parameters: {plan.num_params:,}; {sum(vars(b).values())} bytes each while training ({' + '.join(parts)})",
    ]
    if spec.deepspeed.offload_optimizer:
        lines.append("optimizer offloaded to CPU: the master copy and optimizer state are not in GPU memory")
    header = (f"{'ZeRO':>4}  {'params':>8}  {'grads':>8}  {'optimizer':>9}  {'states':>8}  {'activations':>11}  "
              f"{'act.ckpt':>8}  {'total':>8}  {'total ckpt':>10}")
    if plan.gpu_memory_gib:
        header += f"  fits {plan.gpu_memory_gib:g} GiB (no ckpt / ckpt)"
    lines += ["", "memory per GPU (GiB)", header]
    for st in plan.stages:
        row = (f"{st.stage:>4}  {_gib(st.params):>8}  {_gib(st.grads):>8}  {_gib(st.optimizer):>9}  "
               f"{_gib(st.model_states):>8}  {_gib(st.activations):>11}  {_gib(st.activations_checkpointed):>8}  "
               f"{_gib(st.total(False)):>8}  {_gib(st.total(True)):>10}")
        if plan.gpu_memory_gib:
            row += f"  {_fit(st.total(False), plan.gpu_memory_gib)} / {_fit(st.total(True), plan.gpu_memory_gib)}"
        lines.append(row)
    chosen = plan.this_spec
    ckpt = spec.model.activation_checkpointing
    lines.append(f"this spec: ZeRO-{spec.deepspeed.zero_stage}, activation checkpointing "
                 f"{'on' if ckpt else 'off'}: {_gib(chosen.total(ckpt))} GiB per GPU "
                 f"{_fit(chosen.total(ckpt), plan.gpu_memory_gib)}".rstrip())
    lines.append(_unpartitioned_line(plan, ckpt))
    lines.append("")
    s = spec.schedule
    if s.total_steps is not None:
        lines.append(f"steps: {plan.steps:,} (schedule.total_steps), warmup {s.warmup_steps:,}")
    elif plan.steps is None:
        lines.append(f"steps: unknown: {plan.unknown_steps_reason}; pass --train-samples N")
    else:
        lines.append(f"steps: {plan.steps:,} = {s.epochs:g} epochs x {plan.train_samples:,} samples // "
                     f"{plan.global_batch} per step, warmup {s.warmup_steps:,}")
    lines.append(f"checkpoint: {format_size(plan.checkpoint_bytes)} per step "
                 f"(weights {format_size(plan.num_params * b.param)} + optimizer "
                 f"{format_size(plan.num_params * (b.master + b.optim))}); "
                 f"fp32 export {format_size(plan.export_bytes)}")
    if plan.steps is None:
        lines.append("time: unknown without the number of steps")
    elif plan.wall_time_s is not None:
        total = plan.images_per_s_per_gpu * plan.gpus
        lines.append(f"time: {format_duration(plan.wall_time_s)} at {plan.images_per_s_per_gpu:,.1f} images/s per "
                     f"GPU x {plan.gpus} = {total:,.0f} images/s (assumes linear scaling)")
    else:
        lines.append("time: pass --images-per-sec X (per GPU) or --from-run RUN to estimate the wall time")
    return "\n".join(lines)


def to_json(plan: ResourcePlan) -> str:
    d = dataclasses.asdict(plan)
    d["wall_time_s"] = plan.wall_time_s
    return json.dumps(d, indent=2)
