"""Data prep at scale: the driver's peak memory and the planning throughput of `mixer prepare --plan-only` as the
number of inputs grows.

The sources are generated here, with no images in them: planning only reads listings. A JFT-style manifest is a
folder of Parquet parts (64 parts of 4 row groups by default) with `path` and `labels` columns, 1-3 labels per row
over 18,291 classes, paths in no particular order; it is made at each of `--sizes`. An ImageNet-21k-style source is
a folder of `--tars` per-class tars, 50-150% of `--tar-members` members per tar, as long as real JPEGs would make
them (`--member-kb`: the planner sizes its work from tar lengths) but sparse, about 1 KiB of disk per member. The
manifest plans with a 1% validation split, the tars with 50 validation images per class, both in shards of 1,000.

Each size plans in a fresh Python process (the driver), which starts Ray with `--workers` CPUs and warms it up on a
tiny source of the same layout before the timed call. Measured:
- the driver's peak RSS while it plans, the most of three witnesses: its high-water mark (VmHWM), reset through
  /proc/self/clear_refs after the warm-up; this process polling the driver's RSS at 20 Hz; and its lifelong
  `ru_maxrss` (which includes Ray's start-up) when that rose during the plan: the high-water mark misses memory
  handed back by madvise, which `ru_maxrss` catches when a thread ends. Ray's GCS, raylet and workers are other
  processes, reported apart ("ray MB");
- listing + planning wall time, and throughput per core two ways: inputs per CPU second of the driver and every Ray
  process under it (other load on the machine does not count against it), and inputs / wall / `--workers`.

Targets (manifest): driver peak RSS under 1.5 GB at the largest size and growing by less than 10% from the second
largest; inputs per CPU second at the largest size within 20% of that at the smallest. The i21k row is reported
against the same memory ceiling. On 2 cores 16M inputs take about 20 CPU minutes (14 minutes of wall time when the
machine is quiet, 35 when it is busy); the generated data (about 0.25 GB per 16M manifest, 2 GB of disk for 2,000
tars) is removed as it goes.

    python bench/prep_scale.py --quick                                   # smoke run: 50k inputs, 50 tars
    nice -n 5 python bench/prep_scale.py --json out/bench-prep-scale.json  # 1M, 4M, 16M inputs and 2,000 tars
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
from itertools import count
from typing import Any

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLASSES = 18_291  # JFT-300M's
SHARD_SIZE = 1000
MANIFEST_VAL_FRACTION = 0.01
TARS_VAL_PER_CLASS = 50
POLL_S = 0.05
TREE_POLL_EVERY = 10  # polls between two looks at the whole process tree, which costs far more than one RSS read
TARGET_RSS = 1.5e9  # bytes
TARGET_RSS_GROWTH = 0.10
TARGET_THROUGHPUT_DROP = 0.20
PATH_DIGITS = 10
FULL = {"sizes": "1M,4M,16M", "tars": 2000, "tar_members": 1000, "parts": 64}
QUICK = {"sizes": "50k", "tars": 50, "tar_members": 200, "parts": 8}


def parse_count(text: str) -> int:
    """`16M`, `50k`, `2000` -> an int."""
    scale = {"k": 10**3, "m": 10**6}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def label(n: int) -> str:
    for unit, scale in (("M", 10**6), ("k", 10**3)):
        if n >= scale and n % (scale // 10) == 0:
            return f"{n / scale:g}{unit}"
    return str(n)


def write_manifest(root: str, n: int, parts: int, row_groups: int, seed: int = 0) -> None:
    """`parts` Parquet files of `path` (`images/<10 digits>.jpg`) and `labels` (list<int32>) columns.

    Row i holds image (i * step) mod n with step near n / golden ratio, so names are unique but scattered within
    and across parts, as a crawl's would be: the listing's sort has real work to do. Paths are fixed-width, so
    Arrow's buffers are built directly from numpy instead of from 16M Python strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root)
    step = next(a for a in count(int(n * 0.6180339887) | 1) if math.gcd(a, n) == 1)
    prefix, suffix = np.frombuffer(b"images/", np.uint8), np.frombuffer(b".jpg", np.uint8)
    width = len(prefix) + PATH_DIGITS + len(suffix)
    powers = 10 ** np.arange(PATH_DIGITS - 1, -1, -1, dtype=np.int64)
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    for part in range(parts):
        rows = int(bounds[part + 1] - bounds[part])
        ids = np.arange(bounds[part], bounds[part + 1], dtype=np.int64) * step % n
        chars = np.empty((rows, width), np.uint8)
        chars[:, : len(prefix)] = prefix
        chars[:, len(prefix) : -len(suffix)] = ids[:, None] // powers % 10 + ord("0")
        chars[:, -len(suffix) :] = suffix
        offsets = np.arange(0, (rows + 1) * width, width, dtype=np.int32)
        paths = pa.Array.from_buffers(pa.string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(chars)])
        label_offsets = np.zeros(rows + 1, np.int32)
        np.cumsum(rng.integers(1, 4, rows), out=label_offsets[1:])
        values = rng.integers(0, CLASSES, int(label_offsets[-1]), dtype=np.int32)
        if part == 0:
            values[0] = CLASSES - 1  # classes are 0..max label: make it 18,291 at every size
        labels = pa.ListArray.from_arrays(pa.array(label_offsets), pa.array(values))
        pq.write_table(pa.table({"path": paths, "labels": labels}), os.path.join(root, f"part-{part:05d}.parquet"),
                       row_group_size=math.ceil(rows / row_groups))


