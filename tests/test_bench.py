"""The training-speed benchmark runs on CPU, and its figures are computed the way they claim to be."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.model import VARIANTS, build, forward_flops

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "model.json"
    cmd = [sys.executable, "bench/model.py", "--device", "cpu", "--threads", "1", "--variants", "tiny",
           "--image-size", "32", "--batch", "16", "--modes", "eager", "--deepspeed", "off", "--warmup", "1",
           "--iters", "3", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tiny    ours  eager" in proc.stdout  # the final table
    return json.loads(out.read_text())


def test_rows_for_ours_and_timm(tiny_run):
    rows = {(r["impl"], r["mode"]): r for r in tiny_run["rows"]}
    assert set(rows) == {("ours", "eager"), ("timm", "eager")}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["variant"] == "tiny" and row["batch"] == 16
        assert row["images_per_s"] > 0 and row["step_ms"] > 0
        assert math.isclose(row["images_per_s"], 16 / (row["step_ms"] / 1e3), rel_tol=1e-9)
    (summary,) = tiny_run["summary"]
    assert summary["name"] == "model tiny eager"
    assert math.isclose(summary["ratio"], rows["ours", "eager"]["images_per_s"] / rows["timm", "eager"]["images_per_s"])


def test_mfu_is_three_forward_passes_over_the_measured_peak(tiny_run):
    forward = forward_flops(VARIANTS["tiny"], 32, 1000)
    assert forward == build("tiny", num_classes=1000, image_size=32).forward_flops()
    peak = tiny_run["peak_matmul"]
    assert peak["flops"] > 0 and peak["dtype"] == "float32"
    for row in tiny_run["rows"]:
        assert row["fwd_flops_per_image"] == forward
        assert row["train_flops_per_image"] == 3 * forward
        achieved = row["images_per_s"] * 3 * forward
        assert math.isclose(row["tflops"], achieved / 1e12, rel_tol=1e-9)
        assert math.isclose(row["mfu"], achieved / peak["flops"], rel_tol=1e-9)


def test_gpu_script_falls_back_to_cpu_and_writes_its_files(tmp_path):
    # BUDGET=0: every row is skipped at once, which checks the script's plumbing in seconds; the rows themselves
    # are covered above.
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, env={**env(), "OUT": str(out), "BUDGET": "0"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "card: none (CPU run)" in proc.stdout and "torch " in proc.stdout
    result = json.loads((out / "bench.json").read_text())
    assert result["rows"] and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in result["rows"])
    assert {"ours", "timm"} <= {r["impl"] for r in result["rows"]}
    for name in ("bench.log", "env.txt", "table.txt"):
        assert (out / name).stat().st_size > 0


def test_all_reports_missing_scripts_and_judges_targets(tmp_path):
    bench_all = load_script("all")
    status, rows, raw = bench_all.run_one(bench_all.Bench("bench/not_there.py", [], 10), tmp_path)
    assert status == "missing" and raw is None
    assert rows[0]["pass"] is False and "does not exist" in rows[0]["note"]

    failing = tmp_path / "failing.py"
    failing.write_text("import sys\nprint('cannot reach the endpoint')\nsys.exit(3)\n")
    status, rows, _ = bench_all.run_one(bench_all.Bench(str(failing), [], 60), tmp_path)
    assert status == "failed" and "exit 3" in rows[0]["note"] and "cannot reach the endpoint" in rows[0]["note"]

    working = tmp_path / "working.py"
    working.write_text("import json, sys\nout = sys.argv[sys.argv.index('--json') + 1]\n"
                       "json.dump({'name': 'loader', 'ours': 30, 'baseline': 10, 'unit': 'images/s/core', "
                       "'ratio': 3.0}, open(out, 'w'))\n")
    status, rows, raw = bench_all.run_one(bench_all.Bench(str(working), [], 60), tmp_path)
    assert status == "ok" and raw["ratio"] == 3.0
    assert rows[0]["pass"] is True and rows[0]["target"] == ">= 1.5"

    loader = bench_all.rows_of({"name": "loader", "ours": 300.0, "baseline": 150.0, "unit": "images/s/core",
                                "ratio": 2.0})
    assert bench_all.judge(loader[0])["pass"] is True
    stall, upload = bench_all.rows_of({"name": "checkpoint", "stall_fraction": 1.4, "upload_ratio": 0.9})
    assert bench_all.judge(stall)["pass"] is False  # a save stalls longer than one step
    assert bench_all.judge(upload)["pass"] is True
    assert bench_all.judge({"name": "prep", "ratio": 1.9})["pass"] is False
    with pytest.raises(ValueError, match="ratio"):
        bench_all.rows_of({"name": "prep"})
