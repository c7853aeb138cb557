"""The shard plan, made by tasks so that no process holds every input: a pure function of the source and options.

Every input gets a 64-bit hash h, a bijection of sha1(source) mixed with the seed, and the plan is the inputs in
the order of h. That order is the global shuffle (every shard mixes classes), and because h is uniform the order
is cut into buckets by value alone, without sampling, so the work runs in four waves of tasks:

1. list: each task lists a few partitions and sends every input to the bucket of its h;
2. clean: each bucket sorts its inputs by h, drops the second listing of a source ("duplicate"), turns label names
   into indices (refusing "no-label" and "unknown-class"), gives each input its key, and counts inputs per class;
3. split: from the per-class counts of the buckets before it, each bucket knows every input's rank inside its class
   and holds out, per class, the inputs at evenly spaced ranks ("val", stratified on the first label: exactly
   the number asked for each class); it returns its samples as an Arrow table, train then val, in order of h;
4. the shards are the order of h cut into equal runs (sizes differ by at most one); a shard reads its run from the
   one or two bucket tables that hold it.

The driver holds per-class counts and per-bucket offsets: O(classes + buckets + shards), never O(inputs). The
result does not depend on how many workers, buckets or partitions there are: only on the inputs, their sources,
their order inside the source (the first listing of a duplicate wins) and the options. The plan's digest names
exactly what will be written; a resumed run must have the same digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from data_prep.sources import Item, Listed, Partition, Partitions, SourceError, list_partition, read_classes_file
from pipeline.errors import MixerError

SPLITS = ("train", "val")
KEY_PREFIX_CHARS = 40
ROWS_PER_BUCKET = 500_000
ROWS_PER_LIST_TASK = 500_000
MAX_BUCKETS = 4096
MASK64 = (1 << 64) - 1
DIGEST_MOD = 1 << 128


class PlanError(MixerError):
    """Options that cannot make a plan; the message names the option."""


@dataclass(frozen=True)
class PlanOptions:
    shard_size: int = 1000
    val_per_class: int | None = None
    val_fraction: float | None = None
    seed: int = 0

    def check(self) -> None:
        if self.shard_size < 1:
            raise PlanError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.val_per_class is not None and self.val_fraction is not None:
            raise PlanError("give --val-per-class or --val-fraction, not both")
        if self.val_per_class is not None and self.val_per_class < 0:
            raise PlanError(f"--val-per-class must be 0 or more, got {self.val_per_class}")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise PlanError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")

    def held_out(self, counts: np.ndarray) -> np.ndarray:
        """How many inputs of each class (by first label) go to val."""
        if self.val_per_class is not None:
            return np.minimum(counts, self.val_per_class)
        if self.val_fraction is not None:
            return np.floor(self.val_fraction * counts + 0.5).astype(np.int64)
        return np.zeros_like(counts)


@dataclass
class ShardPlan:
    """One shard with its samples, as the shard writer takes it."""

    name: str
    split: str
    samples: list[tuple[str, Item]]  # (key, input) in the order they are written


@dataclass(frozen=True)
class ShardSpec:
    name: str
    split: str
    start: int  # position of its first sample in its split's order
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Piece:
    bucket: int
    start: int  # rows of the bucket's table
    stop: int


@dataclass
class Runner:
    """Where the plan's tasks run: Ray tasks (values are object refs), or this process (values are values)."""

    ray: bool = True
    _remote: dict[Callable, Any] = field(default_factory=dict)

    def call(self, fn: Callable, *args: Any, num_returns: int = 1) -> Any:
        if not self.ray:
            return fn(*args)
        import ray

        if fn not in self._remote:
            self._remote[fn] = ray.remote(fn)
        return self._remote[fn].options(num_cpus=1, num_returns=num_returns).remote(*args)

    def get(self, value: Any) -> Any:
        if not self.ray:
            return value
        import ray

        try:
            return ray.get(value)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, MixerError):
                raise e.cause from None  # the message already names the file and the problem
            raise

    def put(self, value: Any) -> Any:
        if not self.ray:
            return value
        import ray

        return ray.put(value)


