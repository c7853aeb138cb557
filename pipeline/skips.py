"""Samples the data stream skipped as unusable: `RUN/skipped.jsonl`, the run's count, and when to stop.

The data stream (pipeline/data.py) replaces a sample it cannot use deterministically and reports it; this module
keeps the run's record of them across ranks and decides when a dataset is too rotten to train on.
"""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import asdict
from typing import Any

import torch.distributed as dist

from pipeline import data, metrics, storage
from pipeline.config import Spec
from pipeline.dataset_json import DatasetError
from pipeline.errors import FinalError

log = logging.getLogger("mixer.train")

MIN_ALLOWED_SKIPS = 10  # the skip fraction is judged once the threshold allows this many skipped samples


class TooManySkipsError(DatasetError, FinalError):
    """More of the samples read were unusable than data.max_skipped_fraction allows."""


class SkipLog:
    """The samples the data stream skipped: `RUN/skipped.jsonl`, one line per sample ({"step", "key", "shard",
    "reason", "epoch", "stream", "position"}), the run's count for each train record, and the stop rule.

    Stop rule: with R = step x global batch samples read and S of them skipped, the run stops when
    S > data.max_skipped_fraction x R, judged only once max_skipped_fraction x R >= MIN_ALLOWED_SKIPS (a fraction of
    0 stops at the first skip), so that a bad sample early in a run, when R is small, does not end it.

    The ranks send their skips at reports only (`gather`: at log steps and before each checkpoint); rank 0 keeps
    the file (written whole when a report brings new lines, like metrics.jsonl) and decides, and every rank raises
    the same TooManySkipsError in `stop_if_over`, so that none is left waiting in a collective. On resume, lines
    past the resumed step are dropped: those steps run again and skip the same samples."""

    def __init__(self, spec: Spec, enabled: bool, resume_step: int):
        self.url = storage.join(spec.run.url, "skipped.jsonl")
        self.enabled, self.dataset = enabled, spec.data.dataset
        self.threshold, self.global_batch = spec.data.max_skipped_fraction, spec.batch.global_
        self.pending: list[dict[str, Any]] = []  # this rank's skips since the last report
        self.lines: list[dict[str, Any]] = []  # the run's, on rank 0
        self.count, self.stop_message, self.reported_step = 0, None, resume_step
        if enabled and storage.exists(self.url):
            text = storage.read_bytes(self.url).decode()
            found = [line for _, line in storage.json_lines(text, self.url, DatasetError)]
            self.lines = [line for line in found if line.get("step", 0) <= resume_step]
            if len(self.lines) < len(found):
                self._write()
        self.count = len(self.lines)

    def add(self, step: int, skipped: list[data.SkippedSample]) -> None:
        self.pending += [{"step": step, **asdict(s)} for s in skipped]

    def gather(self, step: int) -> int:
        """Collect every rank's new skips on rank 0 and decide whether to stop (a collective: all ranks call it at
        the same steps). Returns the run's count of skipped samples."""
        if step == self.reported_step:
            return self.count
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.pending)
        self.pending, self.reported_step = [], step
        verdict: list[Any] = [None]
        if self.enabled:
            new = [line for part in gathered for line in part]
            # Sorted, so that the file does not depend on which rank read which stream.
            new.sort(key=lambda line: (line["step"], line["stream"], line["position"]))
            if new:
                self.lines += new
                self._write()
            verdict[0] = (len(self.lines), self._stop_message(step))
        dist.broadcast_object_list(verdict, src=0)
        self.count, self.stop_message = verdict[0]
        return self.count

    def stop_if_over(self, metrics_log: metrics.MetricsLog | None) -> None:
        """Raise on every rank when the last `gather` found too many skips (the metrics published first)."""
        if self.stop_message is None:
            return
        if metrics_log is not None:
            metrics_log.flush(wait=True)
        raise TooManySkipsError(self.stop_message)

    def settle(self, step: int, metrics_log: metrics.MetricsLog | None) -> None:
        self.gather(step)
        self.stop_if_over(metrics_log)

    def _stop_message(self, step: int) -> str | None:
        read, skipped = step * self.global_batch, len(self.lines)
        allowed = self.threshold * read
        if skipped <= allowed or (self.threshold > 0 and allowed < MIN_ALLOWED_SKIPS):
            return None
        # One URL only, the one `mixer verify` needs: the shards' own are in skipped.jsonl.
        prefix = self.dataset.rstrip("/") + "/"
        worst = collections.Counter(line["shard"].removeprefix(prefix) for line in self.lines).most_common(3)
        shards = ", ".join(f"{shard} ({n})" for shard, n in worst)
        return (f"{skipped} of the {read} samples read by step {step} were skipped as unusable (fraction "
                f"{skipped / read:.4g}, over data.max_skipped_fraction={self.threshold:g}); most skips in {shards}; "
                "each one and why: skipped.jsonl in the run folder. Check the dataset with "
                f"`mixer verify {self.dataset}` and prepare it again, or raise data.max_skipped_fraction to train on")

    def _write(self) -> None:
        # Best effort: rank 0 failing here would leave the other ranks waiting in the broadcast; the lines stay in
        # memory and the next write, whole, catches up.
        try:
            storage.write_bytes_atomic(self.url, "".join(json.dumps(line) + "\n" for line in self.lines).encode())
        except OSError as e:
            log.warning("could not write %s (%s); the next report writes it again", self.url, e)
