"""Training views made on the trainer's device (`data.decode: gpu`): JPEG decode with nvJPEG through torchvision,
then crop, flip, RandAugment and mixup as batched tensor operations, from the parameters the loader processes drew
on the CPU (`pipeline.views.View`, one per sample, from the sample's seed).

Each RandAugment operation follows its OpenCV counterpart in pipeline/augment.py to the rounding: the same affine
maps with OpenCV's fixed-point nearest sampling, the same integer grey, lookup and equalisation rules, blends
rounded half to even. Samples that draw the same operation in the same layer go through it together, so a batch
costs at most 2 x 14 calls a layer whatever its size. The views differ from the CPU path's only where the decoders
and the resize round differently (the CPU path decodes at a reduced DCT scale). On a CPU device the same code runs,
which is how it is tested without a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from pipeline import augment
from pipeline.dataset_json import DatasetError
from pipeline.views import Encoded

# OpenCV's RGB -> grey in fixed point (cv2.COLOR_RGB2GRAY on uint8): (R*4899 + G*9617 + B*1868 + 2^13) >> 14.
_GREY = (4899, 9617, 1868)
_AB_BITS = 10  # OpenCV's warpAffine: coordinates in fixed point with this many fractional bits
# torchvision 0.29 deprecates its image decoders for TorchCodec's, whose nvJPEG batch decode is not in the pinned
# set; the warning would repeat on every batch of every rank.
_DEPRECATED_DECODERS = r"The image decoding and encoding capabilities of TorchVision are deprecated"


def make_batch(encoded: Sequence[Encoded], size: int, magnitude: int, lams: Sequence[float], per_stream: int,
               device: torch.device) -> torch.Tensor:
    """The batch's float32 images in [-1, 1] on `device`: decoded, cropped, flipped, RandAugment'ed, and with
    `lams` (one a stream, empty: no mixup) each stream's run of `per_stream` images mixed with itself reversed."""
    x = crops(encoded, size, device)
    flips = [i for i, e in enumerate(encoded) if e.view.flip]
    if flips:
        rows = torch.tensor(flips, device=device)
        x[rows] = x[rows].flip(-1)
    x = rand_augment(x, [e.view.ops for e in encoded], magnitude)
    return to_float(x, lams, per_stream)


def crops(encoded: Sequence[Encoded], size: int, device: torch.device) -> torch.Tensor:
    """uint8 [N, 3, size, size] on `device`: each view's box resized, the JPEGs decoded there in one call."""
    out = torch.empty((len(encoded), 3, size, size), dtype=torch.uint8, device=device)
    jpegs = [i for i, e in enumerate(encoded) if e.jpeg is not None]
    for i, image in zip(jpegs, _decode(encoded, jpegs, device), strict=True):
        v = encoded[i].view
        out[i] = F.resized_crop(image, v.top, v.left, v.crop_height, v.crop_width, [size, size], antialias=True)
    for i, e in enumerate(encoded):
        if e.cropped is not None:
            out[i] = e.cropped.to(device, non_blocking=True)
    return out


def _decode(encoded: Sequence[Encoded], jpegs: list[int], device: torch.device) -> list[torch.Tensor]:
    data = [torch.frombuffer(bytearray(encoded[i].jpeg or b""), dtype=torch.uint8) for i in jpegs]
    if not data:
        return []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATED_DECODERS, category=DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        for i, one in zip(jpegs, data, strict=True):  # which one: the decoder names none
            try:
                decode_jpeg(one, mode=ImageReadMode.RGB)
            except RuntimeError as e:
                e_ = encoded[i]
                raise DatasetError(
                    f"{e_.shard_url}: sample {e_.key!r}: the JPEG decoder refused it ({e}); with data.decode: cpu "
                    "the run skips and replaces such samples; `mixer verify` checks the whole dataset") from e
        raise


def rand_augment(x: torch.Tensor, ops: Sequence[Sequence[tuple[str, bool]]], magnitude: int) -> torch.Tensor:
    """Each image's own RandAugment operations (`ops[i]`, from `augment.draw`), layer by layer; uint8 [N, 3, H, W]."""
    augment.check_magnitude(magnitude)
    for layer in range(max((len(o) for o in ops), default=0)):
        groups: dict[tuple[str, bool], list[int]] = {}
        for i, o in enumerate(ops):
            groups.setdefault(o[layer], []).append(i)
        for (op, negative), members in groups.items():
            if op == "identity":
                continue
            rows = torch.tensor(members, device=x.device)
            x[rows] = apply(x[rows], op, magnitude, negative)
    return x


def apply(x: torch.Tensor, op: str, magnitude: int, negative: bool) -> torch.Tensor:
    """One RandAugment operation on uint8 [n, 3, H, W], as augment._apply does it on one HxWx3 image."""
    if op in augment.GEOMETRIC:
        return warp(x, augment.warp_matrix(op, magnitude, negative, x.shape[-2], x.shape[-1]))
    factor = augment.enhance_factor(magnitude, negative)
    if op == "brightness":
        return blend_constant(x, 0.0, factor)
    if op == "color":
        return blend(x, grey(x).expand_as(x), factor)
    if op == "contrast":
        g = grey(x)
        mean = g.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.int64).double() / g[0].numel()
        return blend_constant(x, mean, factor)
    if op == "sharpness":
        return blend(x, smooth(x), factor)
    if op == "posterize":
        return x & ((0xFF << (8 - augment.posterize_bits(magnitude))) & 0xFF)
    if op == "solarize":
        return torch.where(x >= augment.solarize_threshold(magnitude), 255 - x, x)
    if op == "autocontrast":
        return autocontrast(x)
    if op == "equalize":
        return equalize(x)
    return x


