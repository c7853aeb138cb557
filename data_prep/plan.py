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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.sources import (
    Item,
    Listed,
    Partition,
    Partitions,
    SourceError,
    is_local_path,
    list_partition,
    read_classes_file,
)
from pipeline.errors import MixerError

SPLITS = ("train", "val")
KEY_PREFIX_CHARS = 40
# Few, large tasks: the driver refers to every (list task, bucket) output until the buckets are cleaned, and a
# worker holds a bucket in Arrow.
ROWS_PER_BUCKET = 2_000_000
ROWS_PER_LIST_TASK = 1_000_000
# Ray returns results under 100 KiB inline, through the driver's memory; at about 80 B a row, an output planned to
# hold this many rows never is, so the listing stays in the object store.
ROWS_PER_LIST_OUTPUT = 4096
# Partitions a list task reads at once from an object store, which answers slowly but in parallel (a tar's headers
# cost a ranged read each).
LIST_THREADS = 16
BLOCKS = 4096  # digest blocks, and the most buckets
MASK64 = (1 << 64) - 1


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
    rejected_parts: list[Any]  # per bucket: its refused inputs in the order of h (an Arrow table), or a ref to it

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
            yield from self.runner.get(part).to_pylist()


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
    """Plan the shards of a source cut into `parts`; `workers` only sets how finely the work is cut into tasks."""
    options.check()
    runner = runner or Runner()
    estimated = parts.estimated_inputs()
    wanted = max(1, math.ceil(estimated / ROWS_PER_BUCKET), workers)
    buckets = min(BLOCKS, 1 << (wanted - 1).bit_length())  # a power of two, so every digest block is in one bucket
    seed_mix = int(splitmix64(np.array([options.seed & MASK64], np.uint64))[0])

    tasks = _list_task_count(estimated, len(parts.parts), buckets, workers)
    listed = [runner.call(_list_task, group, parts.layout, seed_mix, buckets, num_returns=buckets + 1)
              for group in _groups(parts.parts, tasks)]
    classes, inputs, notes = _classes(runner, listed, parts, classes_file)

    classes_ref = runner.put(classes)
    cleaned = [runner.call(_clean_task, classes_ref, *[refs[1 + b] for refs in listed], num_returns=3)
               for b in range(buckets)]
    del listed
    totals = np.zeros(len(classes), np.int64)
    multi_label, reasons, rejected_blocks = False, Counter(), {}
    for _, _, info in cleaned:
        # Fetched again below rather than kept: per-class counts of every bucket would be O(buckets x classes).
        info = runner.get(info)
        totals += info["counts"]
        multi_label |= info["multi_label"]
        reasons.update(info["reasons"])
        rejected_blocks.update(info["blocks"])
    held_out = runner.put(options.held_out(totals))
    totals_ref = runner.put(totals)

    offsets = np.zeros(len(classes), np.int64)
    split = []
    for kept, _, info in cleaned:
        split.append(runner.call(_split_task, kept, offsets.copy(), held_out, totals_ref, num_returns=2))
        offsets += runner.get(info)["counts"]
    counts = {name: np.zeros(buckets, np.int64) for name in SPLITS}
    sample_blocks: dict[int, str] = {}
    for b, (_, info) in enumerate(split):
        info = runner.get(info)
        counts["train"][b], counts["val"][b] = info["train"], info["val"]
        sample_blocks.update(info["blocks"])
    starts = {name: np.concatenate([[0], np.cumsum(counts[name])[:-1]]).astype(np.int64) for name in SPLITS}
    shards = [spec for name in SPLITS for spec in _cut(name, int(counts[name].sum()), options.shard_size)]
    digest = hashlib.sha256(json.dumps({"classes": classes, "multi_label": multi_label, "inputs": inputs,
                                        "shards": [(s.name, s.size) for s in shards]}).encode())
    for block in range(BLOCKS):
        digest.update(f"{sample_blocks.get(block, '-')}{rejected_blocks.get(block, '-')}".encode())
    return Plan(parts.layout, classes, multi_label, inputs, digest.hexdigest(), shards, dict(sorted(reasons.items())),
                notes, runner, [s[0] for s in split], starts, counts, [c[1] for c in cleaned])


def _classes(runner: Runner, listed: list[Any], parts: Partitions,
             classes_file: str | None) -> tuple[list[str], int, list[str]]:
    """The class names (in index order), the number of inputs and the notes, from the listing tasks' summaries."""
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
    if len(kinds) > 1:
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
    return classes, inputs, notes


