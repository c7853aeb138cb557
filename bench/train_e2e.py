"""The trainer end to end: prepared shards -> `pipeline.data.TrainStream` with the paper's ImageNet-21k augmentation
(inception crop, flip, RandAugment 2/15, mixup 0.5) -> the trainer's own `train_step` through the DeepSpeed engine
(ZeRO-1; bf16 and `model.compile` on a GPU) -> optimizer steps, against bench/model.py's bare step of the same model
at the same batch (AdamW, synthetic tensors already on the device, compiled on a GPU): images/s of each, their
ratio, and the fraction of the end-to-end step spent waiting for the next batch. On a GPU, MFU against the card's
data-sheet dense bf16 peak (989 TFLOP/s for H100/H200), model FLOPs only (3 forward passes an image, no recompute).

The dataset is generated JPEGs (short side 256) written as shards; the trainer runs in this process as a world of
one (gloo on CPU, NCCL on a GPU). On CPU the defaults are the tiny variant at 32x32, eager, fp32.

    python bench/train_e2e.py                                      # CPU: tiny
    python bench/train_e2e.py --variant B/16 --batch 256 --loader-workers 10 --steps 40 --json out/e2e.json
    python bench/train_e2e.py --knobs        # also each knob of the lean engine step turned back, one at a time
    python bench/train_e2e.py --decode gpu   # views made on the device (on CPU: the same code on the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import model as bench_model  # noqa: E402
from loader import write_images  # noqa: E402

from pipeline import config, metrics, train  # noqa: E402

# Each knob of the lean engine step turned back to DeepSpeed's own choice, one at a time, then all together
# (`--knobs`): the images/s each one costs shows whether the lean default earns its place.
KNOBS = {
    "overlap_comm off": {"deepspeed": {"overlap_comm": False}},
    "check_overflow on": {"deepspeed": {"check_overflow": True}},
    "fp64 grad norm": {"deepspeed": {"fp32_grad_norm": False}},
    "not compiled": {"model": {"compile": False}},
    "all four": {"deepspeed": {"overlap_comm": False, "check_overflow": True, "fp32_grad_norm": False},
                 "model": {"compile": False}},
}


def spec_for(args: argparse.Namespace, dataset: str, run_url: str, on_gpu: bool,
             knob: dict | None = None) -> config.Spec:
    raw = {
        "model": {"variant": args.variant, "image_size": args.image_size, "compile": on_gpu and not args.eager,
                  "activation_checkpointing": args.activation_checkpointing},
        "data": {"dataset": dataset, "eval_split": None, "streams": 2 * max(1, args.loader_workers),
                 "loader_workers": args.loader_workers,
                 "randaug": {"layers": 2, "magnitude": 15}, "mixup": 0.5, "decode": args.decode},
        "optim": {"lr": 1e-3, "weight_decay": 0.1, "clip_grad_norm": 1.0},
        "schedule": {"warmup_steps": 1, "total_steps": args.warmup + args.steps},
        "batch": {"global": args.batch, "micro": args.batch},
        "deepspeed": {"zero_stage": args.zero_stage, "bf16": on_gpu},
        "cluster": {"workers": 1, "gpus_per_worker": int(on_gpu), "cpus_per_worker": os.cpu_count() or 1},
        "checkpoint": {"every_steps": 0},
        "run": {"url": run_url},
    }
    for section, values in (knob or {}).items():
        raw[section] = {**raw[section], **values}
    return config.from_dict(raw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def end_to_end(spec: config.Spec, warmup: int, steps: int) -> dict[str, float]:
    """The trainer's loop without logging or checkpoints: (images/s, fraction of the time in `next(batches)`)."""
    parts = train.build(spec)
    stream = parts.stream
    batches = iter(stream)
    waited = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            _sync(parts.device)
            started, waited = time.perf_counter(), 0.0
        t = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - t
        train.train_step(parts, batch)
    _sync(parts.device)
    wall = time.perf_counter() - started
    stream.close()
    return {"images_per_s": steps * spec.batch.global_ / wall, "data_wait": waited / wall, "wall_s": wall,
            "flops_per_image": parts.flops_per_image, "peak": parts.peak_flops}


def bare(spec: config.Spec, warmup: int, steps: int, device: torch.device) -> float:
    """images/s of bench/model.py's bare step of the same model at the same batch: forward, loss, backward, AdamW
    (in bf16, DeepSpeed's recipe: fp32 master weights), on tensors already on the device."""
    precision = "bf16" if spec.deepspeed.bf16 else "fp32"
    size, batch = spec.model.image_size, spec.batch.global_
    net = bench_model.build_ours(spec.model.variant, size, 1000, spec.model.gelu, device)
    net = bench_model.to_precision(net, precision)
    if spec.model.compile:
        bench_model.compile_model(net, "model")
    x, y = bench_model.random_batch(batch, size, 1000, device)
    step = bench_model.make_step(net, x, y, precision)
    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


