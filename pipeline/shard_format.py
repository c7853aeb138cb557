"""A shard's samples: the one definition shared by the writer (data_prep.shard), the training reader
(pipeline.data) and the verifier (data_prep.verify), so that a shard one of them accepts the others accept too.

A sample is the tar members that share a key, written one after the other:
- `{key}.jpg` (or `.jpeg`, `.png`): the image;
- single-label datasets: `{key}.cls`, the class index as decimal text, then `{key}.json`, the source metadata;
- multi-label datasets: `{key}.json`, the source metadata plus a "labels" list of class indices.
The key of a member `a/b/key.ext` runs to the first dot of its file name, the rule by which webdataset groups
members, so keys contain no dots. Metadata JSON has sorted keys and compact separators: equal samples give equal
bytes on any machine.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.dataset_json import DatasetError

IMAGE_EXTS = ("jpg", "jpeg", "png")
LABEL_EXT = "cls"
METADATA_EXT = "json"

# webdataset's own rule (webdataset.tariterators.base_plus_ext): members it cannot key are skipped by it, so by us.
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_DECIMAL = re.compile(r"[0-9]+")


def split_member(name: str) -> tuple[str, str] | None:
    """`a/b/key.tar.gz` -> (`a/b/key`, `tar.gz`), the extension lower-cased as webdataset does; None for a name
    webdataset does not read as part of a sample (no dot in the file name)."""
    match = _MEMBER_NAME.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


def metadata_json(meta: Mapping[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def encode_sample(key: str, image: bytes, image_ext: str, labels: Sequence[int], multi_label: bool,
                  meta: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The (member name, bytes) of one sample, in the order they go into the tar."""
    if split_member(f"{key}.{image_ext}") != (key, image_ext) or image_ext not in IMAGE_EXTS:
        raise ValueError(f"cannot store key {key!r} with extension {image_ext!r}: keys have no dots and images are "
                         f"one of {', '.join(IMAGE_EXTS)}")
    members = [(f"{key}.{image_ext}", image)]
    if multi_label:
        meta = {**meta, "labels": list(labels)}
    else:
        members.append((f"{key}.{LABEL_EXT}", str(labels[0]).encode()))
    members.append((f"{key}.{METADATA_EXT}", metadata_json(meta)))
    return members


def decode_sample(where: str, key: str, members: Mapping[str, bytes], multi_label: bool,
                  num_classes: int) -> tuple[bytes, tuple[int, ...]]:
    """(image bytes, labels) of the sample whose members are `members` (extension -> bytes). A sample that breaks
    the format raises DatasetError("{where}: sample '{key}': what is wrong")."""
    try:
        return _image(members), _labels(members, multi_label, num_classes)
    except _Malformed as e:
        raise DatasetError(f"{where}: sample {key!r}: {e}") from None


class _Malformed(Exception):
    """What is wrong with a sample, before the caller's place is added to it."""


def _image(members: Mapping[str, bytes]) -> bytes:
    found = [ext for ext in IMAGE_EXTS if ext in members]
    if len(found) != 1:
        raise _Malformed(f"expected one image ({'/'.join(IMAGE_EXTS)}), found {len(found)} among {sorted(members)}")
    if not members[found[0]]:
        raise _Malformed(f"empty image .{found[0]}")
    return members[found[0]]


def _labels(members: Mapping[str, bytes], multi_label: bool, num_classes: int) -> tuple[int, ...]:
    if multi_label:
        if METADATA_EXT not in members:
            raise _Malformed("no .json with labels (a multi-label dataset keeps them in {key}.json)")
        try:
            labels = json.loads(members[METADATA_EXT]).get("labels")
        except (ValueError, AttributeError) as e:
            raise _Malformed(f".json is not a JSON object ({e})") from e
        if not isinstance(labels, list) or not labels or any(type(label) is not int for label in labels):
            raise _Malformed(f".json has no list of label indices (got {labels!r})")
    else:
        if LABEL_EXT not in members:
            raise _Malformed("no .cls label (a single-label dataset keeps it in {key}.cls)")
        text = members[LABEL_EXT].decode(errors="replace").strip()
        if not _DECIMAL.fullmatch(text):
            raise _Malformed(f".cls is not a decimal integer: {text!r}")
        labels = [int(text)]
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise _Malformed(f"labels {bad} outside 0..{num_classes - 1}")
    return tuple(labels)
