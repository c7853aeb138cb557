"""Data prep throughput per core: `mixer prepare` (Ray tasks) against a plain single-process PIL loop and
img2dataset.

Every side turns the same generated photo-like JPEGs (500x375 up to 1600x1200, quality 90) into JPEGs whose short
side is 256 (quality 95) inside tar shards. The baseline opens each file with PIL, resizes it with PIL's default
filter (bicubic), re-encodes it and writes it with webdataset's TarWriter; "baseline-bilinear" is the same loop with
PIL's antialiased bilinear filter (the cheapest antialiased one PIL has; ours resizes with OpenCV's fixed-point
bilinear kernel, after a blur where the ratio calls for one), for reference. Ours is `data_prep.prepare` with
Ray in-process, one task per shard. Per core means per CPU second: the CPU time of every process involved (for ours
the driver, Ray's own processes and its workers) over the images made, so other load on the machine does not count
against any side. The price in quality is printed too: each side's PSNR against a full-resolution Lanczos resize.

img2dataset (1.47.0, in its own environment: see bench/README.md) is the second baseline, run as a subprocess on
file:// URLs of the same photos with our settings: short side resized to 256 ("keep_ratio", no upscale), JPEG at
our quality, webdataset tars, 1 process x 4 threads (`--img2dataset-processes`), its default "area" filter. It gets
every advantage: no EXIF extraction and no per-image sha256 (its defaults do both), and one shard per process,
so that its pool never restarts a worker (it does so every 5 shards). Its CPU is that of every process it
starts. Each run starts its Python processes afresh (about 10 CPU seconds of imports on this kind of machine), so
the start-up, measured on a run of a few images, is reported and left out of its steady-state figure, as ours
leaves out Ray's start-up by warming up first.

    python bench/prep.py --images 2000 --json out/bench-prep.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import psutil
import ray
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_prep.dedup import build_index  # noqa: E402
from data_prep.images import ImagePolicy, process, target_size  # noqa: E402
from data_prep.prepare import PrepareOptions, prepare  # noqa: E402

CLASSES = 10
MAX_SIZE = 256
QUALITY = 95
SHARD_SIZE = 100
I2D_THREADS = 4
# Common camera and web sizes between 500x375 and 1600x1200, landscape and portrait.
SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200)]


def photo(seed: int) -> bytes:
    """A JPEG-friendly picture: smooth colour fields, a few hard-edged shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    if rng.random() < 0.25:
        w, h = h, w
    coarse = (rng.random((h // 64 + 2, w // 64 + 2, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
    pixels = np.asarray(im, np.int16)
    for _ in range(6):
        cy, cx, r = int(rng.integers(h)), int(rng.integers(w)), int(rng.integers(h // 20, h // 5))
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, h), max(cx - r, 0), min(cx + r, w)
        pixels[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    noise = rng.integers(-6, 7, (h, w, 1), dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_photos(root: str, n: int, first: int = 0) -> int:
    for c in range(CLASSES):
        os.makedirs(os.path.join(root, f"class{c:02d}"), exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        total = 0
        for i, data in enumerate(pool.imap(photo, range(first, first + n), chunksize=16)):
            with open(os.path.join(root, f"class{i % CLASSES:02d}", f"img{i:06d}.jpg"), "wb") as f:
                f.write(data)
            total += len(data)
    return total


def cpu_seconds(tree: bool) -> float:
    """CPU seconds used so far by this process, and with `tree` by every process below it (Ray's raylet, GCS,
    workers...)."""
    total = 0.0
    for p in [psutil.Process(), *(psutil.Process().children(recursive=True) if tree else [])]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def children_cpu() -> float:
    """CPU seconds of every child process of this one that has ended and been waited for, and of theirs."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def with_cpu(run, tree: bool) -> tuple[int, float]:
    cpu = cpu_seconds(tree)
    images = run()
    return images, cpu_seconds(tree) - cpu


def resize_loop(root: str, out: str, resample: Image.Resampling) -> int:
    """The baseline: open with PIL, resize, re-encode, write with webdataset's TarWriter, one file after another."""
    import webdataset as wds

    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    with wds.TarWriter(os.path.join(out, "baseline.tar")) as sink:
        for i, path in enumerate(files):
            sink.write({"__key__": f"{i:08d}", "jpg": baseline_jpeg(path, resample), "cls": str(i % CLASSES).encode()})
    return len(files)


def baseline_jpeg(path: str, resample: Image.Resampling) -> bytes:
    im = Image.open(path).convert("RGB")
    im = im.resize(target_size(*im.size, MAX_SIZE), resample)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def psnr(files: list[str], img2dataset: dict[str, bytes] | None) -> dict[str, float]:
    """Mean PSNR (dB) of each side's output against a full-resolution Lanczos resize of the same file.
    `img2dataset`: its output for each of `files`, when it ran."""
    sides: dict[str, list[float]] = {"baseline": [], "baseline-bilinear": [], "ours": []}
    if img2dataset is not None:
        sides["img2dataset"] = []
    for path in files:
        full = Image.open(path).convert("RGB")
        reference = np.asarray(full.resize(target_size(*full.size, MAX_SIZE), Image.Resampling.LANCZOS), np.float64)
        with open(path, "rb") as f:
            ours = process(f.read(), ImagePolicy(MAX_SIZE, QUALITY)).data
        outputs = {"baseline": baseline_jpeg(path, Image.Resampling.BICUBIC),
                   "baseline-bilinear": baseline_jpeg(path, Image.Resampling.BILINEAR), "ours": ours}
        if img2dataset is not None:
            outputs["img2dataset"] = img2dataset[path]
        for side, data in outputs.items():
            error = np.mean((np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64) - reference) ** 2)
            sides[side].append(10 * np.log10(255.0**2 / error))
    return {side: round(float(np.mean(v)), 2) for side, v in sides.items()}


def ours_run(raw: str, dest: str, workers: int, shard_size: int = SHARD_SIZE, dedup: tuple[str, ...] = ()) -> int:
    options = PrepareOptions(max_size=MAX_SIZE, quality=QUALITY, shard_size=shard_size, dedup_against=dedup)
    with contextlib.redirect_stdout(io.StringIO()):  # its summary would break up the table
        return prepare(raw, dest, options, workers=workers, progress=False)["samples"]["train"]


def img2dataset_command(path: str | None) -> str | None:
    """The img2dataset executable: `path`, else the one in .venv-bench, else one on PATH; None when there is none."""
    if path:
        return path if path != "none" else None
    local = os.path.join(ROOT, ".venv-bench", "bin", "img2dataset")
    return local if os.access(local, os.X_OK) else shutil.which("img2dataset")


def img2dataset_run(command: str, root: str, out: str, processes: int) -> tuple[int, float]:
    """img2dataset over every photo under `root` into `out`; (images made, CPU seconds of every process it ran)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    urls = out + "-urls.txt"
    with open(urls, "w") as f:
        f.writelines(Path(path).as_uri() + "\n" for path in files)
    cmd = [command, "--url_list", urls, "--input_format", "txt", "--output_folder", out,
           "--output_format", "webdataset", "--image_size", str(MAX_SIZE), "--resize_mode", "keep_ratio",
           "--resize_only_if_bigger", "True", "--encode_format", "jpg", "--encode_quality", str(QUALITY),
           "--processes_count", str(processes), "--thread_count", str(I2D_THREADS),
           "--number_sample_per_shard", str(math.ceil(len(files) / processes)),
           "--extract_exif", "False", "--compute_hash", "None", "--enable_wandb", "False"]
    # Albumentations would otherwise ask PyPI for a newer version of itself at every import.
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    before, polled = children_cpu(), {}
    with open(out + ".log", "w") as log, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT) as proc:
        top = psutil.Process(proc.pid)
        while proc.poll() is None:
            for p in [top, *top.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    polled[p.pid] = t.user + t.system
            time.sleep(0.1)
    if proc.returncode != 0:
        with open(out + ".log") as log:
            raise RuntimeError(f"img2dataset failed (exit {proc.returncode}): {log.read()[-2000:]}")
    # getrusage counts every process that was waited for, to its end; polling also sees one that outlives its
    # parent (multiprocessing's resource tracker), but not the last tenth of a second of any. Each can only miss
    # time, so the larger is the better count.
    cpu = max(children_cpu() - before, sum(polled.values()))
    made = 0
    for name in os.listdir(out):
        if name.endswith("_stats.json"):
            with open(os.path.join(out, name)) as f:
                made += json.load(f)["successes"]
    if made != len(files):
        raise RuntimeError(f"img2dataset made {made} of {len(files)} images; see {out}")
    return made, cpu


def img2dataset_outputs(out: str, files: list[str]) -> dict[str, bytes]:
    """img2dataset's JPEG for each of `files`, found by the URL its tars record next to each image."""
    wanted = {Path(path).as_uri(): path for path in files}
    found: dict[str, bytes] = {}
    for name in sorted(os.listdir(out)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(out, name)) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for member, data in members.items():
            if member.endswith(".json"):
                url = json.loads(data)["url"]
                if url in wanted:
                    found[wanted[url]] = members[member.removesuffix(".json") + ".jpg"]
    return found


def measure(run) -> dict[str, float]:
    """`run` makes the images and returns (how many, the CPU seconds that counts for them)."""
    wall = time.perf_counter()
    images, cpu = run()
    wall = time.perf_counter() - wall
    return figures(images, wall, cpu)


def figures(images: int, wall: float, cpu: float) -> dict[str, float]:
    return {"images": images, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "cores": round(cpu / wall, 2),
            "images_per_s": round(images / wall, 1), "images_per_s_per_core": round(images / cpu, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="shard tasks in flight for ours")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs of each side, interleaved; the one with the least CPU time counts")
    parser.add_argument("--img2dataset", default=None,
                        help="img2dataset executable (default: .venv-bench/bin/img2dataset, else PATH; 'none': skip)")
    parser.add_argument("--img2dataset-processes", type=int, default=1,
                        help=f"img2dataset's processes, {I2D_THREADS} threads each")
    parser.add_argument("--dedup-references", type=int, default=500,
                        help="reference images of the --dedup-against side (0: no such side)")
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)
    i2d = img2dataset_command(args.img2dataset)
    if i2d is None:
        print("img2dataset not found (see bench/README.md): that baseline is skipped", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        raw, warm = os.path.join(tmp, "raw"), os.path.join(tmp, "warm")
        t0 = time.perf_counter()
        size = write_photos(raw, args.images)
        write_photos(warm, 2 * args.workers)
        print(f"generated {args.images} JPEGs ({size / args.images / 1e3:.0f} kB on average) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(raw) for f in fs)
        sample = files[:: max(1, len(files) // 50)]
        i2d_startup = None
        if i2d is not None:
            _, i2d_startup = img2dataset_run(i2d, warm, os.path.join(tmp, "i2d-warm"), args.img2dataset_processes)

        # Ray starts its workers at nice 15 unless told; the baseline runs at the usual 0, and on a shared machine
        # a lower priority would mostly measure the other tenants.
        os.environ["RAY_worker_niceness"] = "0"
        # address="local": a fresh instance of our own, never a cluster some other process left running.
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=args.workers, include_dashboard=False,
                 log_to_driver=False)
        # Start the Ray workers and their imports before timing: a long job pays that once.
        ours_run(warm, os.path.join(tmp, "warm-ds"), args.workers, shard_size=1)
        sides = {
            # The baseline and its same-filter variant run in this process alone; ours counts every Ray process.
            "baseline": lambda r: measure(lambda: with_cpu(lambda: resize_loop(raw, tmp, Image.Resampling.BICUBIC),
                                                           tree=False)),
            "baseline-bilinear": lambda r: measure(
                lambda: with_cpu(lambda: resize_loop(raw, tmp, Image.Resampling.BILINEAR), tree=False)),
            "ours": lambda r: measure(
                lambda: with_cpu(lambda: ours_run(raw, os.path.join(tmp, f"ds-{r}"), args.workers), tree=True)),
        }
        if args.dedup_references:
            refs = os.path.join(tmp, "refs")
            write_photos(refs, args.dedup_references, first=10**6)  # none of them among the inputs
            sides["ours-dedup"] = lambda r: measure(lambda: with_cpu(
                lambda: ours_run(raw, os.path.join(tmp, f"dd-{r}"), args.workers, dedup=(refs,)), tree=True))
            # The index's share of that side, measured on its own as often as the sides run; the least counts,
            # as for the sides (one measurement moved the per-input figure by up to ten points).
            index_cpu = min(with_cpu(lambda: len(build_index([refs])[0].names), tree=True)[1]
                            for _ in range(args.repeat))
        if i2d is not None:
            sides["img2dataset"] = lambda r: measure(
                lambda: img2dataset_run(i2d, raw, os.path.join(tmp, f"i2d-{r}"), args.img2dataset_processes))
        runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        print(f"{'':18} {'images':>7} {'wall s':>7} {'cpu s':>7} {'cores':>6} {'img/s':>8} {'img/s/core':>11}")
        if i2d is not None:
            runs["img2dataset-steady"] = []
        for r in range(args.repeat):
            for side, run in sides.items():
                m = run(r)
                runs[side].append(m)
                rows = [(side, m)]
                # With a few images, the start-up's own variation can exceed the work: no steady figure then.
                if side == "img2dataset" and m["cpu_s"] > i2d_startup:
                    steady = figures(m["images"], m["wall_s"], m["cpu_s"] - i2d_startup)
                    runs["img2dataset-steady"].append(steady)
                    rows.append(("  w/o start-up", steady))
                for name, f in rows:
                    print(f"{name:18} {f['images']:7d} {f['wall_s']:7.2f} {f['cpu_s']:7.2f} {f['cores']:6.2f} "
                          f"{f['images_per_s']:8.1f} {f['images_per_s_per_core']:11.1f}", flush=True)
        quality = psnr(sample, None if i2d is None else img2dataset_outputs(os.path.join(tmp, "i2d-0"), sample))
    best = {side: max(r["images_per_s_per_core"] for r in rs) for side, rs in runs.items() if rs}
    ratio = best["ours"] / best["baseline"]
    same_filter = best["ours"] / best["baseline-bilinear"]
    print(f"PSNR vs a full-resolution Lanczos resize, dB: {quality}")
    print(f"ratio (images/s per core, best run of each side), ours / baseline (PIL defaults, bicubic): {ratio:.2f}")
    print(f"ours / baseline-bilinear (PIL's cheapest antialiased filter): {same_filter:.2f}")
    if args.dedup_references:
        per_input = min(r["cpu_s"] for r in runs["ours-dedup"]) - index_cpu
        slower = per_input / min(r["cpu_s"] for r in runs["ours"]) - 1
        print(f"--dedup-against {args.dedup_references} reference images: {slower:+.1%} CPU per input (target: "
              f"under +15%), plus {index_cpu:.1f} CPU s once for the index "
              f"({index_cpu / args.dedup_references * 1e3:.1f} ms a reference image)")
    result = {"name": "prep", "ours": best["ours"], "baseline": best["baseline"], "unit": "images/s/core",
              "ratio": round(ratio, 3), "ratio_same_filter": round(same_filter, 3), "psnr_db": quality,
              "workers": args.workers, "runs": runs}
    if args.dedup_references:
        result.update(dedup_references=args.dedup_references, dedup_cpu_per_input=round(slower, 4),
                      dedup_index_cpu_s=round(index_cpu, 2))
    if i2d is not None:
        with_startup = best["ours"] / best["img2dataset"]
        result.update(ratio_img2dataset_with_startup=round(with_startup, 3),
                      img2dataset_startup_cpu_s=round(i2d_startup, 2),
                      img2dataset_processes=args.img2dataset_processes, img2dataset_threads=I2D_THREADS)
        steady = "too few images to tell"
        if "img2dataset-steady" in best:
            versus = best["ours"] / best["img2dataset-steady"]
            result.update(img2dataset=best["img2dataset-steady"], ratio_img2dataset=round(versus, 3))
            steady = f"{versus:.2f}"
        print(f"ours / img2dataset ({args.img2dataset_processes} x {I2D_THREADS} threads; its start-up, "
              f"{i2d_startup:.1f} CPU s, left out): {steady} (target >= 2); counting its start-up: {with_startup:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
