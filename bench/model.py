"""Training-step speed of our MlpMixer next to timm's, eager and compiled, plus the DeepSpeed ZeRO-1 overhead.

A step is forward, cross-entropy, backward and an AdamW step on a fixed random batch. Each model trains in the
precision recipe of its own training script (`--precision auto`): ours as pipeline/train.py runs it under DeepSpeed's
bf16 mode (bf16 weights, inputs and gradients, fp32 master weights and AdamW state, no autocast: the engine turns
an outer autocast off), timm's as its train.py runs it with `--amp` (fp32 weights, bf16 autocast); on CPU both in
fp32. `--cross` adds each model in the other's recipe, so the model and the recipe can be told apart.

Each row reports the median step time over `--iters` timed steps after `--warmup` untimed ones, images/s, peak
memory, achieved TFLOP/s and MFU. Training FLOPs are 3x the forward matmul FLOPs of `pipeline.model.forward_flops`;
the peak they are divided by is measured here, on the same device, with one large matmul, so MFU never depends on a
table of vendor figures.

    python bench/model.py                                            # GPU: B/16, L/16, H/14 at 224
    python bench/model.py --variants L/16 --modes compile --cross     # both recipes for both models
    python bench/model.py --device cpu --variants tiny --image-size 32 --batch 32 --json out.json
    python bench/model.py --report out.json                          # print the table of a saved run

Ours runs with exact GELU by default because timm's MlpMixer uses it (the official models use the tanh form).
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import json
import os
import platform
import socket
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMPLS = ("ours", "timm")
MODES = ("eager", "compile")
PRECISIONS = ("fp32", "amp", "bf16")
# Each implementation's own training recipe on GPU: pipeline/train.py runs DeepSpeed's bf16 mode, timm's train.py
# runs `--amp` (autocast over fp32 weights).
RECIPES = {"ours": "bf16", "timm": "amp"}
DEFAULT_BATCH = {"B/16": 512, "L/16": 256, "H/14": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--variants", default="B/16,L/16,H/14", help="comma-separated names from pipeline.model.VARIANTS")
    p.add_argument("--batch", default=None, help="one batch size, or one per variant (default: B/16 512, L/16 256, "
                                                  "H/14 128, others 64)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--impls", default=",".join(IMPLS), help="ours,timm")
    p.add_argument("--modes", default=",".join(MODES), help="eager,compile")
    p.add_argument("--compile-scope", default="block", choices=["block", "model"],
                   help="block: compile each Mixer block (compile time independent of depth); model: the whole net")
    p.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS,
                   help="auto: each model in its own script's recipe (GPU: ours bf16, timm amp; CPU: fp32). fp32: "
                        "no autocast; amp: fp32 weights, bf16 autocast; bf16: bf16 weights and inputs, fp32 master "
                        "weights, no autocast")
    p.add_argument("--cross", action="store_true", help="after the main rows, each model in the other's recipe "
                                                        "(GPU, --precision auto)")
    p.add_argument("--gelu", default="exact", choices=["exact", "tanh"], help="GELU of our model (timm: exact)")
    p.add_argument("--deepspeed", default="auto", choices=["auto", "off"],
                   help="auto: time a ZeRO-1 step of ours next to the plain step when deepspeed imports")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak rate (default 8192 GPU, "
                                                                 "1024 CPU)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; rows not started by then are skipped (and say so)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", dest="json_out", default=None, help="write all rows and the measured peak here "
                                                                  "(rewritten after every row)")
    p.add_argument("--table", dest="table_out", default=None, help="write the table here too (rewritten after every "
                                                                   "row)")
    p.add_argument("--report", default=None, metavar="JSON", help="only print the table of a saved run")
    p.add_argument("--no-table", action="store_true", help="print progress lines only, no final table")
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.batch is None:
        args.batch = ",".join(str(DEFAULT_BATCH.get(v, 64)) for v in args.variants)
    batches = [int(b) for b in args.batch.split(",") if b]
    if len(batches) == 1:
        batches = batches * len(args.variants)
    if len(batches) != len(args.variants):
        p.error(f"--batch: give one size or one per variant ({len(args.variants)}), got {args.batch!r}")
    args.batches = batches
    args.impls = [i for i in args.impls.split(",") if i]
    args.modes = [m for m in args.modes.split(",") if m]
    for name, values, known in (("--impls", args.impls, IMPLS), ("--modes", args.modes, MODES)):
        unknown = sorted(set(values) - set(known))
        if unknown:
            p.error(f"{name}: unknown {unknown}; known: {', '.join(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu")
    return args


# ---------------------------------------------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> tuple[list[float], float]:
    """Seconds per call for `iters` calls after `warmup` untimed ones, and the seconds the first call took (on a
    compiled model: the compilation)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    sync(device)
    if device.type == "cuda":
        # Events are recorded in the stream, so each pair brackets exactly one step's GPU work.
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in events], first
    clock = cpu_clock()
    times = []
    for _ in range(iters):
        t = clock()
        fn()
        times.append(clock() - t)
    return times, first


