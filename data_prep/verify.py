"""`mixer verify DS`: read every shard back with the stock webdataset reader and check it against dataset.json.

Per shard: size, sha256 and sample count as recorded; every sample decodes by pipeline.shard_format, the rule the
training reader applies (one image, its label or labels, in range); keys are unique across the whole dataset.
Overall: inputs = samples + rejected, and rejected.jsonl has one line per rejected input. Each problem is reported
with the shard it was found in.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds

from pipeline import dataset_json, storage
from pipeline.shard_format import decode_sample


@dataclass
class ShardCheck:
    name: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def check_shard(info: dataset_json.DatasetInfo, shard: dataset_json.Shard) -> ShardCheck:
    url = info.shard_url(shard)
    check = ShardCheck(shard.name)
    try:
        with storage.ResilientReader(url, block_size=8 << 20, sha256=True) as stream:
            source = {"url": url, "stream": stream}
            for sample in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([source])):
                check.samples += 1
                check.keys.append(sample["__key__"])
                members = {ext: data for ext, data in sample.items() if not ext.startswith("__")}
                try:
                    decode_sample(shard.name, sample["__key__"], members, info.multi_label, info.num_classes)
                except dataset_json.DatasetError as e:
                    check.problems.append(str(e))
            while stream.read(8 << 20):  # the tar reader stops at the end-of-archive marker; hash the whole object
                pass
    except FileNotFoundError:
        check.problems.append(f"{shard.name}: missing ({url})")
        return check
    except Exception as e:  # any reader failure is a finding about this shard, not a crash of the report
        check.problems.append(f"{shard.name}: unreadable by webdataset: {type(e).__name__}: {e}")
        return check
    check.bytes, check.sha256 = stream.offset, stream.digest.hexdigest()
    if check.bytes != shard.bytes:
        check.problems.append(f"{shard.name}: {check.bytes} bytes, dataset.json says {shard.bytes}")
    if check.sha256 != shard.sha256:
        check.problems.append(f"{shard.name}: sha256 {check.sha256[:12]}..., dataset.json says {shard.sha256[:12]}...")
    if check.samples != shard.samples:
        check.problems.append(f"{shard.name}: {check.samples} samples, dataset.json says {shard.samples}")
    return check


def verify(url: str, threads: int = 8) -> tuple[list[str], dict[str, Any]]:
    """All problems found in the dataset at `url` (empty when it is sound) and a summary of what was read."""
    info = dataset_json.load(url)
    shards = [shard for split in info.splits.values() for shard in split.shards]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        checks = list(pool.map(lambda s: check_shard(info, s), shards))
    problems = [p for c in checks for p in c.problems]

    owner: dict[str, str] = {}
    for c in checks:
        for key in c.keys:
            if key in owner:
                problems.append(f"{c.name}: key {key} also appears in {owner[key]}")
            else:
                owner[key] = c.name
    if info.inputs != info.samples + info.rejected:
        problems.append(f"dataset.json: inputs {info.inputs} != samples {info.samples} + rejected {info.rejected}")
    try:
        lines = _count_lines(storage.join(info.url, "rejected.jsonl"))
        if lines != info.rejected:
            problems.append(f"rejected.jsonl: {lines} entries, dataset.json says {info.rejected}")
    except FileNotFoundError:
        problems.append(f"rejected.jsonl: missing from {info.url}")
    summary = {
        "url": info.url,
        "shards": len(shards),
        "samples": sum(c.samples for c in checks),
        "bytes": sum(c.bytes for c in checks),
        "classes": info.num_classes,
        "multi_label": info.multi_label,
    }
    return problems, summary


def _count_lines(url: str) -> int:
    """Lines of a text file, streamed: rejected.jsonl may hold millions."""
    lines, last = 0, b"\n"
    with storage.ResilientReader(url, block_size=8 << 20) as f:
        while chunk := f.read(8 << 20):
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    return lines + (last != b"\n")
