"""One image in, one training-ready image out: checked, made RGB, upright, no larger than the policy allows.

A JPEG that needs no change keeps its original bytes; anything else is decoded once (at reduced scale when the
JPEG decoder can skip work, via libjpeg-turbo's DCT scaling), resized so its short side is at most `max_size`
(never upscaled), rotated by its EXIF orientation and encoded as JPEG. An input that cannot be used raises
`Rejected` with a short reason code and a sentence saying what is wrong.

The resize (`shrink`) runs in integer kernels (OpenCV's fixed-point ones near the target size, PIL's further away),
which give the same bytes with or without the CPU's vector units: a dataset is the same whichever machines of a
cluster made its shards. `VERSION` names the image path in a run's record, so that a re-run with another one is
refused instead of mixing the two in one dataset.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the image upright (same table as PIL.ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# 1: PIL's antialiased bilinear resize; 2: `shrink`.
VERSION = 2
# Below this ratio of input to output size, bilinear interpolation alone loses nothing to a blurred one (measured
# against a Lanczos resize of photographs: it comes closer up to 1.5).
BLUR_ABOVE = 1.5
# From this ratio on (an image at full scale: not a JPEG, or a JPEG over 8 times its target), PIL's filter after its
# integer box reduction: a Gaussian blur as wide as the ratio asks would cost up to ten times more.
PIL_FROM = 2.0
MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF8": "GIF", b"RIFF": "WEBP", b"BM": "BMP"}

# One image is too small to share among threads, and each shard task has a core of its own.
cv2.setNumThreads(1)


class Rejected(Exception):
    """An input that does not become a sample. `reason` is a short code for counting, `detail` says why."""

    def __init__(self, reason: str, detail: str, **fields: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.fields = fields  # more to record in rejected.jsonl (a near-duplicate's match)


@dataclass(frozen=True)
class ImagePolicy:
    max_size: int = 256
    quality: int = 95


@dataclass
class Encoded:
    data: bytes
    ext: str
    meta: dict[str, Any] = field(default_factory=dict)


def target_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) with the short side at most `max_size`, aspect ratio kept, never larger than the input."""
    short = min(width, height)
    if short <= max_size:
        return width, height
    scale = max_size / short
    if width <= height:
        return max_size, max(1, round(height * scale))
    return max(1, round(width * scale)), max_size


def process(data: bytes, policy: ImagePolicy) -> Encoded:
    """Turn the bytes of one input file into the bytes stored in a shard, or raise Rejected."""
    if not data:
        raise Rejected("empty", "empty file (0 bytes)")
    im = _open(data)
    width, height = im.size
    if width == 0 or height == 0:
        raise Rejected("zero-size", f"image has size {width}x{height}")
    orientation = _orientation(im)
    size = target_size(width, height, policy.max_size)
    changes = []
    if size != (width, height):
        changes.append("resize")
    if orientation != 1:
        changes.append("exif-rotate")
    if im.mode != "RGB":
        changes.append(f"{im.mode}-to-RGB")
    if im.format != "JPEG":
        changes.append(f"{im.format}-to-JPEG")
    meta = {"source_format": im.format, "source_mode": im.mode, "source_size": [width, height]}

    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        if not changes:
            _check_jpeg(data)
            return Encoded(data, "jpg", {**meta, "size": [width, height], "changes": []})
        pixels = _decode_jpeg(data, size)
    else:
        pixels = np.asarray(_decode_with_pil(im, size))
    if pixels.shape[:2] != (size[1], size[0]):
        pixels = shrink(pixels, size)
    if orientation in UPRIGHT:
        pixels = np.asarray(Image.fromarray(pixels).transpose(UPRIGHT[orientation]))
    out = simplejpeg.encode_jpeg(pixels, quality=policy.quality, colorspace="RGB", colorsubsampling="420")
    return Encoded(out, "jpg", {**meta, "size": [pixels.shape[1], pixels.shape[0]], "changes": changes})


def shrink(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 `pixels` made `size` (width, height) smaller, in integer kernels that give the same bytes on any
    CPU. Below PIL_FROM (every DCT-scaled JPEG: the decoder leaves it within 2x of its target): OpenCV's bilinear
    INTER_LINEAR_EXACT, above BLUR_ABOVE after a Gaussian blur whose variance, with the interpolation's own, is that
    of PIL's antialiased bilinear filter, (ratio^2 - 1) / 6. Against a Lanczos resize that comes as close as PIL's
    filter, in a third of its time. From PIL_FROM on, PIL's antialiased bilinear filter itself."""
    ratio = min(pixels.shape[1] / size[0], pixels.shape[0] / size[1])
    if ratio >= PIL_FROM:
        return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))
    if ratio > BLUR_ABOVE:
        sigma = ((ratio * ratio - 1) / 6) ** 0.5
        pixels = cv2.GaussianBlur(pixels, (0, 0), sigma, sigmaY=sigma, hint=cv2.ALGO_HINT_ACCURATE)
    return cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR_EXACT)


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected("too-large", str(e)) from e
    except UnidentifiedImageError as e:
        raise _unidentified(data) from e
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise Rejected("corrupt", f"unreadable image header: {e}") from e


def _unidentified(data: bytes) -> Rejected:
    """Say more than 'cannot identify' when the bytes start like an image."""
    kind = next((name for magic, name in MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        head = data[:64]
        looks_text = all(32 <= b < 127 or b in b"\t\r\n" for b in head)
        what = "text, not an image" if looks_text else "not a recognised image format"
        return Rejected("not-image", f"{what} ({len(data)} bytes)")
    if kind == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        if width == 0 or height == 0:
            return Rejected("zero-size", f"PNG header declares size {width}x{height}")
    return Rejected("corrupt", f"starts like a {kind} but its header cannot be read")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block should not cost the image, only its orientation
        return 1
    return value if value in UPRIGHT else 1


def _decode_error(e: Exception) -> Rejected:
    message = str(e)
    if "truncated" in message.lower() or "premature end" in message.lower():
        return Rejected("truncated", f"truncated image data: {message}")
    return Rejected("corrupt", f"undecodable image data: {message}")


def _check_jpeg(data: bytes) -> None:
    """Decode the whole entropy-coded stream at 1/8 scale: cheap, yet any truncation or corruption shows."""
    try:
        # simplejpeg scales only to meet a minimum size; min_factor alone would decode at full size.
        simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=1, min_height=1)
    except ValueError as e:
        raise _decode_error(e) from e


def _decode_jpeg(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The image at the smallest DCT scale that is still at least `size` (stored orientation), HxWx3 RGB."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size[0], min_height=size[1])
    except ValueError as e:
        raise _decode_error(e) from e


def _decode_with_pil(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Any format PIL reads (PNG, GIF, WebP, CMYK JPEG...): the first frame, alpha flattened onto white, as RGB."""
    try:
        if im.format == "JPEG":
            im.draft("RGB", size)
        im.load()
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        raise _decode_error(e) from e
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # Convert 16-bit samples to 8 bits by scale; PIL's own conversion would clip everything above 255 to white.
        scale = 1 / 257 if im.mode.startswith("I;16") else 1.0
        array = np.clip(np.asarray(im, dtype=np.float64) * scale, 0, 255)
        im = Image.fromarray(array.round().astype(np.uint8), "L")
    return im.convert("RGB")
