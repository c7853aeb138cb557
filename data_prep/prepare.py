"""`mixer prepare`: list the source, plan the shards, run one Ray task per shard, then publish dataset.json.

Re-running the same command finishes an interrupted run: shards whose stats match the published tar are kept,
the rest are redone. The options and the plan's digest are recorded in `DEST/_progress/plan.json` first, and a
run with different options or a changed source is refused rather than mixed into the old shards.
`DEST/rejected.jsonl` and `DEST/dataset.json` are written last, in that order.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import ray
from tqdm import tqdm

from data_prep.images import ImagePolicy
from data_prep.plan import SPLITS, DatasetPlan, PlanOptions, ShardPlan, plan_dataset
from data_prep.shard import PROGRESS, write_shard
from data_prep.sources import Listing, list_source
from pipeline import dataset_json, ray_cluster, storage
from pipeline.errors import MixerError

MAX_BACKOFF_S = 30.0


class PrepareError(MixerError):
    """A run that cannot start or finish; the message says what to do."""


@dataclass(frozen=True)
class PrepareOptions(PlanOptions):
    """The plan's options (shard size, validation split, seed) plus the source's and the images'."""

    layout: str = "auto"
    classes_file: str | None = None
    max_size: int = 256
    quality: int = 95

    def check(self) -> None:
        if self.max_size < 1:
            raise PrepareError(f"--max-size must be at least 1, got {self.max_size}")
        if not 1 <= self.quality <= 100:
            raise PrepareError(f"--quality must be between 1 and 100, got {self.quality}")
        super().check()

    def policy(self) -> ImagePolicy:
        return ImagePolicy(self.max_size, self.quality)


