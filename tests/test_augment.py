"""RandAugment in OpenCV's kernels (pipeline/augment.py): a pure function of the image and the per-sample seed, with
each operation doing what torchvision's of the same name does at the same magnitude."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pipeline import augment


def picture(seed: int = 0, size: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) + rng.integers(0, 20, (size, size, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def apply(op: str, magnitude: int, negative: bool = False, image: np.ndarray | None = None) -> np.ndarray:
    return augment._apply(picture() if image is None else image, op, magnitude, negative)


def test_the_same_seed_gives_the_same_bytes_and_other_seeds_other_ones():
    image = picture()
    first = augment.rand_augment(image, 2, 20, random.Random(7))
    assert np.array_equal(first, augment.rand_augment(image, 2, 20, random.Random(7)))
    assert first.shape == image.shape and first.dtype == np.uint8
    others = {augment.rand_augment(image, 2, 20, random.Random(s)).tobytes() for s in range(40)}
    assert len(others) > 20  # 14 x 14 choices of operations, and signs


def test_every_operation_is_drawn():
    rnd, seen = random.Random(0), set()
    for _ in range(400):
        seen.add(augment.OPS[rnd.randrange(len(augment.OPS))])
    assert seen == set(augment.OPS)


@pytest.mark.parametrize("op", ["identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
                                "brightness", "color", "contrast", "sharpness", "posterize"])
def test_magnitude_zero_leaves_the_image_alone(op):
    assert np.array_equal(apply(op, 0), picture())


def test_operations_at_full_magnitude_do_what_they_are_named_for():
    image = picture()
    assert set(np.unique(apply("posterize", 30))) <= set(range(0, 256, 16))  # 4 bits kept
    assert np.array_equal(apply("solarize", 30), 255 - image)  # threshold 0: every pixel inverted
    assert np.array_equal(apply("solarize", 0), np.where(image >= 255, 255 - image, image))
    shifted = apply("translate_x", 30)  # 150/331 of 48 pixels: 21 columns, black fill
    assert np.array_equal(shifted[:, :-21], image[:, 21:]) and not shifted[:, -21:].any()
    rotated = apply("rotate", 30)
    assert not rotated[0, 0].any() and not rotated[-1, -1].any()  # corners turned out of the picture, black fill
    darker, brighter = apply("brightness", 30, negative=True), apply("brightness", 30)
    assert darker.mean() < 0.15 * image.mean() and brighter.mean() > 1.5 * image.mean()  # factors 0.1 and 1.9
    grey = apply("color", 30, negative=True)  # factor 0.1: nearly grey
    assert np.abs(grey[..., 0].astype(int) - grey[..., 1]).mean() < 0.2 * np.abs(
        image[..., 0].astype(int) - image[..., 1]).mean()
    flat = np.full((48, 48, 3), 100, np.uint8)
    flat[:24] = 120
    stretched = apply("autocontrast", 0, image=flat)
    assert set(np.unique(stretched)) == {0, 255}


def test_magnitudes_outside_the_scale_are_refused():
    with pytest.raises(ValueError, match="magnitude 31 is outside 0..30"):
        augment.rand_augment(picture(), 2, 31, random.Random(0))
