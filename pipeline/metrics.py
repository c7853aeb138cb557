"""Run metrics: `RUN/metrics.jsonl` and TensorBoard, throughput and MFU, the progress bar.

Lines are JSON objects, `{"kind": "train", "step", "epoch", "time", "loss", "lr", "grad_norm", "images_per_s",
"step_time_s", "mfu", "eta_s"}` or `{"kind": "eval", "step", "top1", "top5", "loss"}` (multi-label runs add "prec1").
Only rank 0 writes. The file is kept locally and published whole (atomically) every `flush_every_s` seconds, at each
checkpoint and at the end; on resume, lines past the resumed step are dropped so the history has no duplicates.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

from pipeline import storage
from pipeline.errors import MixerError

# Dense bf16 matrix rates (FLOP/s) by device name, for MFU. Unknown devices report no MFU rather than a guess.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return value
    return None


def mfu(images_per_s: float, train_flops_per_image: float, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    if not peak_per_device:
        return None
    return images_per_s * train_flops_per_image / (peak_per_device * devices)


class MetricsError(MixerError):
    """A run whose metrics cannot be read; the message names the file and what to do."""


def read_records(run_url: str) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl in file order; a missing or malformed file raises MetricsError."""
    url = storage.join(run_url, "metrics.jsonl")
    try:
        text = storage.read_bytes(url).decode()
    except FileNotFoundError as e:
        raise MetricsError(
            f"{url} does not exist: {run_url} is not a run folder, or its trainer has not logged yet "
            "(metrics are published every 30 s and at each checkpoint)"
        ) from e
    records = []
    for number, record in storage.json_lines(text, url, MetricsError):
        if "step" not in record:
            raise MetricsError(f"{url}, line {number}: expected a record with a 'step', got {str(record)[:80]}")
        records.append(record)
    return records


class MetricsLog:
    """Append-only metrics for one run, written by rank 0 only (`enabled`)."""

    def __init__(self, run_url: str, enabled: bool, resume_step: int = 0, flush_every_s: float = 30.0):
        self.enabled = enabled
        self.url = storage.join(run_url, "metrics.jsonl")
        self.flush_every_s = flush_every_s
        self._last_flush = time.monotonic()
        self._lines: list[str] = []
        self._tb = None
        if not enabled:
            return
        if storage.exists(self.url):
            self._lines = [json.dumps(r) for r in read_records(run_url) if r["step"] <= resume_step]
        tb_url = storage.join(run_url, "tensorboard")
        if storage.is_local(run_url):
            self._tb_local, self._tb_remote = storage.filesystem(tb_url)[1], None
            os.makedirs(self._tb_local, exist_ok=True)
        else:
            # Event files are appended to locally and published whole; the earlier attempts' files come down first
            # so that the purge below hides their steps past the resumed one.
            self._tb_local, self._tb_remote = tempfile.mkdtemp(prefix="mixer-tb-"), tb_url
            fs, path = storage.filesystem(tb_url)
            if fs.exists(path):
                fs.get(path + "/", self._tb_local + "/", recursive=True)
        tb_dir = self._tb_local
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(tb_dir, purge_step=resume_step + 1 if resume_step else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._lines.append(json.dumps(record))
        kind = record.get("kind", "train")
        for key, value in record.items():
            if key not in ("kind", "step", "time") and isinstance(value, int | float):
                self._tb.add_scalar(f"{kind}/{key}", value, record["step"])
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if not self.enabled:
            return
        storage.write_bytes_atomic(self.url, ("\n".join(self._lines) + "\n").encode() if self._lines else b"")
        self._tb.flush()
        if self._tb_remote:
            fs, path = storage.filesystem(self._tb_remote)
            fs.put(self._tb_local + "/", path, recursive=True)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self.flush()
            if self._tb_remote:
                shutil.rmtree(self._tb_local, ignore_errors=True)
