"""Every CPU benchmark in one go (`make bench`): each script runs as its own process with `--json`, and one table of
ratios against its target comes out, also written to out/bench/results.json.

A benchmark script that is not there yet is reported as missing; one that fails is reported as failed with the tail
of its output. The exit code is non-zero when a benchmark is missing, failed or misses its target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Bench:
    script: str
    args: list[str]
    timeout_s: int


# Sizes: small enough for a 2-core machine in a few minutes, large enough that fixed start-up costs do not decide
# the ratio.
BENCHES = [
    Bench("bench/prep.py", ["--images", "1000"], 900),
    Bench("bench/loader.py", ["--images", "1000"], 900),
    Bench("bench/checkpoint.py", [], 900),
    # One thread: two threads on two cores shared with other processes spin-wait and swing 10x.
    Bench("bench/model.py", ["--device", "cpu", "--threads", "1", "--variants", "tiny", "--image-size", "32",
                             "--batch", "64", "--iters", "20"], 600),
    Bench("bench/train_e2e.py", [], 600),
]

# name -> (target, higher_is_better). Names without a target are reported for information.
TARGETS: dict[str, tuple[float, bool]] = {
    "prep": (2.0, True),  # images/s per core vs a single-process PIL + TarWriter loop
    "loader": (1.5, True),  # images/s per core vs torchvision ImageFolder + DataLoader
    "loader + randaug 2/20, mixup 0.5": (2.0, True),  # the same with the i21k specs' augmentation on both sides
    "checkpoint stall": (1.0, False),  # save stall as a fraction of one step
    "checkpoint upload": (0.8, True),  # upload MB/s vs a raw s3fs put
    "model tiny eager": (1.0, True),  # training images/s vs timm's MlpMixer
    "model tiny compile": (1.0, True),
}


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The ratio rows in one script's JSON: `summary` rows (bench/model.py), the checkpoint pair, or the plain
    `{"name", "ours", "baseline", "unit", "ratio"}` form."""
    if "summary" in result:
        return list(result["summary"])
    if "stall_fraction" in result or "upload_ratio" in result:
        return [
            {"name": "checkpoint stall", "ours": _median(result.get("stall_s")), "baseline": result.get("step_s"),
             "unit": "s (vs a step)", "ratio": result.get("stall_fraction")},
            {"name": "checkpoint upload", "ours": result.get("upload_mb_s"), "baseline": result.get("raw_mb_s"),
             "unit": "MB/s", "ratio": result.get("upload_ratio")},
        ]
    missing = [k for k in ("name", "ratio") if k not in result]
    if missing:
        raise ValueError(f"its JSON lacks {missing}; expected keys name, ours, baseline, unit, ratio")
    return [result]


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def judge(row: dict[str, Any]) -> dict[str, Any]:
    target = TARGETS.get(row["name"])
    ratio = row.get("ratio")
    if target is None:
        return {**row, "target": None, "pass": None}
    value, higher = target
    passed = ratio is not None and (ratio >= value if higher else ratio < value)
    return {**row, "target": f"{'>=' if higher else '<'} {value:g}", "pass": passed}


def run_one(bench: Bench, out_dir: Path) -> tuple[str, list[dict[str, Any]], dict[str, Any] | None]:
    """Run one script; returns (status, judged rows, its raw JSON)."""
    name = Path(bench.script).stem
    if not (ROOT / bench.script).exists():
        return "missing", [{"name": name, "status": "missing", "pass": False,
                            "note": f"{bench.script} does not exist"}], None
    json_out = out_dir / f"{name}.json"
    json_out.unlink(missing_ok=True)
    cmd = [sys.executable, bench.script, *bench.args, "--json", str(json_out)]
    log_path = out_dir / f"{name}.log"
    print(f"$ {' '.join(cmd)}   (log: {log_path})", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "DS_ACCELERATOR": "cpu"}
    t0 = time.monotonic()
    # Straight into the log, so a long run can be followed with `tail -f`.
    with log_path.open("w") as log:
        try:
            code: int | None = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              timeout=bench.timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = None
            log.write(f"\n(killed after {bench.timeout_s}s)\n")
    output = log_path.read_text(errors="replace")
    seconds = time.monotonic() - t0
    if code != 0 or not json_out.exists():
        tail = " | ".join(output.strip().splitlines()[-3:])
        note = f"exit {code} after {seconds:.0f}s; see {log_path}: {tail}"
        return "failed", [{"name": name, "status": "failed", "pass": False, "note": note}], None
    raw = json.loads(json_out.read_text())
    try:
        rows = [judge({**r, "status": "ok"}) for r in rows_of(raw)]
    except ValueError as e:
        return "failed", [{"name": name, "status": "failed", "pass": False, "note": f"{json_out}: {e}"}], raw
    print(f"  done in {seconds:.0f}s", flush=True)
    return "ok", rows, raw


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'benchmark':<34}{'ours':>12}{'baseline':>12}  {'unit':<15}{'ratio':>8}  {'target':<8}{'result':<8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        result = {True: "pass", False: "FAIL", None: "info"}[r["pass"]] if r["status"] == "ok" else r["status"]
        print(f"{r['name']:<34}{_num(r.get('ours')):>12}{_num(r.get('baseline')):>12}  {r.get('unit') or '':<15}"
              f"{_num(r.get('ratio')):>8}  {r.get('target') or '-':<8}{result:<8}")
        if r.get("note"):
            print(f"    {r['note']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(ROOT / "out" / "bench"), help="folder for results.json and per-script logs")
    p.add_argument("--only", default=None, help="comma-separated script stems to run (prep,loader,checkpoint,model)")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None

    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    for bench in BENCHES:
        stem = Path(bench.script).stem
        if only is not None and stem not in only:
            continue
        _, bench_rows, bench_raw = run_one(bench, out_dir)
        rows += bench_rows
        raw[stem] = bench_raw

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version()}
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine, "rows": rows,
               "raw": raw}
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out_dir / "results.json")
    print()
    print(f"{machine['processor']}, {machine['cpus']} CPUs, Python {machine['python']}, {results['date']}")
    print_table(rows)
    print(f"\nwritten: {out_dir / 'results.json'}")
    return 0 if all(r["pass"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
