"""`mixer prepare`: list and plan the source with Ray tasks, run one Ray task per shard, then publish dataset.json.

Re-running the same command finishes an interrupted run: shards whose recorded stats still name the published
object are kept (without reading them), the rest are redone. The options and the plan's digest are recorded in
`DEST/_progress/plan.json` first, and a run with different options or a changed source is refused rather than mixed
into the old shards. `DEST/rejected.jsonl` and `DEST/dataset.json` are written last, in that order. With
`plan_only`, the plan record is all that is written.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any

import ray
from tqdm import tqdm

from data_prep.dedup import Index, build_index
from data_prep.images import VERSION as IMAGE_VERSION
from data_prep.images import ImagePolicy
from data_prep.plan import SPLITS, Plan, PlanOptions, ShardSpec, plan_source
from data_prep.shard import PROGRESS, completed_shards, write_shard
from data_prep.sources import partitions
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
    dedup_against: tuple[str, ...] = ()  # reference sets: prepared datasets or folders of images

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
    plan_only: bool = False,
) -> dict[str, Any]:
    """Prepare `source` into a sharded dataset at `dest`; returns the summary it prints."""
    options = options or PrepareOptions()
    options.check()
    started = time.perf_counter()
    source, dest = source.rstrip("/"), dest.rstrip("/")
    parts = partitions(source, options.layout)
    ray_cluster.init_ray(ray_address)
    workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    plan = plan_source(parts, options, classes_file=options.classes_file, workers=workers)
    for note in plan.notes:
        print(f"note: {note}", file=sys.stderr)
    references = _references(options.dedup_against)
    _claim(dest, source, plan, options, references)
    if plan_only:
        summary = _plan_summary(dest, plan, len(parts.parts), time.perf_counter() - started)
        print(format_plan(summary))
        return summary
    _remove_temporaries(dest)

    tasks_started = time.perf_counter()
    with tempfile.TemporaryFile(prefix="mixer-rejected-") as spool:
        stats, spooled = _run(plan, dest, options.policy(), workers, retries, progress, spool,
                              ray.put(references) if references else None)
        task_seconds = time.perf_counter() - tasks_started
        _remove_temporaries(dest)  # of shard writes killed during this run (a lost host), now redone elsewhere
        reasons, matched = _write_rejected(dest, plan, spool, spooled)
    dedup = _dedup_counts(references, matched)
    info = _dataset_info(dest, source, plan, stats, options, sum(reasons.values()), dedup)
    if info.inputs != info.samples + info.rejected:
        raise PrepareError(f"internal error: {info.inputs} inputs but {info.samples} samples + {info.rejected} "
                           "rejected; dataset.json not written")
    dataset_json.save(info)

    summary = _summary(info, stats, reasons, dedup, plan.digest, time.perf_counter() - started, task_seconds)
    print(format_summary(summary))
    return summary


def _summary(info: dataset_json.DatasetInfo, stats: dict[str, dict[str, Any]], reasons: Counter,
             dedup: dict[str, dict[str, int]], plan_digest: str, seconds: float, task_seconds: float) -> dict[str, Any]:
    processed = sum(s["inputs"] for s in stats.values() if not s["skipped"])
    summary = {
        "dest": info.url,
        "inputs": info.inputs,
        "samples": {name: split.samples for name, split in info.splits.items()},
        "shards": {name: len(split.shards) for name, split in info.splits.items()},
        "rejected": dict(sorted(reasons.items())),
        "bytes": sum(split.bytes for split in info.splits.values()),
        "seconds": round(seconds, 2),
        "images_per_s": round(processed / task_seconds, 1),
        "shards_written": sum(not s["skipped"] for s in stats.values()),
        "shards_skipped": sum(s["skipped"] for s in stats.values()),
        "plan_sha256": plan_digest,
    }
    if dedup:
        summary["near_duplicates"] = dedup
    return summary


def _splits_and_reasons(s: dict[str, Any]) -> tuple[str, str]:
    splits = ", ".join(f"{name} {n:,} samples in {s['shards'][name]:,} shards" for name, n in s["samples"].items())
    return splits, ", ".join(f"{reason} {n:,}" for reason, n in s["rejected"].items()) or "none"


def format_summary(s: dict[str, Any]) -> str:
    splits, reasons = _splits_and_reasons(s)
    dedup = "".join(f"\n  near-duplicates of {url} ({d['references']:,} reference images): {d['near_duplicates']:,}"
                    for url, d in s.get("near_duplicates", {}).items())
    return (
        f"prepared {s['dest']}: {s['inputs']:,} inputs -> {splits}\n"
        f"  rejected {sum(s['rejected'].values()):,} ({reasons}); see rejected.jsonl{dedup}\n"
        f"  {s['bytes'] / 1e6:,.1f} MB in {s['seconds']:.1f} s; shards at {s['images_per_s']:,.1f} images/s "
        f"({s['shards_written']} written, {s['shards_skipped']} already complete)"
    )


def format_plan(s: dict[str, Any]) -> str:
    splits, reasons = _splits_and_reasons(s)
    return (
        f"plan for {s['dest']} ({s['layout']}, {s['partitions']:,} partitions): {s['inputs']:,} inputs, "
        f"{s['classes']:,} classes{' (multi-label)' if s['multi_label'] else ''} -> {splits}\n"
        f"  refused while listing and planning: {sum(s['rejected'].values()):,} ({reasons}); images are checked "
        "when the shards are made\n"
        f"  plan sha256 {s['plan_sha256']}, recorded in {s['record']}; planned in {s['seconds']:.1f} s\n"
        "  run the same command without --plan-only to make the shards"
    )


def _plan_summary(dest: str, plan: Plan, partitions: int, seconds: float) -> dict[str, Any]:
    shards = Counter(spec.split for spec in plan.shards)
    return {
        "dest": dest, "layout": plan.layout, "partitions": partitions, "inputs": plan.inputs,
        "classes": len(plan.classes), "multi_label": plan.multi_label, "samples": plan.split_sizes(),
        "shards": {split: shards[split] for split in SPLITS if shards[split]}, "rejected": plan.rejected_counts,
        "plan_sha256": plan.digest, "record": storage.join(dest, PROGRESS, "plan.json"),
        "seconds": round(seconds, 2),
    }


def _references(urls: tuple[str, ...]) -> Index | None:
    """The de-duplication index of the reference sets, built by Ray tasks; None without reference sets."""
    if not urls:
        return None
    started = time.perf_counter()
    index, unreadable = build_index(list(urls))
    print(f"note: de-duplication index: {len(index.names):,} reference images from {len(urls)} set(s), "
          f"{len(index.owner):,} crops, in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if unreadable:
        listed = "; ".join(unreadable[:3]) + (f" (and {len(unreadable) - 3} more)" if len(unreadable) > 3 else "")
        print(f"note: {len(unreadable)} reference images could not be read and are not checked against: {listed}",
              file=sys.stderr)
    return index


def _dedup_counts(references: Index | None, matched: Counter) -> dict[str, dict[str, int]]:
    if references is None:
        return {}
    sizes = Counter(references.set_of.tolist())
    return {url: {"references": sizes[i], "near_duplicates": matched[url]} for i, url in enumerate(references.sets)}


def _claim(dest: str, source: str, plan: Plan, options: PrepareOptions, references: Index | None = None) -> None:
    """Record what this run makes, or check it against what an earlier run into `dest` was making."""
    record = {"source": source, **asdict(options), "image_version": IMAGE_VERSION, "layout": plan.layout,
              "inputs": plan.inputs, "shards": len(plan.shards), "plan_sha256": plan.digest}
    if references is not None:
        record["dedup_sha256"] = references.digest()
    record = json.loads(json.dumps(record))  # as it reads back: tuples are lists
    url = storage.join(dest, PROGRESS, "plan.json")
    try:
        previous = storage.read_json(url)
    except FileNotFoundError:
        storage.write_json_atomic(url, record)
        return
    elsewhere = f"or choose another DEST, or delete {dest} to start over."
    start_over = f"Re-run with the earlier options to finish that run, {elsewhere}"
    # An option a record lacks was written by a release without it, whose runs all had its default; a record
    # without an image version was made by the first image path.
    earlier = {"image_version": 1, **json.loads(json.dumps(asdict(PrepareOptions()))), **previous}
    if earlier["image_version"] != IMAGE_VERSION:
        raise PrepareError(
            f"{dest} holds a run whose images were made by image path {earlier['image_version']}; this release makes "
            f"them with image path {IMAGE_VERSION}, and one dataset must not mix the two. Finish that run with the "
            f"release that started it, {elsewhere}")
    changed = [k for k in record if k not in ("inputs", "shards", "plan_sha256") and earlier.get(k) != record[k]]
    if changed:
        said = "; ".join(f"{'--' + k.replace('_', '-') if k != 'source' else 'SOURCE'} was {earlier.get(k)!r}, "
                         f"now {record[k]!r}" for k in changed)
        raise PrepareError(f"{dest} holds a run made with other options ({said}). {start_over}")
    if previous.get("plan_sha256") != plan.digest:
        raise PrepareError(
            f"{dest} holds a run of the same options, but the source changed since ({previous.get('inputs')} "
            f"inputs then, {plan.inputs} now; {url} records the plan). {start_over}"
        )


def _remove_temporaries(dest: str) -> None:
    """A killed run or shard task can leave local temporary files behind (object stores never show partial
    uploads); called when no shard task of this run is left."""
    if not storage.is_local(dest):
        return
    fs, root = storage.filesystem(dest)
    for folder in (root, os.path.join(root, PROGRESS)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".tmp-"):
                    os.unlink(os.path.join(folder, name))


def _spool(spool, rejected: list[dict[str, str]]) -> tuple[int, int]:
    """Park a shard's refused inputs on local disk, so the driver does not hold them; (offset, length)."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejected).encode()
    spool.seek(0, os.SEEK_END)
    offset = spool.tell()
    spool.write(data)
    return offset, len(data)


