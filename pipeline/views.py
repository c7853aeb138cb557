"""What a training view of a sample is: the parameters drawn from its seed (`View`), which both image paths make
the view from, and what the device path needs to make it (`Encoded`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class View:
    """A training view of one sample, drawn from its seed: the crop box in the full image's pixels, the flip and
    RandAugment's operations. Both image paths make the view from this."""

    height: int  # the full image
    width: int
    top: int
    left: int
    crop_height: int
    crop_width: int
    flip: bool
    ops: tuple[tuple[str, bool], ...]


@dataclass
class Encoded:
    """A view for the device to make (data.decode: gpu): the JPEG bytes, or for an image the device's decoder
    does not take (a PNG, or a JPEG only PIL reads), its crop made on the CPU as the CPU path makes it."""

    view: View
    key: str
    shard_url: str
    jpeg: bytes | None = None
    cropped: torch.Tensor | None = None  # uint8 [3, S, S], neither flipped nor augmented
