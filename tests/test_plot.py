"""`mixer plot`: a PNG of a run's curves from RUN/metrics.jsonl, on a local folder and on S3."""

from __future__ import annotations

import json
import struct

import pytest

from pipeline import storage
from pipeline.cli import main
from pipeline.metrics import MetricsError
from pipeline.plot import evaluation_curves, plot_run, render

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_metrics(steps: int = 60, multi_label: bool = False) -> str:
    lines = []
    for step in range(5, steps + 1, 5):
        lines.append({"kind": "train", "step": step, "epoch": step / 20, "time": 1.7e9 + step, "loss": 3.0 / step,
                      "lr": 1e-3 * min(1.0, step / 10), "grad_norm": 0.5, "images_per_s": 1000.0 + step,
                      "step_time_s": 0.1, "mfu": None, "eta_s": steps - step})
        if step % 20 == 0:
            record = {"kind": "eval", "step": step, "top1": step / 100, "top5": step / 80, "loss": 2.0 / step}
            if multi_label:
                record["prec1"] = record["top1"]
            lines.append(record)
    return "\n".join(json.dumps(x) for x in lines) + "\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_under_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(synthetic_metrics())
    assert main(["plot", str(run)]) == 0
    png = (run / "plots" / "metrics.png").read_bytes()
    width, height = png_size(png)
    assert (width, height) == (1200, 800)
    assert len(png) > 20_000  # four panels with curves, not an empty canvas
    assert str(run / "plots" / "metrics.png") in capsys.readouterr().out


def test_plot_reads_and_writes_s3(bucket, tmp_path):
    run = f"{bucket}/runs/r1"
    storage.write_bytes_atomic(f"{run}/metrics.jsonl", synthetic_metrics(multi_label=True).encode())
    out = plot_run(run, f"{bucket}/plots/r1.png")
    assert out == f"{bucket}/plots/r1.png"
    assert png_size(storage.read_bytes(out)) == (1200, 800)


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(MetricsError, match=r"metrics.jsonl does not exist: .* is not a run folder"):
        plot_run(str(tmp_path))
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_malformed_line_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(synthetic_metrics(10) + "{not json\n")
    with pytest.raises(MetricsError, match=r"metrics.jsonl, line 3: not a JSON object"):
        plot_run(str(tmp_path))


def test_the_evaluation_panel_draws_each_fewshot_accuracy_next_to_top1():
    records = [json.loads(line) for line in synthetic_metrics().splitlines()]
    records += [{"kind": "fewshot", "step": step, "fewshot/digits/1shot": step / 200,
                 "fewshot/digits/10shot": step / 100, "fewshot/digits/10shot/l2": 1024.0, "fewshot/seconds": 2.5}
                for step in (20, 40, 60)]
    curves = evaluation_curves(records)
    assert list(curves) == ["top-1", "top-5", "fewshot/digits/10shot", "fewshot/digits/1shot"]
    assert curves["fewshot/digits/10shot"] == ([20, 40, 60], [0.2, 0.4, 0.6])
    assert png_size(render(records)) == (1200, 800)