def _run(
    plan: Plan, dest: str, policy: ImagePolicy, workers: int, retries: int, progress: bool, spool, references: Any,
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[int, int]]]:
    """Every shard not already complete through a Ray task, at most `workers` at a time; a failed shard (exception,
    lost worker or host) is retried after an exponential backoff, up to `retries` times. Each event costs the same
    however many shards are queued: ready shards wait in a deque, retries in a heap by time."""
    task = ray.remote(write_shard).options(num_cpus=1, max_retries=0, num_returns=2)
    classes = ray.put(plan.classes)
    stats: dict[str, dict[str, Any]] = {}
    spooled: dict[str, tuple[int, int]] = {}
    for name, done in completed_shards(dest, [s.name for s in plan.shards]).items():
        spooled[name] = _spool(spool, done.pop("rejected", []))
        stats[name] = {**done, "skipped": True}
    ready: deque[tuple[int, ShardSpec]] = deque((0, s) for s in plan.shards if s.name not in stats)
    waiting: list[tuple[float, int, int, ShardSpec]] = []  # (not before, tie-break, attempt, shard)
    running: dict[Any, tuple[int, ShardSpec, Any]] = {}
    failed: dict[str, str] = {}
    tie_break = itertools.count()
    images, started = 0, time.perf_counter()
    bar = tqdm(total=len(plan.shards), initial=len(stats), unit="shard", desc="prepare", disable=not progress,
               file=sys.stderr)
    while ready or waiting or running:
        now = time.monotonic()
        while waiting and waiting[0][0] <= now:
            _, _, attempt, shard = heapq.heappop(waiting)
            ready.append((attempt, shard))
        while ready and len(running) < workers:
            attempt, shard = ready.popleft()
            pieces = plan.pieces(shard)
            ref, rejected = task.remote(shard, pieces, dest, policy, classes, plan.multi_label, references,
                                        *[plan.tables[p.bucket] for p in pieces])
            running[ref] = (attempt, shard, rejected)
        if not running:
            time.sleep(max(0.0, waiting[0][0] - now))
            continue
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0 if waiting else None)
        for ref in done:
            attempt, shard, rejected = running.pop(ref)
            try:
                result = ray.get(ref)
                spooled[shard.name] = _spool(spool, ray.get(rejected))
            except ray.exceptions.RayError as e:
                reason = _short_error(e)
                if attempt + 1 > retries:
                    failed[shard.name] = reason
                    bar.update()
                    continue
                delay = min(MAX_BACKOFF_S, 2.0**attempt)
                tqdm.write(f"{shard.name}: attempt {attempt + 1} failed ({reason}); retrying in {delay:.0f} s",
                           file=sys.stderr)
                heapq.heappush(waiting, (time.monotonic() + delay, next(tie_break), attempt + 1, shard))
                continue
            stats[shard.name] = {**result, "skipped": False}
            images += result["inputs"]
            bar.update()
            bar.set_postfix_str(f"{images / (time.perf_counter() - started):.1f} images/s")
    bar.close()
    if failed:
        _raise_failed(failed, len(plan.shards), retries)
    return stats, spooled


