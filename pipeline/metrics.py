"""Run metrics: `RUN/metrics.jsonl` and TensorBoard, throughput and MFU, the progress bar.

Lines are JSON objects, `{"kind": "train", "step", "epoch", "time", "loss", "lr", "grad_norm", "images_per_s",
"step_time_s", "mfu", "eta_s", "skipped_samples"}` (training samples skipped as unusable so far, over all ranks and
the whole run; each is a line of RUN/skipped.jsonl) or `{"kind": "eval", "step", "top1", "top5", "loss"}`
(multi-label runs add "prec1"), and at each start or restart of the workers `{"kind": "start", "step", "time",
"workers", "saved_by", "hosts"}` (saved_by: the world size of the checkpoint resumed from, null on a fresh start),
and with `eval.fewshot` `{"kind": "fewshot", "step", "fewshot/<dataset>/<n>shot", ..., "fewshot/seconds"}`
(pipeline/fewshot.py).
Only rank 0 writes. The file is kept locally and published whole (atomically) every `flush_every_s` seconds, at each
checkpoint and at the end; on resume, lines past the resumed step are dropped so the history has no duplicates.

Publishing is best-effort and off the training loop: a background thread uploads the newest snapshot (metrics.jsonl,
then the TensorBoard files), retrying brief faults as storage does; a publish that still fails is a warning and the
next flush publishes everything again. `close()` waits for a last publish. A process killed between two publishes
loses the lines since the last one, as it always could.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any

from pipeline import storage
from pipeline.errors import MixerError

log = logging.getLogger(__name__)

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
        # Flush requests and their outcome, counted: the publisher serves the newest request, skipping older ones.
        self._cond = threading.Condition()
        self._requested = self._attempted = self._published = 0
        self._closing = False
        self._thread: threading.Thread | None = None
        if not enabled:
            return
        # Reading the history must succeed (storage retries it): publishing without it would overwrite it.
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
            _download_tree(tb_url, self._tb_local)
        tb_dir = self._tb_local
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(tb_dir, purge_step=resume_step + 1 if resume_step else None)
        self._thread = threading.Thread(target=self._publisher, name="metrics-publisher", daemon=True)
        self._thread.start()

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self._cond:
            self._lines.append(json.dumps(record))
        kind = record.get("kind", "train")
        for key, value in record.items():
            if key not in ("kind", "step", "time") and isinstance(value, int | float):
                tag = key if key.startswith(f"{kind}/") else f"{kind}/{key}"
                self._tb.add_scalar(tag, value, record["step"])
        if time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self, wait: bool = False) -> bool:
        """Have the background thread publish everything logged so far. Returns at once (the training loop never
        waits for the store), or with `wait` once that publish is done; never raises. Returns whether the metrics
        are known to be published (always True without `wait`)."""
        if not self.enabled:
            return True
        self._tb.flush()  # local: the event files are complete before they are uploaded
        with self._cond:
            self._requested += 1
            target = self._requested
            self._last_flush = time.monotonic()
            self._cond.notify_all()
            if not wait:
                return True
            # The publisher gives up within storage's retry budget; the margin covers the upload itself.
            self._cond.wait_for(lambda: self._attempted >= target, timeout=2 * storage.retry_budget() + 60)
            return self._published >= target

    def close(self) -> None:
        """A last publish, waited for (with storage's retries); a failure is logged, never raised."""
        if not self.enabled:
            return
        self._tb.close()
        published = self.flush(wait=True)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        if published:
            if self._tb_remote:
                shutil.rmtree(self._tb_local, ignore_errors=True)
            return
        # Nothing is lost for good: the metrics stay on this machine, next to the TensorBoard files.
        kept = os.path.join(self._tb_local, "metrics.jsonl")
        with self._cond, open(kept, "w") as f:
            f.write("\n".join(self._lines) + "\n" if self._lines else "")
        log.error("metrics: the last publish to %s failed; the metrics are kept in %s (copy them there by hand)",
                  self.url, os.path.dirname(kept))

    def _publisher(self) -> None:
        """The background thread: publish the newest requested snapshot, until `close`."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requested > self._attempted or self._closing)
                if self._requested <= self._attempted:
                    return  # closing, with nothing left to publish
                target = self._requested
                text = "\n".join(self._lines) + "\n" if self._lines else ""
            ok = self._publish(text.encode())
            with self._cond:
                self._attempted = target
                if ok:
                    self._published = target
                self._cond.notify_all()

    def _publish(self, data: bytes) -> bool:
        try:
            storage.write_bytes_atomic(self.url, data)
            if self._tb_remote:
                fs, path = storage.filesystem(self._tb_remote)
                storage.retry(lambda: fs.put(self._tb_local + "/", path, recursive=True),
                              what=f"upload {self._tb_remote}")
            return True
        except Exception as e:
            log.warning("metrics: publishing to %s failed (%s: %s); the next flush publishes everything again",
                        self.url, type(e).__name__, e)
            return False


def _download_tree(url: str, local: str) -> None:
    """Copy every file under `url` into the folder `local`, each download checked and retried as storage does."""
    fs, path = storage.filesystem(url)
    root = path.rstrip("/")
    if not storage.exists(url):
        return
    for name in storage.retry(lambda: fs.find(root), what=f"list {url}"):
        relative = name[len(root):].lstrip("/")
        target = os.path.join(local, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        storage.get_file(storage.join(url, relative), target)
