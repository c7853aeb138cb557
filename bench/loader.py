"""Loader throughput per core: pipeline.data's shard stream against torchvision ImageFolder + DataLoader.

Both sides read the same generated JPEGs (short side 256) from a temporary folder, as a folder tree for ImageFolder
and as tar shards + dataset.json for ours, and produce float batches in [-1, 1] of inception crops (224) with random
horizontal flips, with the same number of loader processes. The "+ randaug" rows add the ImageNet-21k specs'
augmentation on both sides: RandAugment with 2 layers at magnitude 20 (torchvision's `transforms.RandAugment(2, 20)`
on the baseline's PIL images) and mixup 0.5 (torchvision's `v2.MixUp(alpha=0.5)` on each baseline batch).
Throughput is divided by the cores busy: the CPU seconds of the main process and its loader processes together,
over the wall time.

    python bench/loader.py --images 1500 --json out/bench-loader.json
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import data  # noqa: E402
from pipeline.dataset_json import DatasetInfo, Shard, Split, save  # noqa: E402

CLASSES = 10
SHARD_SAMPLES = 100
SIDES = ("baseline", "ours", "baseline + randaug", "ours + randaug")


def _photo(rng: np.random.Generator) -> Image.Image:
    """A JPEG-friendly picture: smooth colour waves, a few flat rectangles and sensor-like noise; short side 256."""
    long = int(rng.integers(256, 400))
    h, w = (256, long) if rng.random() < 0.7 else (long, 256)
    x, y = np.arange(w, dtype=np.float32)[:, None], np.arange(h, dtype=np.float32)[:, None]
    waves_x = np.sin(x * rng.uniform(0.005, 0.05, 3) + rng.uniform(0, 6.3, 3))  # [w, 3]
    waves_y = np.sin(y * rng.uniform(0.005, 0.05, 3) + rng.uniform(0, 6.3, 3))  # [h, 3]
    img = 127 + 60 * waves_x[None] + 50 * waves_y[:, None]
    for _ in range(4):
        top, left = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[top:top + rng.integers(20, 120), left:left + rng.integers(20, 120)] = rng.integers(0, 256, 3)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_images(root: str, n: int, distinct: int | None = None) -> DatasetInfo:
    """The same JPEGs as `root/folder/<class>/<key>.jpg` and as shards under `root/shards`; with `distinct`, only that
    many pictures are drawn (10 ms each) and repeated under new keys, for runs that need many samples quickly."""
    rng = np.random.default_rng(0)
    drawn: list[bytes] = []
    shards_dir = os.path.join(root, "shards")
    os.makedirs(shards_dir)
    shards, tar = [], None
    for i in range(n):
        if distinct is None or len(drawn) < distinct:
            buf = io.BytesIO()
            _photo(rng).save(buf, "JPEG", quality=90)
            drawn.append(buf.getvalue())
        jpeg, label, key = drawn[i % len(drawn)], i % CLASSES, f"img{i:06d}"
        folder = os.path.join(root, "folder", f"class{label:02d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{key}.jpg"), "wb") as f:
            f.write(jpeg)
        if i % SHARD_SAMPLES == 0:
            name = f"train-{i // SHARD_SAMPLES:06d}.tar"
            tar = tarfile.open(os.path.join(shards_dir, name), "w")
            shards.append(Shard(name, 0, 0, ""))
        for ext, payload in (("jpg", jpeg), ("cls", str(label).encode())):
            member = tarfile.TarInfo(f"{key}.{ext}")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
        shards[-1].samples += 1
        if (i + 1) % SHARD_SAMPLES == 0 or i + 1 == n:
            tar.close()
            shards[-1].bytes = os.path.getsize(os.path.join(shards_dir, shards[-1].name))
    info = DatasetInfo(url=shards_dir, classes=[f"class{c:02d}" for c in range(CLASSES)], multi_label=False,
                       splits={"train": Split(shards)})
    save(info)
    return info


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (loader processes, once joined)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(batches: Callable[[], Iterable[torch.Tensor]]) -> dict[str, float]:
    cpu, wall = _cpu_seconds(), time.perf_counter()
    images = sum(len(b) for b in batches())
    cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
    return {"images": images, "wall_s": wall, "cpu_s": cpu, "cores": cpu / wall, "images_per_s": images / wall,
            "images_per_s_per_core": images / cpu}


def ours(info: DatasetInfo, workers: int, batch: int, randaug: bool) -> Iterable[torch.Tensor]:
    cfg = data.StreamConfig(split="train", seed=0, global_batch=batch, streams=8, image_size=224,
                            loader_workers=workers, randaug_layers=2 if randaug else 0,
                            randaug_magnitude=20 if randaug else 0, mixup=0.5 if randaug else 0.0)
    stream = data.TrainStream(info, cfg, 0, 1)
    for _ in range(stream.batches_per_epoch):
        yield next(stream).images
    stream.close()


def baseline(root: str, workers: int, batch: int, randaug: bool) -> Iterable[torch.Tensor]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms
    from torchvision.transforms import v2

    augment = [transforms.RandAugment(2, 20)] if randaug else []
    transform = transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), *augment, transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    mixup = v2.MixUp(alpha=0.5, num_classes=CLASSES) if randaug else None
    folder = datasets.ImageFolder(os.path.join(root, "folder"), transform=transform)
    for images, labels in DataLoader(folder, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True):
        yield images if mixup is None else mixup(images, labels)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--workers", type=int, default=2,
                        help="loader processes, on both sides (0: in this process, on one thread: the per-core "
                        "figure of one loader process without the cost of handing batches between processes)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; the best counts")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    if args.workers == 0:
        torch.set_num_threads(1)
    if args.images < 8 * SHARD_SAMPLES:
        parser.error(f"--images must be at least {8 * SHARD_SAMPLES}: the stream reads 8 streams of whole shards")

    with tempfile.TemporaryDirectory(prefix="bench-loader-") as root:
        t = time.perf_counter()
        info = write_images(root, args.images)
        print(f"wrote {args.images} JPEGs (folder tree and {len(info.split('train').shards)} shards) "
              f"in {time.perf_counter() - t:.1f}s")
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
        for _ in range(args.repeats):
            for side in SIDES:
                produce = baseline if side.startswith("baseline") else ours
                randaug = side.endswith("randaug")
                target = root if produce is baseline else info
                runs[side].append(measure(functools.partial(produce, target, args.workers, args.batch, randaug)))
    best = {side: max(r, key=lambda m: m["images_per_s_per_core"]) for side, r in runs.items()}
    print(f"{'':18} {'images':>7} {'wall s':>7} {'cpu s':>7} {'cores':>6} {'img/s':>8} {'img/s/core':>11}")
    for side, m in best.items():
        print(f"{side:18} {m['images']:7d} {m['wall_s']:7.2f} {m['cpu_s']:7.2f} {m['cores']:6.2f} "
              f"{m['images_per_s']:8.1f} {m['images_per_s_per_core']:11.1f}")
    rows = []
    for name, suffix in (("loader", ""), ("loader + randaug 2/20, mixup 0.5", " + randaug")):
        ours_rate, base_rate = (best[f"{side}{suffix}"]["images_per_s_per_core"] for side in ("ours", "baseline"))
        rows.append({"name": name, "ours": ours_rate, "baseline": base_rate, "unit": "images/s/core",
                     "ratio": ours_rate / base_rate})
        print(f"{name}: ratio (per core) {ours_rate / base_rate:.2f}x with {args.workers} loader processes a side")
    if args.json:
        result = {"name": "loader", "summary": rows, "workers": args.workers, "images": args.images, "runs": runs}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
