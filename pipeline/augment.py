"""RandAugment (Cubuk et al. 2020) on uint8 images at the crop size, as the paper's ImageNet-21k runs use it.

The operations and their magnitude scales are torchvision's `v2.RandAugment` (31 bins; a magnitude m picks bin m of
each scale, signed ones flipped with probability 1/2): identity, shear x/y (up to 0.3), translate x/y (up to 150/331
of the side), rotate (up to 30 degrees), brightness, colour, contrast, sharpness (factor 1 +- up to 0.9), posterize
(8 down to 4 bits), solarize (threshold 255 down to 0), autocontrast, equalize; geometric ones with nearest
sampling and black fill. Each runs in OpenCV's kernels on the HxWx3 uint8 image (an affine warp, a lookup table or
a saturating weighted sum: tens of microseconds at 224x224, several times less than torch's or PIL's general
kernels), single-threaded: the loader's processes are the parallelism. The choices are drawn from the
`random.Random` the caller seeds per sample, so the result is a pure function of the image and that seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import cv2
import numpy as np

BINS = 31
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast",
       "sharpness", "posterize", "solarize", "autocontrast", "equalize")
_IDENTITY = np.arange(256, dtype=np.uint8)
# torchvision's adjust_sharpness: this 3x3 smoothing, the border rows and columns left as they were.
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13

cv2.setNumThreads(1)


def _scale(top: float, magnitude: int) -> float:
    return top * magnitude / (BINS - 1)


def _warp(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The affine map `matrix` (output pixel -> input pixel), nearest sampling, black outside the image."""
    h, w = image.shape[:2]
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def _blend(image: np.ndarray, other: np.ndarray | float, factor: float) -> np.ndarray:
    """factor * image + (1 - factor) * other, rounded and saturated to uint8 (torchvision's _blend)."""
    if isinstance(other, float):
        return cv2.addWeighted(image, factor, image, 0.0, (1.0 - factor) * other)
    return cv2.addWeighted(image, factor, other, 1.0 - factor, 0.0)


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def _autocontrast(image: np.ndarray) -> np.ndarray:
    low, high = np.array([cv2.minMaxLoc(channel)[:2] for channel in cv2.split(image)], np.float32).T
    scale = np.where(high > low, 255.0 / np.maximum(high - low, 1), 1.0)
    offset = np.where(high > low, low, 0.0)
    table = np.clip((np.arange(256, dtype=np.float32)[:, None] - offset) * scale, 0, 255)
    return cv2.LUT(image, table.astype(np.uint8).reshape(256, 1, 3))


GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def warp_matrix(op: str, magnitude: int, negative: bool, h: int, w: int) -> np.ndarray:
    """The 2x3 affine map of a geometric operation on an h x w image, output pixel -> input pixel."""
    if op in ("shear_x", "shear_y"):
        v = shear(magnitude, negative)
        return np.array([[1, v, 0], [0, 1, 0]] if op == "shear_x" else [[1, 0, 0], [v, 1, 0]], np.float64)
    if op in ("translate_x", "translate_y"):
        pixels = translate_pixels(w if op == "translate_x" else h, magnitude, negative)
        return np.array([[1, 0, pixels], [0, 1, 0]] if op == "translate_x" else [[1, 0, 0], [0, 1, pixels]],
                        np.float64)
    matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), rotation_degrees(magnitude, negative), 1.0)
    return cv2.invertAffineTransform(matrix)


def _apply(image: np.ndarray, op: str, magnitude: int, negative: bool) -> np.ndarray:
    if op in GEOMETRIC:
        return _warp(image, warp_matrix(op, magnitude, negative, *image.shape[:2]))
    factor = enhance_factor(magnitude, negative)
    if op == "brightness":
        return _blend(image, 0.0, factor)
    if op == "color":
        return _blend(image, _grey(image), factor)
    if op == "contrast":
        return _blend(image, float(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).mean()), factor)
    if op == "sharpness":
        smooth = cv2.filter2D(image, -1, _SMOOTH, borderType=cv2.BORDER_REPLICATE)
        smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = image[0], image[-1], image[:, 0], image[:, -1]
        return _blend(image, smooth, factor)
    if op == "posterize":
        bits = posterize_bits(magnitude)
        return cv2.LUT(image, _IDENTITY & np.uint8((0xFF << (8 - bits)) & 0xFF))
    if op == "solarize":
        threshold = solarize_threshold(magnitude)
        return cv2.LUT(image, np.where(_IDENTITY >= threshold, 255 - _IDENTITY, _IDENTITY).astype(np.uint8))
    if op == "autocontrast":
        return _autocontrast(image)
    if op == "equalize":
        return cv2.merge([cv2.equalizeHist(channel) for channel in cv2.split(image)])
    return image


def draw(layers: int, rnd: random.Random) -> list[tuple[str, bool]]:
    """RandAugment's choices for one image: `layers` (operation, negative) pairs drawn from `rnd`. Every path that
    applies them (OpenCV here, torch on an accelerator in pipeline/device_views.py) takes the same list."""
    return [(OPS[rnd.randrange(len(OPS))], rnd.random() < 0.5) for _ in range(layers)]


def check_magnitude(magnitude: int) -> None:
    if not 0 <= magnitude < BINS:
        raise ValueError(f"RandAugment magnitude {magnitude} is outside 0..{BINS - 1}")


def rand_augment(image: np.ndarray, layers: int, magnitude: int, rnd: random.Random) -> np.ndarray:
    """`layers` operations drawn from `rnd`, each at `magnitude` (0-30), applied to an HxWx3 uint8 image (C-ordered;
    the result may be the input itself)."""
    check_magnitude(magnitude)
    for op, negative in draw(layers, rnd):
        image = _apply(image, op, magnitude, negative)
    return image


def augment_planes(planes: np.ndarray, flip: bool, ops: Sequence[tuple[str, bool]], magnitude: int) -> np.ndarray:
    """A 3xHxW uint8 image (the loader's layout) flipped left-right if asked, then put through the RandAugment
    operations `ops` (from `draw`); 3xHxW out. The layout changes go through OpenCV's (de)interleaving, 20x faster
    than a strided numpy copy."""
    check_magnitude(magnitude)
    image = cv2.merge([planes[0], planes[1], planes[2]])
    if flip:
        image = cv2.flip(image, 1)
    for op, negative in ops:
        image = _apply(image, op, magnitude, negative)
    return np.stack(cv2.split(image))


def translate_pixels(side: int, magnitude: int, negative: bool) -> int:
    """translate_x/y's shift in whole pixels for an image `side` pixels wide (x) or high (y)."""
    return int((-1.0 if negative else 1.0) * _scale(150 / 331 * side, magnitude))


def shear(magnitude: int, negative: bool) -> float:
    return (-1.0 if negative else 1.0) * _scale(0.3, magnitude)


def rotation_degrees(magnitude: int, negative: bool) -> float:
    return (-1.0 if negative else 1.0) * _scale(30.0, magnitude)


def enhance_factor(magnitude: int, negative: bool) -> float:
    """brightness, color, contrast and sharpness: the blend factor."""
    return 1.0 + (-1.0 if negative else 1.0) * _scale(0.9, magnitude)


def posterize_bits(magnitude: int) -> int:
    return 8 - int(math.floor(magnitude / ((BINS - 1) / 4) + 0.5))


def solarize_threshold(magnitude: int) -> int:
    return round(255 * (1.0 - magnitude / (BINS - 1)))
