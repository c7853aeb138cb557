"""One output shard: read its inputs, turn them into samples, write a byte-reproducible tar, publish it, record it.

The tar is built in a local temporary file and made visible at `DEST/<name>` only when complete; its stats
(`DEST/_progress/<name>.json`: samples, bytes, sha256, rejected inputs) are written after it, also atomically.
A shard counts as done only when its stats exist and the published tar still matches them, so a crash at any
point costs at most the shard in progress, which the next run redoes.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from data_prep.images import Encoded, ImagePolicy, Rejected, process
from data_prep.plan import ShardPlan
from data_prep.sources import Item, read_item
from pipeline import storage
from pipeline.shard_format import encode_sample

PROGRESS = "_progress"
READ_THREADS = 8
READ_AHEAD = 32


def shard_url(dest: str, name: str) -> str:
    return storage.join(dest, name)


def stats_url(dest: str, name: str) -> str:
    return storage.join(dest, PROGRESS, name.removesuffix(".tar") + ".json")


def completed(dest: str, name: str) -> dict[str, Any] | None:
    """The stats of a shard already written and intact, or None when it must be (re)done."""
    try:
        stats = storage.read_json(stats_url(dest, name))
    except (FileNotFoundError, ValueError):
        return None
    if stats.get("samples") == 0:
        return stats
    fs, path = storage.filesystem(shard_url(dest, name))
    try:
        if fs.size(path) != stats.get("bytes"):
            return None
    except FileNotFoundError:
        return None
    return stats if storage.sha256_of(shard_url(dest, name))[1] == stats.get("sha256") else None


def write_shard(
    shard: ShardPlan, dest: str, policy: ImagePolicy, classes: list[str], multi_label: bool
) -> dict[str, Any]:
    """Make one shard unless it is already complete; return its stats (with "skipped" true when it was)."""
    done = completed(dest, shard.name)
    if done is not None:
        return {**done, "skipped": True}
    started = time.perf_counter()
    rejected: list[dict[str, str]] = []
    samples = kept = input_bytes = 0
    with tempfile.TemporaryDirectory(prefix="mixer-shard-") as tmp:
        local = os.path.join(tmp, shard.name)
        with tarfile.open(local, "w", format=tarfile.USTAR_FORMAT) as tar:
            for (key, item), data in zip(shard.samples, _read_ahead([item for _, item in shard.samples]),
                                         strict=True):
                try:
                    if isinstance(data, Rejected):
                        raise data
                    encoded = process(data, policy)
                except Rejected as r:
                    rejected.append({"source": item.source, "reason": r.reason, "detail": r.detail})
                    continue
                _add_sample(tar, key, item, encoded, len(data), classes, multi_label)
                samples += 1
                kept += not encoded.meta["changes"]
                input_bytes += len(data)
        stats: dict[str, Any] = {"name": shard.name, "split": shard.split, "inputs": len(shard.samples),
                                 "samples": samples, "bytes": 0, "sha256": None}
        if samples:
            size, digest = storage.sha256_of(local)
            stats.update(bytes=size, sha256=digest)
            storage.put_file_atomic(local, shard_url(dest, shard.name))
    stats.update(rejected=rejected, kept_original=kept, input_bytes=input_bytes,
                 seconds=round(time.perf_counter() - started, 3))
    storage.write_json_atomic(stats_url(dest, shard.name), stats)
    return {**stats, "skipped": False}


def _read_ahead(items: list[Item]) -> Iterator[bytes | Rejected]:
    """The inputs' bytes in order, fetched a few at a time in threads: object stores answer slowly but in parallel."""
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        pending: deque[Future] = deque()
        upcoming = iter(items)
        for item in upcoming:
            pending.append(pool.submit(_read_one, item))
            if len(pending) >= READ_AHEAD:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append(pool.submit(_read_one, nxt))
            yield result


def _read_one(item: Item) -> bytes | Rejected:
    try:
        return read_item(item)
    except Rejected as r:
        return r


def _add_sample(
    tar: tarfile.TarFile, key: str, item: Item, encoded: Encoded, source_bytes: int, classes: list[str],
    multi_label: bool,
) -> None:
    meta: dict[str, Any] = {"source": item.source, "source_bytes": source_bytes, **encoded.meta}
    if multi_label:
        meta["classes"] = [classes[i] for i in item.labels]
    else:
        meta["class"] = classes[item.labels[0]]
    if item.fields:
        meta["fields"] = item.fields
    for name, data in encode_sample(key, encoded.data, encoded.ext, item.labels, multi_label, meta):
        _add_member(tar, name, data)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed owner, mode and time: the same samples give the same bytes on any machine, any day.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