@dataclass
class Plan:
    layout: str
    classes: list[str]
    multi_label: bool
    inputs: int
    digest: str
    shards: list[ShardSpec]
    rejected_counts: dict[str, int]  # by reason, for inputs refused while listing and planning
    notes: list[str]
    runner: Runner
    tables: list[Any]  # per bucket: its samples (train then val) as an Arrow table, or a ref to it
    starts: dict[str, np.ndarray]  # per split: position of each bucket's first sample in that split's order
    counts: dict[str, np.ndarray]  # per split: samples of that split in each bucket
    rejected_parts: list[Any]  # per bucket: its refused inputs, in order, or a ref to them

    def split_sizes(self) -> dict[str, int]:
        return {split: int(self.counts[split].sum()) for split in SPLITS if self.counts[split].sum()}

    def pieces(self, shard: ShardSpec) -> list[Piece]:
        """Where a shard's samples are: runs of rows in one or more bucket tables, in order."""
        starts, counts = self.starts[shard.split], self.counts[shard.split]
        out = []
        first = int(np.searchsorted(starts, shard.start, side="right")) - 1
        for bucket in range(max(first, 0), len(starts)):
            lo, hi = int(starts[bucket]), int(starts[bucket] + counts[bucket])
            if lo >= shard.stop:
                break
            a, b = max(lo, shard.start), min(hi, shard.stop)
            if a < b:
                offset = 0 if shard.split == "train" else int(self.counts["train"][bucket])  # val follows train
                out.append(Piece(bucket, offset + a - lo, offset + b - lo))
        return out

    def shard_plan(self, shard: ShardSpec) -> ShardPlan:
        """A shard with its samples, read here (small plans and tests; shard tasks read their pieces themselves)."""
        pieces = self.pieces(shard)
        tables = [self.runner.get(self.tables[p.bucket]) for p in pieces]
        return shard_from_pieces(shard, pieces, *tables)

    def rejected(self) -> Iterator[dict[str, str]]:
        """Every input refused while listing and planning, bucket after bucket; one bucket in memory at a time."""
        for part in self.rejected_parts:
            yield from self.runner.get(part)


def shard_from_pieces(shard: ShardSpec, pieces: list[Piece], *tables: pa.Table) -> ShardPlan:
    samples = []
    for piece, table in zip(pieces, tables, strict=True):
        for row in table.slice(piece.start, piece.stop - piece.start).to_pylist():
            fields = json.loads(row["fields"]) if row["fields"] is not None else None
            item = Item(row["source"], row["url"], tuple(row["labels"]), row["size"], row["offset"], row["row"], fields)
            samples.append((row["key"], item))
    if len(samples) != shard.size:
        raise PlanError(f"internal error: {shard.name} planned {shard.size} samples, its pieces hold {len(samples)}")
    return ShardPlan(shard.name, shard.split, samples)