def cpu_clock() -> Callable[[], float]:
    """With one thread, the process's CPU time: on a machine shared with other jobs, time spent descheduled would
    otherwise count as step time, and ours and timm, timed one after the other, would see different loads."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def matmul_peak(device: torch.device, size: int, reps: int = 10) -> dict[str, Any]:
    """The device's dense matmul rate in FLOP/s, bf16 on GPU and fp32 on CPU: median over `reps` size^3 products."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times, _ = time_calls(functools.partial(torch.mm, a, b), device, warmup=3, iters=reps)
    median = statistics.median(times)
    return {"flops": 2 * size**3 / median, "size": size, "dtype": str(dtype).removeprefix("torch."),
            "median_s": median, "reps": reps}


# ---------------------------------------------------------------------------------------------------------------
# models


def build_ours(variant: str, image_size: int, num_classes: int, gelu: str, device: torch.device) -> nn.Module:
    from pipeline.model import build

    # Initialising on the device: an H/14 (431M parameters) takes seconds to initialise on the host.
    with device:
        return build(variant, num_classes=num_classes, image_size=image_size, gelu=gelu)


def build_timm(variant: str, image_size: int, num_classes: int, device: torch.device) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    from pipeline.model import VARIANTS

    cfg = VARIANTS[variant]
    ratios = (cfg.tokens_mlp_dim / cfg.hidden_dim, cfg.channels_mlp_dim / cfg.hidden_dim)
    with device:
        model = MlpMixer(num_classes=num_classes, img_size=image_size, patch_size=cfg.patch_size,
                         num_blocks=cfg.num_blocks, embed_dim=cfg.hidden_dim, mlp_ratio=ratios)
    dims = (model.blocks[0].mlp_tokens.fc1.out_features, model.blocks[0].mlp_channels.fc1.out_features)
    if dims != (cfg.tokens_mlp_dim, cfg.channels_mlp_dim):
        raise ValueError(f"{variant}: timm built MLP widths {dims}, the variant has "
                         f"{(cfg.tokens_mlp_dim, cfg.channels_mlp_dim)}")
    return model


def train_flops_per_image(variant: str, image_size: int, num_classes: int) -> tuple[float, float]:
    """(forward, training) matmul FLOPs per image; training = forward + 2x forward for the backward pass."""
    from pipeline.model import VARIANTS, forward_flops

    forward = float(forward_flops(VARIANTS[variant], image_size, num_classes))
    return forward, 3 * forward


def check_variants(variants: list[str], image_size: int) -> str | None:
    from pipeline.model import VARIANTS

    for name in variants:
        if name not in VARIANTS:
            return f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}"
        if image_size % VARIANTS[name].patch_size:
            return f"--image-size {image_size} is not divisible by the patch size {VARIANTS[name].patch_size} of {name}"
    return None


def compile_model(model: nn.Module, scope: str) -> None:
    """Compile in place. Per block, as torchtitan does: the blocks share one graph, so compile time stays flat
    from B/16 to H/14 while the fusions that matter (LayerNorm, GELU, bias, residual) happen inside a block."""
    if scope == "model":
        model.compile()
        return
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList | nn.Sequential):
        raise TypeError(f"{type(model).__name__} has no `blocks` list of modules to compile; use --compile-scope model")
    for block in blocks:
        block.compile()


