"""One output shard: read its inputs, turn them into samples, write a byte-reproducible tar, publish it, record it.

The tar is built in a local temporary file and made visible at `DEST/<name>` only when complete; its stats
(`DEST/_progress/<name>.json`: samples, bytes, sha256, the published object's identity, rejected inputs) are
written after it, also atomically. A shard counts as done only when its stats exist and the published object is
still the one they name (its size and the store's version tag, or its modification time on a local disk), so a
crash at any point costs at most the shard in progress, which the next run redoes, and a re-run over a finished
dataset reads no shard's bytes (`mixer verify` re-hashes them all).
"""

from __future__ import annotations

import os
import posixpath
import socket
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import pyarrow as pa

from data_prep.dedup import Index, nearest
from data_prep.images import Encoded, ImagePolicy, Rejected, process
from data_prep.plan import Piece, ShardPlan, ShardSpec, shard_from_pieces
from data_prep.sources import Item, is_local_path, read_item
from pipeline import storage
from pipeline.shard_format import encode_sample

PROGRESS = "_progress"
READ_THREADS = 8
READ_AHEAD = 32
STATS_THREADS = 32


def shard_url(dest: str, name: str) -> str:
    return storage.join(dest, name)


def stats_url(dest: str, name: str) -> str:
    return storage.join(dest, PROGRESS, name.removesuffix(".tar") + ".json")


def completed_shards(dest: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """The stats of the shards among `names` that are already written and still intact: one listing of DEST for
    the objects' identities and one small read per finished shard's stats, never a read of a shard's bytes."""
    try:
        published = {posixpath.basename(e["name"]): storage.identity(e) for e in storage.ls(dest, detail=True)}
        recorded = {posixpath.basename(p) for p in storage.ls(storage.join(dest, PROGRESS))}
    except FileNotFoundError:
        return {}
    wanted = [n for n in names if n.removesuffix(".tar") + ".json" in recorded]

    def check(name: str) -> dict[str, Any] | None:
        try:
            stats = storage.read_json(stats_url(dest, name))
        except (FileNotFoundError, ValueError):
            return None
        if stats.get("samples") == 0:
            return stats
        return stats if stats.get("object") and stats["object"] == published.get(name) else None

    with ThreadPoolExecutor(max_workers=STATS_THREADS) as pool:
        return {name: stats for name, stats in zip(wanted, pool.map(check, wanted), strict=True) if stats is not None}


def write_shard(
    spec: ShardSpec, pieces: list[Piece], dest: str, policy: ImagePolicy, classes: list[str], multi_label: bool,
    references: Index | None, *tables: pa.Table,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The shard task: gather the shard's samples from the plan's bucket tables, make it; (stats, rejected)."""
    stats = make_shard(shard_from_pieces(spec, pieces, *tables), dest, policy, classes, multi_label, references)
    return stats, stats.pop("rejected")


def make_shard(
    shard: ShardPlan, dest: str, policy: ImagePolicy, classes: list[str], multi_label: bool,
    references: Index | None = None,
) -> dict[str, Any]:
    """Make one shard and return its stats; with `references`, inputs that are near-duplicates of a reference
    image are left out (reason `near-duplicate`, naming the image)."""
    started = time.perf_counter()
    rejected: list[dict[str, str]] = []
    samples = kept = input_bytes = 0
    with tempfile.TemporaryDirectory(prefix="mixer-shard-") as tmp:
        local = os.path.join(tmp, shard.name)
        with open(local, "wb") as tar:
            for (key, item), data in zip(shard.samples, _read_ahead([item for _, item in shard.samples]),
                                         strict=True):
                try:
                    if isinstance(data, Rejected):
                        raise data
                    encoded = process(data, policy)
                    if references is not None:
                        _check_unique(references, encoded)
                except Rejected as r:
                    rejected.append({"source": item.source, "reason": r.reason, "detail": r.detail, **r.fields})
                    continue
                _add_sample(tar, key, item, encoded, len(data), classes, multi_label)
                samples += 1
                kept += not encoded.meta["changes"]
                input_bytes += len(data)
            _end_of_archive(tar)
        stats: dict[str, Any] = {"name": shard.name, "split": shard.split, "inputs": len(shard.samples),
                                 "samples": samples, "bytes": 0, "sha256": None}
        if samples:
            size, digest = storage.sha256_of(local)
            stats.update(bytes=size, sha256=digest)
            storage.put_file_atomic(local, shard_url(dest, shard.name))
            stats["object"] = storage.object_identity(shard_url(dest, shard.name))
    stats.update(rejected=rejected, kept_original=kept, input_bytes=input_bytes,
                 seconds=round(time.perf_counter() - started, 3), host=socket.gethostname())
    storage.write_json_atomic(stats_url(dest, shard.name), stats)
    return stats


def _check_unique(references: Index, encoded: Encoded) -> None:
    match = nearest(references, encoded.data)
    if match is not None:
        raise Rejected("near-duplicate", f"a near-duplicate of {match.name} (Hamming distance {match.distance} of "
                       "255 bits)", match=match.name, reference_set=match.set)


def _read_ahead(items: list[Item]) -> Iterator[bytes | Rejected]:
    """The inputs' bytes in order: from local disk one after another, from an object store a few at a time in
    threads (it answers slowly but in parallel)."""
    if all(is_local_path(item.url) for item in items):
        yield from map(_read_one, items)
        return
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
    tar: BinaryIO, key: str, item: Item, encoded: Encoded, source_bytes: int, classes: list[str],
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


def _header(name: str, size: int) -> bytes:
    """The USTAR header tarfile writes for a regular file with fixed owner, mode and time, so the same samples give
    the same bytes on any machine, any day; filled into a template, four times cheaper than tarfile's own path."""
    raw = name.encode()
    if len(raw) > 100:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    header = bytearray(_TEMPLATE)
    header[0:100] = raw.ljust(100, b"\0")
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"%06o\0 " % sum(header)  # the checksum counts its own field as eight spaces
    return bytes(header)


def _template() -> bytes:
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0, 0o644, 0, 0, "", ""
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    header[148:156] = b" " * 8
    return bytes(header)


_TEMPLATE = _template()


def _add_member(tar: BinaryIO, name: str, data: bytes) -> None:
    tar.write(_header(name, len(data)))
    tar.write(data)
    tar.write(bytes(-len(data) % tarfile.BLOCKSIZE))


def _end_of_archive(tar: BinaryIO) -> None:
    """Two zero blocks, then zeros to a whole record: what tarfile writes on close."""
    tar.write(bytes(2 * tarfile.BLOCKSIZE))
    tar.write(bytes(-tar.tell() % tarfile.RECORDSIZE))