def prepare(
    source: str,
    dest: str,
    options: PrepareOptions | None = None,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    retries: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare `source` into a sharded dataset at `dest`; returns the summary it prints."""
    options = options or PrepareOptions()
    options.check()
    started = time.perf_counter()
    source, dest = source.rstrip("/"), dest.rstrip("/")
    listing = list_source(source, options.layout, options.classes_file)
    for note in listing.notes:
        print(f"note: {note}", file=sys.stderr)
    plan = plan_dataset(listing, options)
    _claim(dest, source, listing, plan, options)
    _remove_temporaries(dest)

    ray_cluster.init_ray(ray_address)
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    tasks_started = time.perf_counter()
    stats = _run(plan, dest, options.policy(), listing, workers, retries, progress)
    task_seconds = time.perf_counter() - tasks_started

    rejected = sorted(listing.rejected + [r for s in stats.values() for r in s["rejected"]],
                      key=lambda r: (r["source"], r["reason"]))
    info = _dataset_info(dest, source, listing, plan, stats, options, len(rejected))
    if info.inputs != info.samples + info.rejected:
        raise PrepareError(f"internal error: {info.inputs} inputs but {info.samples} samples + {info.rejected} "
                           "rejected; dataset.json not written")
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected)
    storage.write_bytes_atomic(storage.join(dest, "rejected.jsonl"), lines.encode())
    dataset_json.save(info)

    seconds = time.perf_counter() - started
    processed = sum(s["inputs"] for s in stats.values() if not s["skipped"])
    summary = {
        "dest": dest,
        "inputs": info.inputs,
        "samples": {name: split.samples for name, split in info.splits.items()},
        "shards": {name: len(split.shards) for name, split in info.splits.items()},
        "rejected": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "bytes": sum(split.bytes for split in info.splits.values()),
        "seconds": round(seconds, 2),
        "images_per_s": round(processed / task_seconds, 1),
        "shards_written": sum(not s["skipped"] for s in stats.values()),
        "shards_skipped": sum(s["skipped"] for s in stats.values()),
    }
    print(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    splits = ", ".join(f"{name} {n:,} samples in {s['shards'][name]} shards" for name, n in s["samples"].items())
    reasons = ", ".join(f"{reason} {n}" for reason, n in s["rejected"].items()) or "none"
    return (
        f"prepared {s['dest']}: {s['inputs']:,} inputs -> {splits}\n"
        f"  rejected {sum(s['rejected'].values()):,} ({reasons}); see rejected.jsonl\n"
        f"  {s['bytes'] / 1e6:,.1f} MB in {s['seconds']:.1f} s; shards at {s['images_per_s']:,.1f} images/s "
        f"({s['shards_written']} written, {s['shards_skipped']} already complete)"
    )


def _claim(dest: str, source: str, listing: Listing, plan: DatasetPlan, options: PrepareOptions) -> None:
    """Record what this run makes, or check it against what an earlier run into `dest` was making."""
    record = {"source": source, **asdict(options), "layout": listing.layout,
              "inputs": listing.inputs, "shards": len(plan.shards), "plan_sha256": plan.digest}
    url = storage.join(dest, PROGRESS, "plan.json")
    try:
        previous = storage.read_json(url)
    except FileNotFoundError:
        storage.write_json_atomic(url, record)
        return
    start_over = (f"Re-run with the earlier options to finish that run, or choose another DEST, or delete "
                  f"{dest} to start over.")
    changed = [k for k in record if k not in ("inputs", "shards", "plan_sha256") and previous.get(k) != record[k]]
    if changed:
        said = "; ".join(f"{'--' + k.replace('_', '-') if k != 'source' else 'SOURCE'} was {previous.get(k)!r}, "
                         f"now {record[k]!r}" for k in changed)
        raise PrepareError(f"{dest} holds a run made with other options ({said}). {start_over}")
    if previous.get("plan_sha256") != plan.digest:
        raise PrepareError(
            f"{dest} holds a run of the same options, but the source changed since ({previous.get('inputs')} "
            f"inputs then, {listing.inputs} now; {url} records the plan). {start_over}"
        )


def _remove_temporaries(dest: str) -> None:
    """A killed run can leave local temporary files behind (object stores never show partial uploads)."""
    if not storage.is_local(dest):
        return
    fs, root = storage.filesystem(dest)
    for folder in (root, os.path.join(root, PROGRESS)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".tmp-"):
                    os.unlink(os.path.join(folder, name))


def _run(
    plan: DatasetPlan, dest: str, policy: ImagePolicy, listing: Listing, workers: int, retries: int, progress: bool
) -> dict[str, dict[str, Any]]:
    """Every shard through a Ray task, at most `workers` at a time; a failed shard (exception or lost worker) is
    retried after an exponential backoff, up to `retries` times."""
    task = ray.remote(write_shard).options(num_cpus=1, max_retries=0)
    classes = ray.put(listing.classes)
    queue: list[tuple[float, int, ShardPlan]] = [(0.0, 0, shard) for shard in plan.shards]  # (not before, try, shard)
    running: dict[Any, tuple[int, ShardPlan]] = {}
    stats: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    images, started = 0, time.perf_counter()
    bar = tqdm(total=len(plan.shards), unit="shard", desc="prepare", disable=not progress, file=sys.stderr)
    while queue or running:
        now = time.monotonic()
        for entry in [e for e in queue if e[0] <= now][: max(0, workers - len(running))]:
            queue.remove(entry)
            _, attempt, shard = entry
            running[task.remote(shard, dest, policy, classes, listing.multi_label)] = (attempt, shard)
        if not running:
            time.sleep(max(0.0, min(e[0] for e in queue) - now))
            continue
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0 if queue else None)
        for ref in done:
            attempt, shard = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                reason = _short_error(e)
                if attempt + 1 > retries:
                    failed[shard.name] = reason
                    bar.update()
                    continue
                delay = min(MAX_BACKOFF_S, 2.0**attempt)
                tqdm.write(f"{shard.name}: attempt {attempt + 1} failed ({reason}); retrying in {delay:.0f} s",
                           file=sys.stderr)
                queue.append((time.monotonic() + delay, attempt + 1, shard))
                continue
            stats[shard.name] = result
            if not result["skipped"]:
                images += result["inputs"]
            bar.update()
            bar.set_postfix_str(f"{images / (time.perf_counter() - started):.1f} images/s")
    bar.close()
    if failed:
        listed = "\n".join(f"  {name}: {reason}" for name, reason in sorted(failed.items()))
        raise PrepareError(
            f"{len(failed)} of {len(plan.shards)} shards failed after {retries + 1} attempts; dataset.json not "
            f"written. Fix the cause and re-run the same command: completed shards are kept.\n{listed}"
        )
    return stats


def _short_error(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"


def _dataset_info(
    dest: str, source: str, listing: Listing, plan: DatasetPlan, stats: dict[str, dict[str, Any]],
    options: PrepareOptions, rejected: int,
) -> dataset_json.DatasetInfo:
    splits = {}
    for split in SPLITS:
        shards = [
            dataset_json.Shard(s.name, stats[s.name]["samples"], stats[s.name]["bytes"], stats[s.name]["sha256"])
            for s in plan.shards
            if s.split == split and stats[s.name]["samples"] > 0
        ]
        if shards:
            splits[split] = dataset_json.Split(shards)
    source_info: dict[str, Any] = {"url": source, "layout": listing.layout}
    if options.classes_file:
        source_info["classes_file"] = options.classes_file
    return dataset_json.DatasetInfo(
        url=dest,
        classes=listing.classes,
        multi_label=listing.multi_label,
        splits=splits,
        seed=options.seed,
        image_policy={"max_size": options.max_size, "quality": options.quality, "encoding": "jpeg"},
        source=source_info,
        inputs=listing.inputs,
        rejected=rejected,
    )