def _list_task_count(inputs: int, parts: int, buckets: int, workers: int) -> int:
    """About ROWS_PER_LIST_TASK rows a task and at least four tasks a worker, at most a task a partition, and never
    so many that a task's share of a bucket drops under ROWS_PER_LIST_OUTPUT rows: so the driver's references grow
    with the inputs, not with their square, and none of the outputs passes through it."""
    wanted = max(math.ceil(inputs / ROWS_PER_LIST_TASK), 4 * max(1, workers))
    return max(1, min(parts, wanted, inputs // (buckets * ROWS_PER_LIST_OUTPUT)))


def _groups(parts: list[Partition], count: int) -> list[list[Partition]]:
    """Consecutive partitions in `count` groups of about the same number of rows."""
    total = sum(max(p.rows, 1) for p in parts)
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


# The tasks pass Arrow tables (serialised without copies, sorted and filtered in bulk). A listed input is a row of
# LISTED; an input refused while listing carries its reason and detail.

LISTED = pa.schema([
    ("h", pa.uint64()), ("s", pa.uint64()), ("source", pa.string()), ("part", pa.int64()), ("number", pa.int64()),
    ("url", pa.string()), ("names", pa.list_(pa.string())), ("indices", pa.list_(pa.int64())),
    ("size", pa.int64()), ("offset", pa.int64()), ("row", pa.int64()), ("fields", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])
SAMPLE_COLUMNS = ("key", "source", "url", "labels", "size", "offset", "row", "fields")


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijection of 64-bit integers that scatters nearby inputs (Steele, Lea and Flood's SplitMix64 finaliser),
    over a uint64 array: numpy's unsigned arithmetic wraps like the 64-bit original."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _top_bits(h: np.ndarray, count: int) -> np.ndarray:
    """Which of `count` (a power of two) equal ranges of 64-bit values each h falls in."""
    if count == 1:
        return np.zeros(len(h), np.int64)
    return (h >> np.uint64(64 - (count.bit_length() - 1))).astype(np.int64)


def _list_task(parts: list[Partition], layout: str, seed_mix: int, buckets: int) -> list[Any]:
    summary: dict[str, Any] = {"inputs": 0, "hidden": 0, "declared": None}

    def list_one(part: Partition) -> tuple[pa.Table, Listed]:
        listed = list_partition(part, layout)
        table = _listed_table(part, listed)
        listed.raws.clear()  # held as a table from here on
        return table, listed

    tables = []
    threads = 1 if all(is_local_path(part.url) for part in parts) else LIST_THREADS
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for table, listed in pool.map(list_one, parts):
            summary["hidden"] += listed.hidden
            summary["declared"] = summary["declared"] or listed.classes
            tables.append(table)
            summary["inputs"] += len(table)
    # A source with no partitions at all still lists (nothing), so that planning says there are no inputs.
    table = pa.concat_tables(tables).combine_chunks() if tables else LISTED.empty_table()
    s = np.array([source_hash(source) for source in table["source"].to_pylist()], np.uint64)
    h = splitmix64(s ^ np.uint64(seed_mix))
    table = table.set_column(0, "h", pa.array(h)).set_column(1, "s", pa.array(s))
    flat_names, flat_indices = pc.list_flatten(table["names"]), pc.list_flatten(table["indices"])
    summary["names"] = set(pc.unique(flat_names).to_pylist())
    summary["max_index"] = int(pc.max(flat_indices).as_py()) if len(flat_indices) else -1
    summary["kinds"] = {kind for kind, values in (("name", flat_names), ("index", flat_indices)) if len(values)}
    bucket = _top_bits(h, buckets)
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(buckets + 1))
    return [summary, *(table.take(order[bounds[b]:bounds[b + 1]]) for b in range(buckets))]


def _listed_table(part: Partition, listed: Listed) -> pa.Table:
    """One partition's inputs as rows of LISTED (h and s still zero), those refused while listing last."""
    raws, refused = listed.raws, listed.rejected
    if listed.table is not None:
        columns = {name: listed.table[name] for name in listed.table.column_names}
    else:
        labels = [_names_and_indices(raw.labels) for raw in raws]
        columns = {
            "source": [raw.source for raw in raws], "url": [raw.url for raw in raws],
            "names": [names for names, _ in labels], "indices": [indices for _, indices in labels],
            "size": [raw.size for raw in raws], "offset": [raw.offset for raw in raws],
            "row": [raw.row for raw in raws],
            "fields": [json.dumps(raw.fields) if raw.fields is not None else None for raw in raws],
        }
    n = len(columns["source"])
    table = pa.table({"h": np.zeros(n, np.uint64), "s": np.zeros(n, np.uint64), "source": columns["source"],
                      "part": np.full(n, part.index, np.int64), "number": np.arange(n, dtype=np.int64),
                      **{k: columns[k] for k in ("url", "names", "indices", "size", "offset", "row", "fields")},
                      "reason": pa.nulls(n, pa.string()), "detail": pa.nulls(n, pa.string())}, schema=LISTED)
    if not refused:
        return table
    m = len(refused)
    return pa.concat_tables([table, pa.table({
        "h": np.zeros(m, np.uint64), "s": np.zeros(m, np.uint64), "source": [r["source"] for r in refused],
        "part": np.full(m, part.index, np.int64), "number": np.arange(n, n + m, dtype=np.int64),
        "url": [part.url] * m, "names": [[]] * m, "indices": [[]] * m, "size": np.full(m, -1, np.int64),
        "offset": np.full(m, -1, np.int64), "row": np.full(m, -1, np.int64), "fields": pa.nulls(m, pa.string()),
        "reason": [r["reason"] for r in refused], "detail": [r["detail"] for r in refused]}, schema=LISTED)])


def _names_and_indices(labels: list[str | int]) -> tuple[list[str], list[int]]:
    kind = type(labels[0]) if labels else None
    if all(type(label) is kind for label in labels):  # the usual row: one kind of label
        return (labels, []) if kind is str else ([], labels)  # type: ignore[return-value]
    names = [label for label in labels if isinstance(label, str)]
    return names, [label for label in labels if not isinstance(label, str)]


def _clean_task(classes: list[str], *tables: pa.Table) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Sort by h; refuse second listings, inputs without labels or with unknown ones; index labels; key samples."""
    table = pa.concat_tables(tables).combine_chunks()
    table = table.take(pc.sort_indices(table, sort_keys=[("h", "ascending"), ("source", "ascending"),
                                                         ("part", "ascending"), ("number", "ascending")]))
    n = len(table)
    reason = np.array(table["reason"].to_pylist(), object)
    detail = np.array(table["detail"].to_pylist(), object)
    listed_ok = pc.is_null(table["reason"]).to_numpy(zero_copy_only=False)
    ok_rows = np.flatnonzero(listed_ok)
    sources = table["source"].take(ok_rows)
    again = np.zeros(n, bool)
    if len(ok_rows) > 1:
        again[ok_rows[1:]] = pc.equal(sources.slice(1), sources.slice(0, len(ok_rows) - 1)).to_numpy(
            zero_copy_only=False)
    reason[again] = "duplicate"
    detail[again] = "listed more than once"
    pending = listed_ok & ~again

    labels, parents, unknown = _indexed_labels(table, classes)
    has_label = np.bincount(parents, minlength=n) > 0
    no_label = pending & ~has_label & ~unknown.astype(bool)
    reason[no_label] = "no-label"
    detail[no_label] = "the manifest gives it no label"
    for row in np.flatnonzero(pending & unknown.astype(bool)):
        reason[row] = "unknown-class"
        detail[row] = _unknown_detail(table, int(row), classes)
    kept_rows = np.flatnonzero(pending & has_label & ~unknown.astype(bool))

    labels, offsets, per_row = _label_lists(labels, parents, kept_rows)
    first = labels[offsets[:-1]] if len(kept_rows) else np.zeros(0, np.int64)

    kept = table.take(kept_rows)
    s = kept["s"].to_numpy()
    prefixes = [key_prefix(name) for name in classes]
    keys = [f"{prefixes[c]}-{x:016x}" for c, x in zip(first.tolist(), s.tolist(), strict=True)]
    for i in np.flatnonzero(s[1:] == s[:-1]) if len(s) > 1 else ():
        if keys[i] == keys[i + 1]:
            a, b = kept["source"][int(i)].as_py(), kept["source"][int(i) + 1].as_py()
            raise PlanError(f"inputs {a!r} and {b!r} hash to the same key {keys[i]!r}; rename one")
    samples = pa.table({
        "h": kept["h"], "key": pa.array(keys, pa.string()), "source": kept["source"], "url": kept["url"],
        "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels.astype(np.int32))),
        "first": pa.array(first.astype(np.int32)), "size": kept["size"], "offset": kept["offset"],
        "row": kept["row"], "fields": kept["fields"],
    })
    refused_rows = np.flatnonzero(reason != None)  # noqa: E711 (elementwise over an object array)
    rejected = pa.table({"h": table["h"].take(refused_rows), "source": table["source"].take(refused_rows),
                         "reason": pa.array(reason[refused_rows].tolist(), pa.string()),
                         "detail": pa.array(detail[refused_rows].tolist(), pa.string())})
    info = {"counts": np.bincount(first, minlength=len(classes)).astype(np.int64),
            "multi_label": bool((per_row > 1).any()), "reasons": Counter(reason[refused_rows].tolist()),
            "blocks": _block_digests(rejected, ("source", "reason", "detail"))}
    return samples, rejected.drop_columns(["h"]), info


def _label_lists(labels: np.ndarray, parents: np.ndarray,
                 rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labels of `rows`, each row's sorted and without repeats: (values, offsets, labels per row)."""
    keep = np.isin(parents, rows)
    parents, labels = parents[keep], labels[keep]
    order = np.lexsort((labels, parents))
    parents, labels = parents[order], labels[order]
    fresh = np.ones(len(labels), bool)
    fresh[1:] = (parents[1:] != parents[:-1]) | (labels[1:] != labels[:-1])
    parents, labels = parents[fresh], labels[fresh]
    per_row = np.bincount(np.searchsorted(rows, parents), minlength=len(rows))
    return labels, np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32), per_row


def _indexed_labels(table: pa.Table, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label index, its row) for every label of every row, and per row whether a label is not a known class."""
    n = len(table)
    names, indices = table["names"], table["indices"]
    by_name = pc.index_in(pc.list_flatten(names), value_set=pa.array(classes, pa.string()))
    name_rows = pc.list_parent_indices(names).to_numpy(zero_copy_only=False).astype(np.int64)
    index_rows = pc.list_parent_indices(indices).to_numpy(zero_copy_only=False).astype(np.int64)
    index_values = pc.list_flatten(indices).to_numpy(zero_copy_only=False).astype(np.int64)
    missing = pc.is_null(by_name).to_numpy(zero_copy_only=False)
    out_of_range = (index_values < 0) | (index_values >= len(classes))
    unknown = np.bincount(np.concatenate([name_rows[missing], index_rows[out_of_range]]), minlength=n)
    values = np.concatenate([pc.fill_null(by_name, -1).to_numpy(zero_copy_only=False).astype(np.int64)[~missing],
                             index_values[~out_of_range]])
    rows = np.concatenate([name_rows[~missing], index_rows[~out_of_range]])
    return values, rows, unknown


def _unknown_detail(table: pa.Table, row: int, classes: list[str]) -> str:
    known = set(classes)
    for name in table["names"][row].as_py() or []:
        if name not in known:
            return f"class {name!r} is not in the classes file"
    indices = sorted(set(table["indices"][row].as_py() or []))
    return f"label index out of range 0..{len(classes) - 1}: {indices}"


def _split_task(
    samples: pa.Table, offsets: np.ndarray, held_out: np.ndarray, totals: np.ndarray
) -> tuple[pa.Table, dict[str, Any]]:
    """Systematic sampling in the order of h: rank i of a class of n inputs with k held out is val when
    floor((i + 1) k / n) > floor(i k / n), which picks exactly k, evenly spread over the class's order."""
    first = samples["first"].to_numpy(zero_copy_only=False).astype(np.int64)
    by_class = np.argsort(first, kind="stable")
    sorted_first = first[by_class]
    group_start = np.searchsorted(sorted_first, sorted_first, side="left")
    rank = np.empty(len(first), np.int64)
    rank[by_class] = np.arange(len(first)) - group_start
    i = offsets[first] + rank
    k, n = held_out[first], np.maximum(totals[first], 1)
    is_val = (k > 0) & (((i + 1) * k) // n > (i * k) // n)
    blocks = _block_digests(samples.append_column("val", pa.array(is_val)), ("val", *SAMPLE_COLUMNS))
    order = np.concatenate([np.flatnonzero(~is_val), np.flatnonzero(is_val)])
    table = samples.select(list(SAMPLE_COLUMNS)).take(order)
    return table, {"train": int((~is_val).sum()), "val": int(is_val.sum()), "blocks": blocks}


def _block_digests(table: pa.Table, columns: tuple[str, ...]) -> dict[int, str]:
    """sha256 of each block's rows (block = the top bits of h, rows in the order of h) over the given columns.
    Blocks are finer than buckets and never cut by them, so the plan's digest does not depend on the bucket count."""
    block = _top_bits(table["h"].to_numpy(), BLOCKS)
    bounds = np.flatnonzero(np.diff(block)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    stops = np.concatenate([bounds, [len(block)]]).astype(np.int64)
    arrays = [table[name].combine_chunks() for name in columns]
    out = {}
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        if a == b:
            continue
        digest = hashlib.sha256()
        for array in arrays:
            digest.update(_canonical_bytes(array.slice(a, b - a)))
        out[int(block[a])] = digest.hexdigest()
    return out


def _canonical_bytes(array: pa.Array) -> bytes:
    """The values of an array as bytes that do not depend on where it was sliced from or how it was built."""
    nulls = pc.is_null(array).to_numpy(zero_copy_only=False).tobytes() if array.null_count else b""
    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_list(kind):
        offsets = np.frombuffer(array.buffers()[1], np.int32, count=len(array) + 1, offset=array.offset * 4)
        head = (offsets - offsets[0]).tobytes() + nulls
        if pa.types.is_list(kind):
            return head + _canonical_bytes(array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])))
        data = array.buffers()[2]
        return head + (bytes(memoryview(data)[offsets[0]:offsets[-1]]) if data is not None else b"")
    values = array.fill_null(0) if array.null_count else array
    return nulls + values.to_numpy(zero_copy_only=False).tobytes()
