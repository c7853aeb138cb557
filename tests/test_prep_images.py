"""One image through the checks and conversions of data prep: every bad kind rejected with its reason, every odd
format made into an upright RGB JPEG no larger than the policy, good JPEGs kept byte for byte."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from data_prep.images import ImagePolicy, Rejected, process, shrink, target_size
from data_prep.sample_data import BAD_KINDS, bad_file, class_pattern, encode

POLICY = ImagePolicy(max_size=40, quality=95)


def _pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    return class_pattern([1], 4, width, height, np.random.default_rng(seed))


def _decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG"
    im.load()
    return im


def _mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.mark.parametrize(
    "kind, reason",
    [("truncated-jpeg", "truncated"), ("random-bytes", "not-image"), ("empty", "empty"), ("text", "not-image"),
     ("zero-size-png", "zero-size"), ("corrupt-jpeg", "corrupt")],
)
def test_bad_inputs_are_rejected_with_their_reason(kind, reason):
    assert kind in BAD_KINDS
    data, _ = bad_file(kind, np.random.default_rng(1))
    with pytest.raises(Rejected) as info:
        process(data, POLICY)
    assert info.value.reason == reason
    assert len(info.value.detail) > 10  # a sentence, not just a code


def test_text_and_zero_size_say_what_they_are():
    with pytest.raises(Rejected, match="text, not an image"):
        process(bad_file("text", np.random.default_rng(0))[0], POLICY)
    with pytest.raises(Rejected, match="0x16"):
        process(bad_file("zero-size-png", np.random.default_rng(0))[0], POLICY)


def test_truncated_png_is_rejected():
    data, _ = encode(_pixels(64, 64), "png")
    with pytest.raises(Rejected) as info:
        process(data[: len(data) // 2], POLICY)
    assert info.value.reason in ("truncated", "corrupt")


def test_small_rgb_jpeg_keeps_its_bytes():
    data, _ = encode(_pixels(36, 30), "jpeg")
    out = process(data, POLICY)
    assert out.data == data and out.ext == "jpg" and out.meta["changes"] == []


@pytest.mark.parametrize("size, expected", [((400, 300), (53, 40)), ((300, 400), (40, 53)), ((41, 41), (40, 40)),
                                            ((30, 900), (30, 900)), ((40, 10), (40, 10))])
def test_target_size_keeps_aspect_and_never_upscales(size, expected):
    assert target_size(*size, 40) == expected


def test_large_jpeg_is_resized_short_side_to_max_size():
    pixels = _pixels(400, 300)
    data, _ = encode(pixels, "jpeg")
    out = process(data, POLICY)
    im = _decoded(out.data)
    assert im.size == (53, 40) and im.mode == "RGB" and out.meta["changes"] == ["resize"]
    reference = Image.fromarray(pixels).resize((53, 40), Image.Resampling.BICUBIC, reducing_gap=None)
    assert _mean_abs_diff(im, reference) < 12  # the reduced-scale decode still gives the same picture


@pytest.mark.parametrize("kind, change", [("png", "PNG-to-JPEG"), ("webp", "WEBP-to-JPEG"), ("gif", "GIF-to-JPEG"),
                                          ("gray", "L-to-RGB"), ("cmyk", "CMYK-to-RGB"),
                                          ("palette-alpha", "P-to-RGB"), ("rgba-png", "RGBA-to-RGB")])
def test_other_formats_and_modes_become_rgb_jpeg(kind, change):
    pixels = _pixels(64, 48)
    data, _ = encode(pixels, kind)
    out = process(data, POLICY)
    im = _decoded(out.data)
    assert im.mode == "RGB" and im.size == (53, 40)
    assert change in out.meta["changes"]
    if kind not in ("gray", "gif", "palette-alpha"):  # lossy palettes and gray lose colour by design
        reference = Image.fromarray(pixels).resize((53, 40), Image.Resampling.BICUBIC)
        assert _mean_abs_diff(im, reference) < 25


def test_transparency_is_flattened_onto_white():
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (5, 5, 15, 15))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    im = np.asarray(_decoded(process(buf.getvalue(), POLICY).data), np.int32)
    assert (im[0, 0] > 240).all()  # transparent red became white, not red or black
    assert im[10, 10, 2] > 200 and im[10, 10, 0] < 60


def test_exif_orientation_is_applied():
    pixels = _pixels(60, 44)
    data, _ = encode(pixels, "exif-rotated")
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (44, 60)  # kept on its side in the file
    out = process(data, POLICY)
    im = _decoded(out.data)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert im.size == target_size(*upright.size, 40) == (55, 40)
    assert "exif-rotate" in out.meta["changes"]
    assert _mean_abs_diff(im, upright.resize(im.size, Image.Resampling.BICUBIC)) < 12
    assert 0x0112 not in im.getexif()  # the output carries no orientation to apply twice


def test_small_exif_rotated_jpeg_is_rotated_without_resizing():
    data, _ = encode(_pixels(30, 24), "exif-rotated")
    im = _decoded(process(data, POLICY).data)
    assert im.size == (30, 24)


def test_sixteen_bit_png_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")
    im = np.asarray(_decoded(process(buf.getvalue(), POLICY).data), np.int32)
    assert im[0, 0].max() < 20 and im[16, 0].min() > 90 and im[-1, -1].min() > 230


def test_decompression_bomb_is_rejected(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data, _ = encode(_pixels(64, 64), "jpeg")
    with pytest.raises(Rejected) as info:
        process(data, POLICY)
    assert info.value.reason == "too-large"


def test_same_input_gives_same_bytes():
    data, _ = encode(_pixels(200, 120), "png")
    assert process(data, POLICY).data == process(data, POLICY).data


@pytest.mark.parametrize("size", [(341, 256), (230, 172), (210, 158)])  # bilinear alone, blurred, blurred more
def test_shrink_gives_the_same_bytes_without_the_cpus_vector_units(size):
    """A dataset must not depend on which machine made a shard: OpenCV's generic code (no SIMD, no IPP) and the
    vector code this machine picks give the same bytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    fast = shrink(pixels, size)
    try:
        cv2.setUseOptimized(False)
        cv2.ipp.setUseIPP(False)
        generic = shrink(pixels, size)
    finally:
        cv2.setUseOptimized(True)
        cv2.ipp.setUseIPP(True)
    assert fast.shape == (size[1], size[0], 3) and np.array_equal(fast, generic)


@pytest.mark.parametrize("width, plain_std, max_std", [(166, 70, 30), (100, 120, 20)])  # OpenCV's path, PIL's
def test_shrink_does_not_alias_fine_detail(width, plain_std, max_std):
    """One-pixel stripes made 1.8 and 3 times smaller turn mostly grey, as an antialiased resize makes them (plain
    bilinear interpolation picks columns: stripes again), and a smooth picture made as many times smaller stays close
    to a Lanczos resize."""
    ratio = 300 / width
    stripes = np.zeros((90, 300, 3), np.uint8)
    stripes[:, ::2] = 255
    size = (width, round(90 / ratio))
    out = shrink(stripes, size).astype(np.float64)
    assert abs(out.mean() - 127.5) < 3 and out.std() < max_std
    assert cv2.resize(stripes, size, interpolation=cv2.INTER_LINEAR_EXACT).std() > plain_std  # what the blur prevents
    smooth, size = _pixels(400, 300), (round(400 / ratio), round(300 / ratio))
    lanczos = Image.fromarray(smooth).resize(size, Image.Resampling.LANCZOS)
    assert _mean_abs_diff(Image.fromarray(shrink(smooth, size)), lanczos) < 3