# ---------------------------------------------------------------------------------------------------------------
# rows


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> Callable[[], None]:
    """One training step in `precision`; a "bf16" model must already hold bf16 weights (`to_precision`)."""
    fused = x.device.type == "cuda"
    if precision != "bf16":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

        def step() -> None:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "amp"):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    # What DeepSpeed's bf16 optimizer does each step, in multi-tensor kernels: bf16 gradients into fp32 buffers,
    # AdamW on the fp32 master weights, the result copied back into the bf16 weights.
    params = list(model.parameters())
    master = [p.detach().float().requires_grad_() for p in params]
    for m in master:
        m.grad = torch.zeros_like(m)
    master_grads = [m.grad for m in master]
    optimizer = torch.optim.AdamW(master, lr=1e-4, fused=fused)
    x = x.to(torch.bfloat16)

    def step() -> None:
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        torch._foreach_copy_(master_grads, [p.grad for p in params])
        optimizer.step()
        with torch.no_grad():
            torch._foreach_copy_(params, master)
        model.zero_grad(set_to_none=True)

    return step


def to_precision(model: nn.Module, precision: str) -> nn.Module:
    return model.to(torch.bfloat16) if precision == "bf16" else model


def random_batch(batch: int, image_size: int, num_classes: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(batch, 3, image_size, image_size, generator=g) * 2 - 1
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x.to(device), y.to(device)


def measure(step: Callable[[], None], args: argparse.Namespace, device: torch.device, batch: int,
            flops: tuple[float, float], peak: float) -> dict[str, Any]:
    times, first = time_calls(step, device, args.warmup, args.iters)
    step_s = statistics.median(times)
    images_per_s = batch / step_s
    achieved = images_per_s * flops[1]
    return {"status": "ok", "step_ms": step_s * 1e3, "step_ms_min": min(times) * 1e3, "images_per_s": images_per_s,
            "first_step_s": first, "fwd_flops_per_image": flops[0], "train_flops_per_image": flops[1],
            "tflops": achieved / 1e12, "mfu": achieved / peak,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def plain_row(args: argparse.Namespace, device: torch.device, variant: str, batch: int, impl: str, mode: str,
              precision: str, flops: tuple[float, float], peak: float) -> dict[str, Any]:
    if impl == "ours":
        model = build_ours(variant, args.image_size, args.num_classes, args.gelu, device)
    else:
        model = build_timm(variant, args.image_size, args.num_classes, device)
    model = to_precision(model, precision)
    if mode == "compile":
        compile_model(model, args.compile_scope)
    model.train()
    x, y = random_batch(batch, args.image_size, args.num_classes, device)
    return measure(make_step(model, x, y, precision), args, device, batch, flops, peak)


def deepspeed_row(args: argparse.Namespace, device: torch.device, variant: str, batch: int, precision: str,
                  flops: tuple[float, float], peak: float) -> dict[str, Any]:
    """Our eager model under a one-rank DeepSpeed ZeRO-1 engine configured as pipeline/train.py does ("bf16": the
    engine's bf16 mode, bf16 inputs; "amp": the engine's own `torch_autocast`, since it turns an outer autocast
    off), with the same torch AdamW as the plain row of the same precision, so the ratio is the engine's cost."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except Exception as e:  # an ImportError, or a broken install failing at import
        return {"status": "skipped", "reason": f"deepspeed does not import: {type(e).__name__}: {e}"}
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    model = build_ours(variant, args.image_size, args.num_classes, args.gelu, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    config = {"train_micro_batch_size_per_gpu": batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "bf16": {"enabled": precision == "bf16"},
              "torch_autocast": {"enabled": precision == "amp", "dtype": "bfloat16"},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x, y = random_batch(batch, args.image_size, args.num_classes, device)
    if precision == "bf16":
        x = x.to(torch.bfloat16)

    def step() -> None:
        engine.backward(F.cross_entropy(engine(x).float(), y))
        engine.step()

    row = measure(step, args, device, batch, flops, peak)
    row["deepspeed"] = deepspeed.__version__
    return row


def row_plan(args: argparse.Namespace, device: torch.device) -> list[tuple[str, int, str, str, str, bool]]:
    """(variant, batch, impl, mode, precision, main) in the order they run: every main row first, then DeepSpeed's,
    then the cross-recipe rows; a time budget cuts from the end."""
    def recipe(impl: str) -> str:
        if args.precision != "auto":
            return args.precision
        return RECIPES[impl] if device.type == "cuda" else "fp32"

    pairs = list(zip(args.variants, args.batches, strict=True))
    plan = [(variant, batch, impl, mode, recipe(impl), True)
            for variant, batch in pairs for mode in args.modes for impl in args.impls]
    if args.deepspeed == "auto" and "ours" in args.impls:
        plan += [(variant, batch, "ours", "deepspeed-zero1", recipe("ours"), False) for variant, batch in pairs]
    if args.cross and args.precision == "auto" and device.type == "cuda":
        swapped = {"ours": RECIPES["timm"], "timm": RECIPES["ours"]}
        plan += [(variant, batch, impl, mode, swapped[impl], False)
                 for variant, batch in pairs for mode in args.modes for impl in args.impls]
    return plan


def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run one row; an out-of-memory or any other failure becomes that row's status so the next rows still run."""
    try:
        row = fn()
    except torch.cuda.OutOfMemoryError as e:
        row = {"status": "oom", "reason": str(e).splitlines()[0]}
    except Exception as e:
        traceback.print_exc()
        row = {"status": "error", "reason": f"{type(e).__name__}: {e}".splitlines()[0]}
    # Only here, with the exception and its frames gone, are the failed row's tensors free to be released.
    free_memory(device)
    return row


# ---------------------------------------------------------------------------------------------------------------
# output


def clock_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA events"
    return "process CPU time" if cpu_clock() is time.process_time else "wall clock"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def write_atomic(path: str | None, text: str) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios for a `make bench` table, images/s of ours over timm's: per mode with each model in its own recipe
    (the main rows), the best of those per variant (ours best over timm's best), with `--cross` the best over every
    row and per mode with both models in one recipe, and the DeepSpeed step time over the plain one (lower is
    better)."""
    ok = {(r["variant"], r["impl"], r["mode"], r["precision"]): r for r in rows if r["status"] == "ok"}
    main = {k: r for k, r in ok.items() if r.get("main")}
    out = []

    def ratio_row(name: str, ours: dict[str, Any], timm: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "ours": ours["images_per_s"], "baseline": timm["images_per_s"], "unit": "images/s",
                "ratio": ours["images_per_s"] / timm["images_per_s"],
                "detail": f"ours {ours['mode']} {ours['precision']} vs timm {timm['mode']} {timm['precision']}"}

    def fastest(table: dict[tuple, dict[str, Any]], variant: str) -> dict[str, dict[str, Any] | None]:
        """Per impl, its fastest eager or compiled row of `variant` in `table`."""
        return {impl: max((r for (v, i, m, _), r in table.items() if (v, i) == (variant, impl) and m in MODES),
                          key=lambda r: r["images_per_s"], default=None) for impl in IMPLS}

    for variant in dict.fromkeys(k[0] for k in main):
        pairs = {}
        for (v, impl, mode, _), r in main.items():
            if v == variant:
                pairs.setdefault(mode, {})[impl] = r
        for mode, pair in pairs.items():
            if len(pair) == 2:
                out.append(ratio_row(f"model {variant} {mode}", pair["ours"], pair["timm"]))
        best = fastest(main, variant)
        if len(pairs) > 1 and best["ours"] and best["timm"]:
            out.append(ratio_row(f"model {variant} best", best["ours"], best["timm"]))
        # Over every row, either recipe: is ours ahead however timm is run?
        anyrow = fastest(ok, variant)
        if any(not r.get("main") for r in anyrow.values() if r) and anyrow["ours"] and anyrow["timm"]:
            out.append(ratio_row(f"model {variant} best any recipe", anyrow["ours"], anyrow["timm"]))
    for (variant, impl, mode, precision), r in ok.items():
        other = ok.get((variant, "timm", mode, precision))
        if impl == "ours" and other and not (r.get("main") and other.get("main")):
            out.append(ratio_row(f"model {variant} {mode} same recipe {precision}", r, other))
    for (variant, _, mode, _), r in ok.items():
        plain = next((p for (v, i, m, _), p in main.items() if (v, i, m) == (variant, "ours", "eager")), None)
        if mode == "deepspeed-zero1" and plain:
            out.append({"name": f"model {variant} deepspeed overhead", "ours": r["step_ms"],
                        "baseline": plain["step_ms"], "unit": "ms/step", "ratio": r["step_ms"] / plain["step_ms"],
                        "lower_is_better": True})
    return out


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    print_table(result, buf)
    return buf.getvalue()


def print_table(result: dict[str, Any], file=sys.stdout) -> None:
    peak = result["peak_matmul"]
    print(f"device: {result['device']} | torch {result['torch']} | timm {result.get('timm')} | {result['date']}",
          file=file)
    print(f"measured peak: {peak['flops'] / 1e12:.2f} TFLOP/s ({peak['dtype']} {peak['size']}^3 matmul, median of "
          f"{peak['reps']}); ours with {result['gelu_ours']} GELU; {result['compile_scope']}-wise compile; step "
          f"times by {result['clock']}; precision fp32 = no autocast, amp = fp32 weights + bf16 autocast, bf16 = "
          f"bf16 weights and inputs + fp32 master weights; * = each model in its own script's recipe",
          file=file)
    head = f"{'variant':<8}{'impl':<6}{'mode':<17}{'prec':<6}{'batch':>6}{'img/s':>10}{'step ms':>10}" \
           f"{'first s':>9}{'mem GiB':>9}{'TFLOP/s':>9}{'MFU':>7}  status"
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in result["rows"]:
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        # Runs saved before precision recipes existed name one dtype for all rows: "bf16 autocast" (amp) or "fp32".
        old = {"bf16 autocast": "amp"}.get(result.get("dtype"), result.get("dtype", "-"))
        prec = r.get("precision", old) + ("*" if r.get("main") else "")
        print(f"{r['variant']:<8}{r['impl']:<6}{r['mode']:<17}{prec:<6}{r['batch']:>6}"
              f"{_fmt(r.get('images_per_s'), '.1f'):>10}"
              f"{_fmt(r.get('step_ms'), '.2f'):>10}{_fmt(r.get('first_step_s'), '.1f'):>9}"
              f"{_fmt(r.get('peak_mem_gib'), '.2f'):>9}{_fmt(r.get('tflops'), '.2f'):>9}{mfu:>7}"
              f"  {status}", file=file)
    for s in result.get("summary", []):
        detail = f" ({s['detail']})" if s.get("detail") else ""
        print(f"{s['name']}: ours {s['ours']:.2f} vs {s['baseline']:.2f} {s['unit']} -> {s['ratio']:.3f}x{detail}",
              file=file)


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print_table(json.loads(Path(args.report).read_text()))
        return 0
    error = check_variants(args.variants, args.image_size)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # An explicit index: torch.cuda.set_device (called by DeepSpeed among others) rejects a bare "cuda".
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    start = time.monotonic()

    import timm

    peak = matmul_peak(device, args.peak_size or (8192 if device.type == "cuda" else 1024))
    free_memory(device)
    result: dict[str, Any] = {
        "device": device_name(device), "torch": torch.__version__, "timm": timm.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "image_size": args.image_size,
        "num_classes": args.num_classes, "gelu_ours": args.gelu, "compile_scope": args.compile_scope,
        "warmup": args.warmup, "iters": args.iters, "clock": clock_name(device), "peak_matmul": peak, "rows": [],
        "summary": [],
    }
    print(f"{result['device']}: measured {peak['flops'] / 1e12:.2f} TFLOP/s {peak['dtype']} matmul", flush=True)

    plan = row_plan(args, device)
    for variant, batch, impl, mode, precision, main_row in plan:
        row: dict[str, Any] = {"variant": variant, "impl": impl, "mode": mode, "precision": precision,
                               "main": main_row, "batch": batch}
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            row.update(status="skipped", reason=f"time budget of {args.time_budget:.0f}s spent")
        else:
            flops = train_flops_per_image(variant, args.image_size, args.num_classes)
            if mode == "deepspeed-zero1":
                run_row = functools.partial(deepspeed_row, args, device, variant, batch, precision, flops,
                                            peak["flops"])
            else:
                run_row = functools.partial(plain_row, args, device, variant, batch, impl, mode, precision, flops,
                                            peak["flops"])
            row.update(guarded(run_row, device))
        result["rows"].append(row)
        msg = (f"{row['images_per_s']:.1f} img/s, {row['step_ms']:.2f} ms/step, MFU {100 * row['mfu']:.1f}%"
               if row["status"] == "ok" else f"{row['status']}: {row.get('reason', '')}")
        print(f"{variant} {impl} {mode} {precision} batch {batch}: {msg}", flush=True)
        result["summary"] = summarise(result["rows"])
        write_atomic(args.json_out, json.dumps(result, indent=2) + "\n")
        write_atomic(args.table_out, table(result))

    if not args.no_table:
        print()
        print_table(result)
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