def _raise_failed(failed: dict[str, str], shards: int, retries: int) -> None:
    listed = "\n".join(f"  {name}: {reason}" for name, reason in sorted(failed.items()))
    raise PrepareError(
        f"{len(failed)} of {shards} shards failed after {retries + 1} attempts; dataset.json not "
        f"written. Fix the cause and re-run the same command: completed shards are kept.\n{listed}"
    )


def _write_rejected(dest: str, plan: Plan, spool, spooled: dict[str, tuple[int, int]]) -> tuple[Counter, Counter]:
    """`DEST/rejected.jsonl`: the inputs refused while planning (in plan order), then those refused while making
    the shards (shard after shard), streamed through a local file and published at once; counts by reason, and
    near-duplicates by reference set."""
    reasons: Counter = Counter()
    matched: Counter = Counter()
    with tempfile.NamedTemporaryFile(prefix="mixer-rejected-", suffix=".jsonl") as out:
        for record in plan.rejected():
            out.write((json.dumps(record, sort_keys=True) + "\n").encode())
            reasons[record["reason"]] += 1
        for shard in plan.shards:
            offset, length = spooled[shard.name]
            spool.seek(offset)
            data = spool.read(length)
            out.write(data)
            for record in map(json.loads, data.splitlines()):
                reasons[record["reason"]] += 1
                if "reference_set" in record:
                    matched[record["reference_set"]] += 1
        out.flush()
        storage.put_file_atomic(out.name, storage.join(dest, "rejected.jsonl"))
    return reasons, matched


def _short_error(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"


def _dataset_info(
    dest: str, source: str, plan: Plan, stats: dict[str, dict[str, Any]], options: PrepareOptions, rejected: int,
    dedup: dict[str, dict[str, int]],
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
    source_info: dict[str, Any] = {"url": source, "layout": plan.layout}
    if options.classes_file:
        source_info["classes_file"] = options.classes_file
    if dedup:
        source_info["dedup_against"] = dedup
    return dataset_json.DatasetInfo(
        url=dest,
        classes=plan.classes,
        multi_label=plan.multi_label,
        splits=splits,
        seed=options.seed,
        image_policy={"max_size": options.max_size, "quality": options.quality, "encoding": "jpeg"},
        source=source_info,
        inputs=plan.inputs,
        rejected=rejected,
    )
