"""The dataset contract: `DS/dataset.json`, written last by data prep and the only thing a reader trusts.

```
{"format": "mixer-wds", "version": 1,
 "classes": ["n01440764", ...],           # index -> name
 "multi_label": false,
 "seed": 0,
 "image_policy": {"max_size": 256, "quality": 95, "encoding": "jpeg"},
 "source": {"url": "...", "layout": "imagefolder"},
 "splits": {"train": {"samples": N, "bytes": B,
                      "shards": [{"name": "train-000000.tar", "samples": n, "bytes": b, "sha256": "..."}]},
            "val": {...}},
 "inputs": M, "samples": N_all, "rejected": R}     # inputs == samples + rejected
```
Shards are plain tars whose samples pipeline.shard_format defines; keys are unique across the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import storage
from pipeline.errors import MixerError

FORMAT = "mixer-wds"
VERSION = 1


class DatasetError(MixerError):
    """A dataset that cannot be read; the message names the URL and what is wrong."""


@dataclass
class Shard:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Split:
    shards: list[Shard]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass
class DatasetInfo:
    url: str
    classes: list[str]
    multi_label: bool
    splits: dict[str, Split]
    seed: int = 0
    image_policy: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    inputs: int = 0
    rejected: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.splits.values())

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DatasetError(f"{self.url}: no split {name!r}; this dataset has {', '.join(self.splits) or 'none'}")
        return self.splits[name]

    def shard_url(self, shard: Shard) -> str:
        return storage.join(self.url, shard.name)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "classes": self.classes,
            "multi_label": self.multi_label,
            "seed": self.seed,
            "image_policy": self.image_policy,
            "source": self.source,
            "splits": {
                name: {"samples": sp.samples, "bytes": sp.bytes, "shards": [vars(s) for s in sp.shards]}
                for name, sp in self.splits.items()
            },
            "inputs": self.inputs,
            "samples": self.samples,
            "rejected": self.rejected,
        }


def load(url: str) -> DatasetInfo:
    """Read `url/dataset.json`; a missing or malformed file raises DatasetError saying what to do."""
    url = url.rstrip("/")
    meta_url = storage.join(url, "dataset.json")
    try:
        raw = storage.read_json(meta_url)
    except FileNotFoundError as e:
        raise DatasetError(
            f"{meta_url} does not exist: {url} is not a prepared dataset (or its preparation has not finished). "
            "Run `mixer prepare SOURCE DEST` first, or fix data.dataset."
        ) from e
    except ValueError as e:
        raise DatasetError(f"{meta_url}: not valid JSON ({e})") from e
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise DatasetError(
            f"{meta_url}: format {raw.get('format')!r} version {raw.get('version')!r}; "
            f"this reader understands {FORMAT!r} version {VERSION}"
        )
    try:
        splits = {
            name: Split([Shard(**s) for s in sp["shards"]]) for name, sp in raw["splits"].items()
        }
        return DatasetInfo(
            url=url,
            classes=list(raw["classes"]),
            multi_label=bool(raw["multi_label"]),
            splits=splits,
            seed=raw.get("seed", 0),
            image_policy=raw.get("image_policy", {}),
            source=raw.get("source", {}),
            inputs=raw.get("inputs", 0),
            rejected=raw.get("rejected", 0),
        )
    except (KeyError, TypeError) as e:
        raise DatasetError(f"{meta_url}: missing or malformed field {e}") from e


def save(info: DatasetInfo) -> None:
    """Write dataset.json atomically: call this last, once every shard it lists is in place."""
    storage.write_json_atomic(storage.join(info.url, "dataset.json"), info.to_json())