def write_tars(root: str, tars: int, members: int, member_bytes: int, seed: int = 0) -> int:
    """`tars` files `n<8 digits>.tar`, 50-150% of `members` members each; returns the number of members.

    Every fourth member is a hole in a sparse file, so a tar is as long as `member_bytes` per member while the disk
    holds about 1 KiB per member: three members of 1-16 bytes and the header of the fourth share one 4 KiB block.
    A tar's length matters because the planner estimates a tar's inputs from it. `member_bytes` 0: every member is
    1-16 bytes and the tars are as short as they can be."""
    os.makedirs(root)
    rng = np.random.default_rng(seed)
    counts = rng.integers(max(1, members // 2), members * 3 // 2 + 1, tars)
    payload = bytes(range(1, 17))
    # Three small members and the big one's header fill 3.5 KiB; the big one's length then brings the next header to
    # a 4 KiB boundary, so that each run of four members touches one block of disk.
    big = -(-4 * member_bytes // 4096) * 4096 + 512
    for number, n_members in enumerate(counts):
        synset = f"n{number:08d}"
        lengths = rng.integers(1, 17, int(n_members))
        if member_bytes:
            lengths[3::4] = big
        with open(os.path.join(root, f"{synset}.tar"), "wb") as f:
            buf = io.BytesIO()
            for j, length in enumerate(lengths):
                info = tarfile.TarInfo(f"{synset}_{j}.JPEG")
                info.size, info.mode, info.mtime = int(length), 0o644, 0
                buf.write(info.tobuf(tarfile.USTAR_FORMAT))
                padded = -(-length // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if length <= len(payload):
                    buf.write(payload[:length].ljust(padded, b"\0"))
                else:
                    f.write(buf.getbuffer())
                    buf = io.BytesIO()
                    f.seek(padded, os.SEEK_CUR)
            buf.write(b"\0" * 2 * tarfile.BLOCKSIZE)  # the end-of-archive marker
            f.write(buf.getbuffer())
    return int(counts.sum())


def source(data: str, kind: str, n: int, args: argparse.Namespace) -> tuple[str, int]:
    """The source's folder and its number of inputs: generated, or reused when an earlier `--keep` run made it with
    the same parameters (recorded next to it once it is complete)."""
    params = {"kind": kind, "n": n, "parts": args.parts, "row_groups": args.row_groups, "members": args.tar_members,
              "member_kb": args.member_kb}
    name = f"{kind}-{label(n)}" + (f"x{args.tar_members}x{args.member_kb}kB" if kind == "tars" else "")
    folder, record = os.path.join(data, name), os.path.join(data, name + ".json")
    if os.path.exists(record):
        with open(record) as f:
            done = json.load(f)
        if done["params"] == params:
            return folder, done["inputs"]
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    if kind == "manifest":
        write_manifest(folder, n, args.parts, args.row_groups)
        inputs = n
    else:
        inputs = write_tars(folder, n, args.tar_members, args.member_kb * 1000)
    stats = [e.stat() for e in os.scandir(folder)]
    disk, size = sum(s.st_blocks * 512 for s in stats), sum(s.st_size for s in stats)
    print(f"generated {name}: {inputs:,} inputs, {size / 1e9:.2f} GB ({disk / 1e9:.2f} GB on disk) in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    with open(record, "w") as f:
        json.dump({"params": params, "inputs": inputs}, f)
    return folder, inputs


def remove(data: str, folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(folder + ".json")
    shutil.rmtree(os.path.join(data, "dest-" + os.path.basename(folder)), ignore_errors=True)


def reset_peak_rss() -> bool:
    """Start the kernel's high-water mark of this process's RSS (VmHWM) again from its current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def plan_peak(result: dict[str, Any]) -> int:
    """The driver's peak RSS while planning: the most any witness saw. The high-water mark misses memory that rose
    and was handed back by madvise (as Arrow's allocator does), which ru_maxrss can catch when a thread ends; a
    lifelong ru_maxrss that rose during the plan is the plan's. Without a resettable high-water mark, the 20 Hz poll
    is the best there is."""
    seen = [result["plan_peak"] or 0, result["driver_peak_rss_planning"]]
    if result["maxrss"] > result["maxrss_before"]:
        seen.append(result["maxrss"])
    return max(seen)


def child(spec: dict[str, Any]) -> None:
    """The driver: start Ray, warm it up on the tiny source, then time one plan-only `prepare` of the source."""
    from bench.prep import cpu_seconds
    from data_prep.prepare import PrepareOptions, prepare
    from pipeline.ray_cluster import init_ray

    me = psutil.Process()
    ray_start = time.perf_counter()
    # Same priority for the Ray workers as for the driver (Ray's default is nice 15): the wall time should not
    # depend on which side of the plan the scheduler favours on a shared machine.
    os.environ["RAY_worker_niceness"] = "0"
    init_ray(None, num_cpus=spec["workers"], log_to_driver=False)
    warm = time.perf_counter()
    options = PrepareOptions(**spec["options"])
    # Ray's workers start and import data_prep on their first tasks: a long run pays that once, so it is not timed.
    prepare(spec["warm"], spec["warm_dest"], options, workers=spec["workers"], plan_only=True, progress=False)
    result: dict[str, Any] = {
        "ray_start_s": warm - ray_start, "warm_s": time.perf_counter() - warm, "rss_before": me.memory_info().rss,
        # ru_maxrss keeps the peak of Ray's start-up, which has nothing to do with the number of inputs.
        "maxrss_before": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_reset": reset_peak_rss(), "plan_started": time.time(),
    }
    cpu, wall = cpu_seconds(tree=True), time.perf_counter()
    summary = prepare(spec["source"], spec["dest"], options, workers=spec["workers"], plan_only=True, progress=False)
    result.update(wall_s=time.perf_counter() - wall, cpu_s=cpu_seconds(tree=True) - cpu, plan_ended=time.time(),
                  maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_after=me.memory_info().rss,
                  plan_peak=peak_rss() if result["peak_reset"] else None, summary=summary)
    with open(spec["result"], "w") as f:
        json.dump(result, f, default=str)


def measure(spec: dict[str, Any], log: str, rss_limit: float, timeout: float) -> dict[str, Any]:
    """Run the driver in its own process and watch its RSS; a driver over `rss_limit` or `timeout` is stopped (with
    the Ray processes it started) and the run reported as failed."""
    samples: list[tuple[float, int]] = []
    ray_peak, polls, failure = 0, 0, None
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    driver = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = driver.memory_info().rss
            if polls % TREE_POLL_EVERY == 0:
                ray_peak = max(ray_peak, tree_rss(driver))
        except psutil.NoSuchProcess:
            break
        samples.append((time.time(), rss))
        polls += 1
        if rss > rss_limit:
            failure = f"driver RSS {rss / 1e9:.2f} GB over --rss-limit after {time.time() - started:.0f} s"
        elif time.time() - started > timeout:
            failure = f"still running after --timeout {timeout:.0f} s"
        if failure:
            failure += stacks(proc.pid)
            stop(driver)
            break
        time.sleep(POLL_S)
    proc.wait()
    if failure is None and proc.returncode != 0:
        failure = f"driver exited with status {proc.returncode}"
    if failure:
        with open(log) as f:
            tail = f.read()[-3000:]
        return {"failed": failure, "log_tail": tail, "driver_peak_rss": max((r for _, r in samples), default=0),
                "rss_timeline": timeline(samples, started)}
    with open(spec["result"]) as f:
        result = json.load(f)
    result["load_avg"] = os.getloadavg()[0]  # the wall-time figures mean little on a busy machine: say how busy
    during = [r for t, r in samples if result["plan_started"] <= t <= result["plan_ended"]]
    result.update(driver_peak_rss=max(r for _, r in samples), driver_peak_rss_planning=max(during, default=0),
                  ray_peak_rss=ray_peak, rss_timeline=timeline(samples, started))
    return result


def tree_rss(driver: psutil.Process) -> int:
    total = 0
    for p in driver.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # Ray starts and ends workers all the time
            total += p.memory_info().rss
    return total


def stacks(pid: int) -> str:
    """Where the driver is when it is stopped, from py-spy when it is installed next to this Python."""
    spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        return ""
    try:
        dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    return "\n" + (dump.stdout or dump.stderr)


def stop(driver: psutil.Process) -> None:
    """Terminate the driver and then whatever it started that outlived it, by process id."""
    below = driver.children(recursive=True)
    for p in [driver, *below]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs([driver, *below], timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def timeline(samples: list[tuple[float, int]], started: float, points: int = 200) -> list[tuple[float, float]]:
    """(seconds since start, RSS in MB), thinned to about `points` samples, keeping each stretch's highest."""
    if not samples:
        return []
    stride = max(1, len(samples) // points)
    return [(round(samples[i][0] - started, 2), round(max(r for _, r in samples[i : i + stride]) / 1e6, 1))
            for i in range(0, len(samples), stride)]


def row(name: str, layout: str, inputs: int, workers: int, result: dict[str, Any]) -> dict[str, Any]:
    base = {"source": name, "layout": layout, "inputs": inputs}
    if "failed" in result:
        return {**base, **result}
    summary = result["summary"]
    return {
        **base,
        "listed": summary["inputs"],
        "partitions": summary.get("partitions"),
        "classes": summary.get("classes"),
        "shards": summary["shards"],
        "samples": summary["samples"],
        "rejected": summary["rejected"],
        "plan_sha256": summary.get("plan_sha256"),
        "wall_s": round(result["wall_s"], 2),
        "cpu_s": round(result["cpu_s"], 2),
        "cores_busy": round(result["cpu_s"] / result["wall_s"], 2),
        "inputs_per_cpu_s": round(inputs / result["cpu_s"], 1),
        "inputs_per_s_per_core": round(inputs / result["wall_s"] / workers, 1),
        "driver_plan_peak": plan_peak(result),
        "driver_plan_peak_exact": result["plan_peak"] is not None,
        "driver_peak_rss_planning": result["driver_peak_rss_planning"],
        "driver_maxrss": result["maxrss"],
        "driver_maxrss_before": result["maxrss_before"],
        "driver_peak_rss": result["driver_peak_rss"],
        "driver_rss_before": result["rss_before"],
        "driver_rss_after": result["rss_after"],
        "ray_peak_rss": result["ray_peak_rss"],
        "load_avg": round(result["load_avg"], 1),
        "ray_start_s": round(result["ray_start_s"], 2),
        "warm_s": round(result["warm_s"], 2),
        "rss_timeline": result["rss_timeline"],
    }


HEADER = (f"{'source':18} {'inputs':>11} {'shards':>6} {'plan s':>7} {'cpu s':>7} {'cores':>5} {'in/cpu-s':>9} "
          f"{'in/s/core':>9} {'plan MB':>7} {'polled MB':>9} {'maxrss MB':>9} {'start MB':>8} {'ray MB':>7} "
          f"{'load':>5}")


def print_row(r: dict[str, Any]) -> None:
    if "failed" in r:
        print(f"{r['source']:18} {r['inputs']:11,} FAILED: {r['failed']}\n{r['log_tail']}", flush=True)
        return
    print(f"{r['source']:18} {r['inputs']:11,} {sum(r['shards'].values()):6} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} "
          f"{r['cores_busy']:5.2f} {r['inputs_per_cpu_s']:9,.0f} {r['inputs_per_s_per_core']:9,.0f} "
          f"{r['driver_plan_peak'] / 1e6:7,.0f} {r['driver_peak_rss_planning'] / 1e6:9,.0f} "
          f"{r['driver_maxrss'] / 1e6:9,.0f} {r['driver_rss_before'] / 1e6:8,.0f} "
          f"{r['ray_peak_rss'] / 1e6:7,.0f} {r['load_avg']:5.1f}", flush=True)
    if r["listed"] != r["inputs"] or r["rejected"]:
        print(f"  ! listed {r['listed']:,} of {r['inputs']:,} inputs; rejected {r['rejected']}", flush=True)


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets over the manifest rows: memory at the largest size and its growth from the next one, throughput
    at the largest size against the smallest."""
    sized = sorted((r for r in rows if r["layout"] == "manifest" and "failed" not in r), key=lambda r: r["inputs"])
    failed = [r for r in rows if r["layout"] == "manifest" and "failed" in r]
    if failed:
        return [{"target": f"{r['source']} plans", "value": r["failed"].splitlines()[0], "pass": False} for r in failed]
    if not sized:
        return []
    top, checks = sized[-1], []
    checks.append({"target": f"driver peak RSS at {label(top['inputs'])} < {TARGET_RSS / 1e9:g} GB",
                   "value": f"{top['driver_plan_peak'] / 1e9:.3f} GB", "pass": top["driver_plan_peak"] < TARGET_RSS})
    if len(sized) > 1:
        before, small = sized[-2], sized[0]
        growth = top["driver_plan_peak"] / before["driver_plan_peak"] - 1
        checks.append({"target": f"driver peak RSS growth {label(before['inputs'])} -> {label(top['inputs'])} "
                                 f"< {TARGET_RSS_GROWTH:.0%}",
                       "value": f"{growth:+.1%}", "pass": growth < TARGET_RSS_GROWTH})
        for key, what in (("inputs_per_cpu_s", "inputs per CPU second"),
                          ("inputs_per_s_per_core", "inputs/s per --workers core (wall)")):
            change = top[key] / small[key] - 1
            checks.append({"target": f"{what} at {label(top['inputs'])} within {TARGET_THROUGHPUT_DROP:.0%} of "
                                     f"{label(small['inputs'])}",
                           "value": f"{change:+.1%}", "pass": change > -TARGET_THROUGHPUT_DROP,
                           "info": key != "inputs_per_cpu_s"})
    return checks


def slopes(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Least squares of the driver's peak RSS while planning against inputs, over the manifest sizes: bytes per input
    and the intercept."""
    sized = [r for r in rows if r["layout"] == "manifest" and "failed" not in r]
    if len(sized) < 2:
        return {}
    x = np.array([r["inputs"] for r in sized], float)
    y = np.array([r["driver_plan_peak"] for r in sized], float)
    per_input, intercept = np.polyfit(x, y, 1)
    return {"driver_bytes_per_input": round(float(per_input), 3), "driver_rss_intercept_mb": round(intercept / 1e6, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="manifest inputs per run, comma-separated, with k or M (default 1M,4M,16M)")
    parser.add_argument("--tars", type=parse_count, help="per-class tars of the i21k source, 0 for none (default 2000)")
    parser.add_argument("--tar-members", type=int,
                        help="mean members per tar, each tar 50-150%% of it (default 1000: about 2 GB of disk at 2000 "
                             "tars)")
    parser.add_argument("--member-kb", type=int, default=92,
                        help="kB a tar member seems to hold (sparse: ~1 KiB of disk each); 92 is ImageNet-21k's mean "
                             "JPEG (1.31 TB / 14.2M images), and tar lengths size the plan; 0: members of 1-16 bytes")
    parser.add_argument("--parts", type=int, help="Parquet files per manifest (default 64)")
    parser.add_argument("--row-groups", type=int, default=4, help="row groups per Parquet file (Ray partitions)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="CPUs given to Ray: the cores of 'per core'")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run, defaults --sizes 50k --tars 50 --tar-members 200 --parts 8")
    parser.add_argument("--data", default=None,
                        help="generate the sources here (default: a temporary folder); sources an earlier --keep run "
                             "left here with the same parameters are reused")
    parser.add_argument("--keep", action="store_true", help="keep the generated sources (and the plans) afterwards")
    parser.add_argument("--rss-limit", type=float, default=8.0,
                        help="GB: stop a driver whose RSS goes over this (the machine is shared); the run fails")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds: stop a driver still planning by then")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the rows and targets as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = [parse_count(s) for s in args.sizes.split(",") if s]

    data = args.data or tempfile.mkdtemp(prefix="bench-prep-scale-")
    os.makedirs(data, exist_ok=True)
    print(f"sources in {data}; driver: {sys.executable}, Ray with {args.workers} CPUs", flush=True)
    manifest_options = {"layout": "manifest", "shard_size": SHARD_SIZE, "val_fraction": MANIFEST_VAL_FRACTION}
    tars_options = {"layout": "i21k-tars", "shard_size": SHARD_SIZE, "val_per_class": TARS_VAL_PER_CLASS}
    runs = [("manifest", n, manifest_options) for n in sizes]
    if args.tars:
        runs.append(("tars", args.tars, tars_options))
    warm = {"manifest": os.path.join(data, "warm-manifest"), "tars": os.path.join(data, "warm-tars")}
    if not os.path.isdir(warm["manifest"]):
        write_manifest(warm["manifest"], 2000, 2, 2)
    if not os.path.isdir(warm["tars"]):
        write_tars(warm["tars"], 4, 20, args.member_kb * 1000)

    rows: list[dict[str, Any]] = []
    try:
        for kind, n, options in runs:
            folder, inputs = source(data, kind, n, args)
            name = os.path.basename(folder)
            spec = {"source": folder, "dest": os.path.join(data, "dest-" + name), "warm": warm[kind],
                    "warm_dest": os.path.join(data, f"dest-warm-{name}"), "workers": args.workers, "options": options,
                    "result": os.path.join(data, f"result-{name}.json")}
            for dest in (spec["dest"], spec["warm_dest"]):
                shutil.rmtree(dest, ignore_errors=True)
            result = measure(spec, os.path.join(data, f"driver-{name}.log"), args.rss_limit * 1e9, args.timeout)
            rows.append(row(name, options["layout"], inputs, args.workers, result))
            if len(rows) == 1:
                print(HEADER)
            print_row(rows[-1])
            shutil.rmtree(spec["warm_dest"], ignore_errors=True)
            if not args.keep:
                remove(data, folder)
    finally:
        if not args.keep and not args.data:
            shutil.rmtree(data, ignore_errors=True)

    if len(rows) > 1:
        print(f"\n{HEADER}")
        for r in rows:
            print_row(r)
    print("plan MB: the driver's peak RSS while it plans (the most of VmHWM, the poll and a risen ru_maxrss); "
          "polled MB: seen at 20 Hz; maxrss MB: its ru_maxrss, Ray's start-up included; start MB: its RSS before "
          "the timed plan; ray MB: peak RSS of every Ray "
          "process under it together; load: the 1-minute load average after it. in/cpu-s: inputs per CPU second of "
          "the driver and Ray; in/s/core: inputs / wall / --workers.")
    checks = targets(rows)
    for c in checks:
        verdict = "info" if c.get("info") else ("pass" if c["pass"] else "FAIL")
        print(f"{c['target']}: {c['value']} -> {verdict}")
    fit = slopes(rows)
    if fit:
        print(f"driver peak RSS while planning ~ {fit['driver_rss_intercept_mb']:.0f} MB + "
              f"{fit['driver_bytes_per_input']:.2f} bytes per input (least squares over the manifest sizes)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"name": "prep_scale", "workers": args.workers, "rows": rows, "targets": checks, "fit": fit},
                      f, indent=2)
    return 0 if all(c["pass"] or c.get("info") for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