def _world_of_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def main(argv: list[str] | None = None) -> int:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="B/16" if on_gpu else "tiny")
    parser.add_argument("--image-size", type=int, default=224 if on_gpu else 32)
    parser.add_argument("--batch", type=int, default=256 if on_gpu else 32)
    parser.add_argument("--steps", type=int, default=30 if on_gpu else 12)
    parser.add_argument("--warmup", type=int, default=10 if on_gpu else 3)
    parser.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1) if on_gpu else 2)
    parser.add_argument("--images", type=int, default=None, help="generated JPEGs (default: enough for the run)")
    parser.add_argument("--distinct", type=int, default=1000,
                        help="distinct pictures among the generated JPEGs (each takes 10 ms to draw)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="model.activation_checkpointing in the trainer (the bare step keeps its activations)")
    parser.add_argument("--eager", action="store_true", help="no torch.compile on a GPU")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--decode", choices=["cpu", "gpu"], default="cpu",
                        help="data.decode: views made in the loader processes, or on the device (nvJPEG)")
    parser.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=1)
    parser.add_argument("--knobs", action="store_true",
                        help="also run each knob of the lean engine step turned back, one at a time (see KNOBS)")
    args = parser.parse_args(argv)
    images = args.images or max(800, (args.warmup + args.steps) * args.batch)
    _world_of_one()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as root:
        info = write_images(root, images, distinct=args.distinct)
        spec = spec_for(args, info.url, os.path.join(root, "run"), on_gpu)
        e2e = end_to_end(spec, args.warmup, args.steps)
        knobs = {}
        for i, (name, knob) in enumerate(KNOBS.items() if args.knobs else []):
            knobs[name] = end_to_end(spec_for(args, info.url, os.path.join(root, f"run-{i}"), on_gpu, knob),
                                     args.warmup, args.steps)["images_per_s"]
    alone = bare(spec, args.warmup, args.steps, device)
    result = report(args, spec, e2e, alone, on_gpu)
    if knobs:
        result["knobs"] = report_knobs(e2e["images_per_s"], knobs)
    bench_model.write_atomic(args.json, json.dumps(result, indent=2))
    return 0


def report(args: argparse.Namespace, spec: config.Spec, e2e: dict[str, float], alone: float,
           on_gpu: bool) -> dict:
    ratio = e2e["images_per_s"] / alone
    print(f"{args.variant} at {args.image_size}, batch {args.batch}, {args.loader_workers} loader processes, "
          f"{'GPU' if on_gpu else 'CPU'}{' compiled' if spec.model.compile else ''}, views made on the "
          f"{'device' if args.decode == 'gpu' else 'CPU'}")
    print(f"end to end (shards -> DeepSpeed step): {e2e['images_per_s']:9.1f} images/s, waiting for data "
          f"{e2e['data_wait']:.1%} of the time")
    print(f"bare step (model + AdamW):             {alone:9.1f} images/s")
    print(f"ratio end to end / bare: {ratio:.3f} (target >= 0.95)")
    result = {"name": "train e2e", "ours": round(e2e["images_per_s"], 2), "baseline": round(alone, 2),
              "unit": "images/s", "ratio": round(ratio, 4), "data_wait": round(e2e["data_wait"], 4),
              "variant": args.variant, "image_size": args.image_size, "batch": args.batch,
              "loader_workers": args.loader_workers, "decode": args.decode,
              "activation_checkpointing": args.activation_checkpointing,
              "device": torch.cuda.get_device_name(0) if on_gpu else "cpu"}
    peak = e2e["peak"]
    if peak:
        result["mfu_datasheet"] = round(metrics.mfu(e2e["images_per_s"], e2e["flops_per_image"], peak, 1), 4)
        print(f"MFU against the data-sheet dense bf16 peak ({peak / 1e12:.0f} TFLOP/s): {result['mfu_datasheet']:.1%}")
    return result


def report_knobs(lean: float, knobs: dict[str, float]) -> dict[str, dict[str, float]]:
    """The table of knobs: each one turned back, its images/s and its ratio to the lean step (below 1: the lean
    default helps)."""
    print(f"\n{'engine step':<22}{'images/s':>10}{'vs lean':>9}")
    print(f"{'lean (the default)':<22}{lean:>10.1f}{1.0:>9.3f}")
    rows = {}
    for name, value in knobs.items():
        rows[name] = {"images_per_s": round(value, 2), "vs_lean": round(value / lean, 4)}
        print(f"{name:<22}{value:>10.1f}{value / lean:>9.3f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