def splitmix64(x: int) -> int:
    """A bijection of 64-bit integers that scatters nearby inputs (Steele, Lea and Flood's SplitMix64 finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def source_hash(source: str) -> int:
    """The 64 bits of sha1(source) that also name the sample (its key)."""
    return int.from_bytes(hashlib.sha1(source.encode()).digest()[:8], "big")


def key_prefix(class_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", class_name)[:KEY_PREFIX_CHARS]


def sample_key(source: str, class_name: str) -> str:
    return f"{key_prefix(class_name)}-{source_hash(source):016x}"


def plan_source(
    parts: Partitions, options: PlanOptions, *, classes_file: str | None = None, runner: Runner | None = None,
    workers: int = 1,
) -> Plan:
    """Plan the shards of a source cut into `parts`; `workers` only sets how finely the listing is cut into tasks."""
    options.check()
    runner = runner or Runner()
    buckets = min(MAX_BUCKETS, max(1, math.ceil(parts.estimated_inputs() / ROWS_PER_BUCKET)))
    seed_mix = splitmix64(options.seed & MASK64)

    listed = [runner.call(_list_task, group, parts.layout, seed_mix, buckets, num_returns=buckets + 1)
              for group in _groups(parts.parts, workers)]
    inputs, hidden, names, max_index, kinds, declared = 0, 0, set(), -1, set(), None
    for refs in listed:
        summary = runner.get(refs[0])
        inputs += summary["inputs"]
        hidden += summary["hidden"]
        names |= summary["names"]
        max_index = max(max_index, summary["max_index"])
        kinds |= summary["kinds"]
        declared = declared or summary["declared"]
    if inputs == 0:
        raise SourceError(f"no inputs found in the {parts.layout} source ({len(parts.parts)} partitions listed)")
    if kinds == {"name", "index"}:
        raise SourceError("labels mix class names and indices; use one kind throughout")
    if classes_file:
        classes = read_classes_file(classes_file)
    elif kinds == {"index"}:
        # Names the source declares stay even when a row's index is out of their range: that row is refused.
        classes = declared or [str(i) for i in range(max_index + 1)]
    else:
        classes = sorted(names)
    notes = list(parts.notes)
    if hidden:
        notes.append(f"ignored {hidden} hidden files (names starting with '.') inside the partitions")

    classes_ref = runner.put(classes)
    cleaned = [runner.call(_clean_task, classes_ref, *[refs[1 + b] for refs in listed], num_returns=3)
               for b in range(buckets)]
    del listed
    totals = np.zeros(len(classes), np.int64)
    multi_label, reasons, rejected_hash = False, Counter(), 0
    for _, _, info in cleaned:
        info = runner.get(info)
        totals += info["counts"]
        multi_label |= info["multi_label"]
        reasons.update(info["reasons"])
        rejected_hash = (rejected_hash + info["digest"]) % DIGEST_MOD
    held_out = runner.put(options.held_out(totals))
    totals_ref = runner.put(totals)

    offsets = np.zeros(len(classes), np.int64)
    split = []
    for kept, _, info in cleaned:
        split.append(runner.call(_split_task, kept, offsets, held_out, totals_ref, num_returns=2))
        offsets += runner.get(info)["counts"]
    counts = {name: np.zeros(buckets, np.int64) for name in SPLITS}
    rows_hash = 0
    for b, (_, info) in enumerate(split):
        info = runner.get(info)
        counts["train"][b], counts["val"][b] = info["train"], info["val"]
        rows_hash = (rows_hash + info["digest"]) % DIGEST_MOD
    starts = {name: np.concatenate([[0], np.cumsum(counts[name])[:-1]]).astype(np.int64) for name in SPLITS}
    shards = [spec for name in SPLITS for spec in _cut(name, int(counts[name].sum()), options.shard_size)]
    record = {"classes": classes, "multi_label": multi_label, "inputs": inputs, "samples": rows_hash,
              "rejected": rejected_hash, "shards": [(s.name, s.size) for s in shards]}
    digest = hashlib.sha256(json.dumps(record).encode()).hexdigest()
    return Plan(parts.layout, classes, multi_label, inputs, digest, shards, dict(sorted(reasons.items())), notes,
                runner, [s[0] for s in split], starts, counts, [c[1] for c in cleaned])


def _groups(parts: list[Partition], workers: int) -> list[list[Partition]]:
    """Consecutive partitions in groups of about ROWS_PER_LIST_TASK rows, and at least a few groups per worker."""
    total = sum(max(p.rows, 1) for p in parts)
    count = min(len(parts), max(math.ceil(total / ROWS_PER_LIST_TASK), 4 * max(1, workers)))
    target = total / count
    groups: list[list[Partition]] = [[]]
    rows = 0
    for part in parts:
        if groups[-1] and rows >= target * len(groups):
            groups.append([])
        groups[-1].append(part)
        rows += max(part.rows, 1)
    return groups


def _cut(split: str, n: int, shard_size: int) -> list[ShardSpec]:
    if n == 0:
        return []
    count = math.ceil(n / shard_size)
    sizes = [n // count + (1 if i < n % count else 0) for i in range(count)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [ShardSpec(f"{split}-{i:06d}.tar", split, int(bounds[i]), int(bounds[i + 1])) for i in range(count)]


# The tasks. Rows travel as tuples: (h, source, ordinal, url, labels, size, offset, row, fields, refusal), where
# ordinal = (partition, row inside it) and refusal = (reason, detail) for inputs refused while listing.


def _list_task(parts: list[Partition], layout: str, seed_mix: int, buckets: int) -> list[Any]:
    out: list[list[tuple]] = [[] for _ in range(buckets)]
    summary: dict[str, Any] = {"inputs": 0, "hidden": 0, "names": set(), "max_index": -1, "kinds": set(),
                               "declared": None}
    for part in parts:
        listed: Listed = list_partition(part, layout)
        summary["inputs"] += len(listed.raws) + len(listed.rejected)
        summary["hidden"] += listed.hidden
        summary["declared"] = summary["declared"] or listed.classes
        for number, raw in enumerate(listed.raws):
            for label in raw.labels:
                if isinstance(label, str):
                    summary["names"].add(label)
                    summary["kinds"].add("name")
                else:
                    summary["max_index"] = max(summary["max_index"], label)
                    summary["kinds"].add("index")
            h = splitmix64(source_hash(raw.source) ^ seed_mix)
            out[(h * buckets) >> 64].append((h, raw.source, (part.index, number), raw.url, raw.labels, raw.size,
                                             raw.offset, raw.row, raw.fields, None))
        for number, refused in enumerate(listed.rejected, start=len(listed.raws)):
            h = splitmix64(source_hash(refused["source"]) ^ seed_mix)
            out[(h * buckets) >> 64].append((h, refused["source"], (part.index, number), part.url, [], -1, -1, -1,
                                             None, (refused["reason"], refused["detail"])))
    return [summary, *out]


def _refusal(source: str, reason: str, detail: str) -> dict[str, str]:
    return {"source": source, "reason": reason, "detail": detail}


def _row_digest(*values: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=16).digest(), "big")


def _clean_task(classes: list[str], *lists: list[tuple]) -> tuple[list[tuple], list[dict[str, str]], dict[str, Any]]:
    index = {name: i for i, name in enumerate(classes)}
    prefixes = [key_prefix(name) for name in classes]
    rows = sorted((row for rows in lists for row in rows), key=lambda r: (r[0], r[1], r[2]))
    kept: list[tuple] = []
    rejected: list[dict[str, str]] = []
    first_label: list[int] = []
    multi_label = False
    previous: tuple | None = None  # the last listing considered, to find second listings of the same source
    for h, source, _, url, labels, size, offset, row, fields, refusal in rows:
        if refusal is not None:
            rejected.append(_refusal(source, *refusal))
            continue
        if previous is not None and previous[1] == source:
            rejected.append(_refusal(source, "duplicate", "listed more than once"))
            continue
        previous = (h, source)
        if not labels:
            rejected.append(_refusal(source, "no-label", "the manifest gives it no label"))
            continue
        try:
            indices = sorted({label if isinstance(label, int) else index[label] for label in labels})
        except KeyError as e:
            rejected.append(_refusal(source, "unknown-class", f"class {e.args[0]!r} is not in the classes file"))
            continue
        if indices[0] < 0 or indices[-1] >= len(classes):
            rejected.append(_refusal(source, "unknown-class",
                                     f"label index out of range 0..{len(classes) - 1}: {indices}"))
            continue
        key = f"{prefixes[indices[0]]}-{source_hash(source):016x}"
        if kept and kept[-1][0] == key:
            raise PlanError(f"inputs {kept[-1][1]!r} and {source!r} hash to the same key {key!r}; rename one")
        kept.append((key, source, url, tuple(indices), size, offset, row, fields))
        first_label.append(indices[0])
        multi_label |= len(indices) > 1
    digest = sum(_row_digest(r["source"], r["reason"], r["detail"]) for r in rejected) % DIGEST_MOD
    info = {"counts": np.bincount(np.asarray(first_label, np.int64), minlength=len(classes)),
            "multi_label": multi_label, "reasons": Counter(r["reason"] for r in rejected), "digest": digest}
    return kept, rejected, info


def _split_task(
    kept: list[tuple], offsets: np.ndarray, held_out: np.ndarray, totals: np.ndarray
) -> tuple[pa.Table, dict[str, int]]:
    """Systematic sampling in the order of h: rank i of a class of n inputs with k held out is val when
    floor((i + 1) k / n) > floor(i k / n), which picks exactly k, evenly spread over the class's order."""
    rank = offsets.copy()
    train, val = [], []
    digest = 0
    for sample in kept:
        c = sample[3][0]
        i, k, n = int(rank[c]), int(held_out[c]), int(totals[c])
        rank[c] += 1
        is_val = k > 0 and ((i + 1) * k) // n > (i * k) // n
        (val if is_val else train).append(sample)
        digest += _row_digest("val" if is_val else "train", *sample)
    rows = train + val
    table = pa.table({
        "key": pa.array([r[0] for r in rows], pa.string()),
        "source": pa.array([r[1] for r in rows], pa.string()),
        "url": pa.array([r[2] for r in rows], pa.string()),
        "labels": pa.array([list(r[3]) for r in rows], pa.list_(pa.int32())),
        "size": pa.array([r[4] for r in rows], pa.int64()),
        "offset": pa.array([r[5] for r in rows], pa.int64()),
        "row": pa.array([r[6] for r in rows], pa.int64()),
        "fields": pa.array([json.dumps(r[7]) if r[7] is not None else None for r in rows], pa.string()),
    })
    return table, {"train": len(train), "val": len(val), "digest": digest % DIGEST_MOD}
