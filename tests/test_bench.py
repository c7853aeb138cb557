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
    # are covered above. E2E=0: bench/train_e2e.py's run, a minute on CPU, is left to `make bench`.
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT,
                          env={**env(), "OUT": str(out), "BUDGET": "0", "E2E": "0"},
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


def test_bf16_recipe_steps_fp32_master_weights_and_copies_them_back():
    import torch

    bench_model = load_script("model")
    torch.manual_seed(0)
    net = bench_model.to_precision(build("tiny", num_classes=10, image_size=32), "bf16")
    before = [p.detach().clone() for p in net.parameters()]
    x, y = bench_model.random_batch(4, 32, 10, torch.device("cpu"))
    step = bench_model.make_step(net, x, y, "bf16")
    step()
    params = list(net.parameters())
    assert all(p.dtype == torch.bfloat16 and p.grad is None for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    # The fp32 master weights live in the step's closure; the bf16 weights are their rounding.
    master = step.__closure__[step.__code__.co_freevars.index("master")].cell_contents
    for p, m in zip(params, master, strict=True):
        assert torch.equal(p, m.to(torch.bfloat16))
    moved = [m for m, b in zip(master, before, strict=True) if not torch.equal(m.to(torch.bfloat16), b)]
    assert moved and any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in moved)  # finer than bf16


def test_plan_order_and_summary_ratios():
    import torch

    bench_model = load_script("model")
    args = bench_model.parse_args(["--device", "cpu", "--variants", "B/16,L/16", "--cross"])
    plan = bench_model.row_plan(args, torch.device("cuda"))  # only planned: nothing runs on the device
    main_rows = [p for p in plan if p[5]]
    assert plan[:len(main_rows)] == main_rows  # every main row first
    assert {(p[2], p[4]) for p in main_rows} == {("ours", "bf16"), ("timm", "amp")}
    kinds = [p[3] == "deepspeed-zero1" for p in plan[len(main_rows):]]
    assert kinds == sorted(kinds, reverse=True)  # then DeepSpeed's, then the cross rows
    assert {(p[2], p[4]) for p in plan if not p[5] and p[3] != "deepspeed-zero1"} == {("ours", "amp"),
                                                                                      ("timm", "bf16")}
    assert bench_model.row_plan(args, torch.device("cpu"))[0][4] == "fp32"  # no cross rows, fp32, on CPU

    speed = {("ours", "eager", "bf16"): 300.0, ("timm", "eager", "amp"): 100.0, ("ours", "compile", "bf16"): 400.0,
             ("timm", "compile", "amp"): 200.0, ("ours", "eager", "amp"): 150.0, ("timm", "eager", "bf16"): 120.0,
             ("ours", "compile", "amp"): 250.0, ("timm", "compile", "bf16"): 320.0}
    rows = []
    for variant, batch, impl, mode, precision, main_row in plan:
        row = {"variant": variant, "impl": impl, "mode": mode, "precision": precision, "main": main_row,
               "batch": batch, "status": "ok"}
        if mode == "deepspeed-zero1":
            row.update(images_per_s=50.0, step_ms=30.0)
        else:
            row.update(images_per_s=speed[impl, mode, precision], step_ms=10.0)
        rows.append(row)
    summary = {s["name"]: s["ratio"] for s in bench_model.summarise(rows)}
    assert summary["model B/16 eager"] == 3.0 and summary["model B/16 compile"] == 2.0
    assert summary["model B/16 best"] == 2.0  # ours 400 over timm's best main row, 200
    assert summary["model B/16 best any recipe"] == 400 / 320  # timm is fastest in the other recipe
    assert summary["model B/16 compile same recipe bf16"] == 400 / 320
    assert summary["model B/16 eager same recipe amp"] == 1.5
    assert summary["model L/16 deepspeed overhead"] == 3.0  # 30 ms over the plain eager bf16 step's 10
