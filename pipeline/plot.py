"""`mixer plot`: one PNG of a run's curves (loss, learning rate, throughput, evaluation) from RUN/metrics.jsonl.

The run may live at any fsspec URL; so may the PNG, which is written atomically (pipeline.storage).
"""

from __future__ import annotations

import io
from typing import Any

from pipeline import storage
from pipeline.metrics import MetricsError, read_records


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("kind", "train") == kind and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def evaluation_curves(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """The evaluation panel's curves by label: top-1 and top-5 on the eval split, then each few-shot accuracy."""
    multi_label = any("prec1" in r for r in records)  # multi-label runs log "prec1" too: the same number as top-1
    curves = {}
    for key, label in (("top1", "top-1 (precision@1)" if multi_label else "top-1"), ("top5", "top-5")):
        curves[label] = _series(records, "eval", key)
    fewshot = sorted({k for r in records if r.get("kind") == "fewshot" for k in r
                      if k.startswith("fewshot/") and k.endswith("shot")})
    for key in fewshot:
        curves[key] = _series(records, "fewshot", key)
    return {label: curve for label, curve in curves.items() if curve[0]}


def render(records: list[dict[str, Any]], title: str = "") -> bytes:
    """A 2x2 figure as PNG bytes: loss (train and eval), learning rate, images/s, and the evaluations: top-1/top-5
    and the few-shot accuracies (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    loss_ax, lr_ax, speed_ax, acc_ax = axes.flat

    loss_ax.plot(*_series(records, "train", "loss"), label="train")
    loss_ax.plot(*_series(records, "eval", "loss"), "o-", label="eval")
    loss_ax.set(title="loss", xlabel="step")
    loss_ax.legend()

    lr_ax.plot(*_series(records, "train", "lr"))
    lr_ax.set(title="learning rate", xlabel="step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    speed_ax.plot(*_series(records, "train", "images_per_s"))
    speed_ax.set(title="throughput (images/s, all workers)", xlabel="step")

    for label, (steps, values) in evaluation_curves(records).items():
        acc_ax.plot(steps, values, "s--" if label.startswith("fewshot/") else "o-", label=label)
    acc_ax.set(title="evaluation", xlabel="step", ylim=(0, 1))
    if acc_ax.lines:
        acc_ax.legend()
    else:
        acc_ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=acc_ax.transAxes)

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_run(run_url: str, out: str | None = None) -> str:
    """Plot RUN/metrics.jsonl to `out` (default RUN/plots/metrics.png); returns where the PNG went."""
    run_url = run_url.rstrip("/")
    out = out or storage.join(run_url, "plots", "metrics.png")
    records = read_records(run_url)
    if not records:
        raise MetricsError(f"{storage.join(run_url, 'metrics.jsonl')} holds no records yet; plot again once the run "
                           "has logged a few steps")
    png = render(records, title=run_url)
    storage.write_bytes_atomic(out, png)
    return out