def warp(x: torch.Tensor, matrix: np.ndarray) -> torch.Tensor:
    """cv2.warpAffine(WARP_INVERSE_MAP, INTER_NEAREST, black border): output pixel (u, v) takes input pixel
    matrix @ (u, v, 1), located in OpenCV's fixed point (1/1024 pixel, rounded half to even, then +1/2 and floor)."""
    n, c, h, w = x.shape
    m = torch.as_tensor(matrix, dtype=torch.float64, device=x.device)
    scale, half = 1 << _AB_BITS, 1 << (_AB_BITS - 1)
    us = torch.arange(w, dtype=torch.float64, device=x.device)
    vs = torch.arange(h, dtype=torch.float64, device=x.device)
    src_x = (torch.round((m[0, 1] * vs + m[0, 2]) * scale).long() + half)[:, None] + \
        torch.round(m[0, 0] * us * scale).long()[None, :]
    src_y = (torch.round((m[1, 1] * vs + m[1, 2]) * scale).long() + half)[:, None] + \
        torch.round(m[1, 0] * us * scale).long()[None, :]
    src_x, src_y = src_x >> _AB_BITS, src_y >> _AB_BITS
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    index = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).flatten()
    out = x.reshape(n, c, h * w)[:, :, index].reshape(n, c, h, w)
    return out * inside.to(torch.uint8)


def blend(x: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    """cv2.addWeighted(x, factor, other, 1 - factor, 0): in float32, rounded half to even, saturated to uint8."""
    mixed = x.float() * factor + other.float() * (1.0 - factor)
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


def blend_constant(x: torch.Tensor, value: torch.Tensor | float, factor: float) -> torch.Tensor:
    """cv2.addWeighted(x, factor, x, 0, (1 - factor) * value): the constant term taken in float32 as OpenCV does."""
    gamma = torch.as_tensor((1.0 - factor) * value, dtype=torch.float64, device=x.device).float()
    return (x.float() * factor + gamma).round_().clamp_(0, 255).to(torch.uint8)


def grey(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's RGB -> grey, uint8 [n, 1, H, W]."""
    r, g, b = (x[:, i:i + 1].to(torch.int32) for i in range(3))
    return ((r * _GREY[0] + g * _GREY[1] + b * _GREY[2] + (1 << 13)) >> 14).to(torch.uint8)


def smooth(x: torch.Tensor) -> torch.Tensor:
    """torchvision's sharpness smoothing (3x3, centre 5, /13) rounded to uint8, border pixels left as they were."""
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=torch.float32, device=x.device) / 13
    n, c, h, w = x.shape
    inner = torch.nn.functional.conv2d(x.reshape(n * c, 1, h, w).float(), kernel[None, None])
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner.reshape(n, c, h - 2, w - 2).round_().clamp_(0, 255).to(torch.uint8)
    return out


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Each channel stretched from its [min, max] to [0, 255] in float32, truncated (augment._autocontrast)."""
    low = x.amin(dim=(2, 3), keepdim=True).float()
    high = x.amax(dim=(2, 3), keepdim=True).float()
    spread = high > low
    # tensor / tensor: torch computes a python number over a tensor through the reciprocal, one ulp off numpy's
    scale = torch.where(spread, torch.full_like(low, 255.0) / torch.clamp(high - low, min=1), torch.ones_like(low))
    offset = torch.where(spread, low, torch.zeros_like(low))
    return ((x.float() - offset) * scale).clamp_(0, 255).to(torch.uint8)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist on each channel: from the first occupied level on, level i goes to
    round(255 * (pixels above the first level up to i) / (pixels above the first level)); one level: unchanged."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros((n * c, 256), dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    first = (hist > 0).to(torch.uint8).argmax(dim=1, keepdim=True)
    at_first = hist.gather(1, first)
    rest = h * w - at_first
    scale = torch.full_like(rest, 255, dtype=torch.float32) / rest.clamp(min=1).to(torch.float32)
    lut = ((hist.cumsum(dim=1) - at_first).to(torch.float32) * scale).round_().clamp_(0, 255)
    lut = torch.where(rest > 0, lut, torch.arange(256, device=x.device, dtype=torch.float32).expand_as(lut))
    return lut.to(torch.uint8).gather(1, flat).reshape(n, c, h, w)


def to_float(x: torch.Tensor, lams: Sequence[float], per_stream: int) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1], each stream's run mixed with itself reversed when `lams` are given."""
    out = x.float()
    if lams:
        lam = torch.tensor(lams, dtype=torch.float32, device=x.device).repeat_interleave(per_stream)[:, None, None,
                                                                                                      None]
        reverse = out.reshape(len(lams), per_stream, *out.shape[1:]).flip(1).reshape(out.shape)
        out = out * lam + reverse * (1 - lam)
    return out.div_(127.5).sub_(1.0).clamp_(-1.0, 1.0)
