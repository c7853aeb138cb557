"""The shard plan: a pure function of the sorted listing and the options.

Every input gets a stable key (its first class name plus a hash of its source name, no dots), a split ("val" is
held out per class, stratified on the first label; the rest is "train"), and a place in a seeded global shuffle of
its split, so every shard mixes classes. Each split is cut into shards whose sizes differ by at most one.
The plan's digest names exactly what will be written; a resumed run must have the same digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from data_prep.sources import Item, Listing
from pipeline.errors import MixerError

SPLITS = ("train", "val")
KEY_PREFIX_CHARS = 40


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


@dataclass
class ShardPlan:
    name: str
    split: str
    samples: list[tuple[str, Item]]  # (key, input) in the order they are written


@dataclass
class DatasetPlan:
    shards: list[ShardPlan]
    digest: str

    def split_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for shard in self.shards:
            sizes[shard.split] = sizes.get(shard.split, 0) + len(shard.samples)
        return sizes


def sample_key(item: Item, classes: list[str]) -> str:
    prefix = re.sub(r"[^A-Za-z0-9_-]+", "_", classes[item.labels[0]])[:KEY_PREFIX_CHARS]
    return f"{prefix}-{hashlib.sha1(item.source.encode()).hexdigest()[:16]}"


def plan_dataset(listing: Listing, options: PlanOptions) -> DatasetPlan:
    options.check()
    splits = _split(listing, options)
    shards = []
    for split_index, split in enumerate(SPLITS):
        members = splits[split]
        if not members:
            continue
        order = np.random.default_rng([options.seed, split_index]).permutation(len(members))
        shuffled = [members[i] for i in order]
        count = math.ceil(len(shuffled) / options.shard_size)
        for number, chunk in enumerate(np.array_split(np.arange(len(shuffled)), count)):
            samples = [(sample_key(shuffled[i], listing.classes), shuffled[i]) for i in chunk]
            shards.append(ShardPlan(f"{split}-{number:06d}.tar", split, samples))
    _check_unique_keys(shards)
    return DatasetPlan(shards, _digest(shards, listing))


def _split(listing: Listing, options: PlanOptions) -> dict[str, list[Item]]:
    by_class: dict[int, list[int]] = {}
    for index, item in enumerate(listing.items):
        by_class.setdefault(item.labels[0], []).append(index)
    held_out: set[int] = set()
    for label, members in sorted(by_class.items()):
        if options.val_per_class is not None:
            n_val = min(options.val_per_class, len(members))
        elif options.val_fraction is not None:
            n_val = int(options.val_fraction * len(members) + 0.5)
        else:
            n_val = 0
        # Each class draws its own held-out set, so adding a class does not reshuffle the others.
        picked = np.random.default_rng([options.seed, 1 << 20, label]).permutation(len(members))[:n_val]
        held_out.update(members[i] for i in picked)
    return {
        "train": [item for index, item in enumerate(listing.items) if index not in held_out],
        "val": [item for index, item in enumerate(listing.items) if index in held_out],
    }


def _check_unique_keys(shards: list[ShardPlan]) -> None:
    seen: dict[str, str] = {}
    for shard in shards:
        for key, item in shard.samples:
            if key in seen:
                raise PlanError(f"inputs {seen[key]!r} and {item.source!r} hash to the same key {key!r}")
            seen[key] = item.source


def _digest(shards: list[ShardPlan], listing: Listing) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"classes": listing.classes, "multi_label": listing.multi_label}).encode())
    for shard in shards:
        h.update(f"\n{shard.name}".encode())
        for key, item in shard.samples:
            h.update(json.dumps([key, asdict(item)], sort_keys=True).encode())
    for rejected in listing.rejected:
        h.update(json.dumps(rejected, sort_keys=True).encode())
    return h.hexdigest()

