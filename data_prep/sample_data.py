"""`mixer make-sample-data`: a small synthetic image collection that a tiny Mixer can learn at 32x32.

Each class has its own colour, stripe orientation and stripe frequency; every image adds a random phase, a random
brightness and pixel noise, and has its own size and aspect ratio. Formats vary the way real collections do:
mostly RGB JPEG, some PNG, grayscale, EXIF-rotated, CMYK, palette-with-transparency, RGBA, WebP and GIF images.
In the manifest layout some images carry two or three labels (their pattern blends those classes). On request,
bad files of several kinds are mixed in. The same seed gives the same bytes.
"""

from __future__ import annotations

import colorsys
import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.errors import MixerError

SAMPLE_LAYOUTS = ("imagefolder", "i21k-tars", "manifest")
MANIFEST_FORMATS = ("jsonl", "csv", "parquet")
BAD_KINDS = ("truncated-jpeg", "random-bytes", "empty", "text", "zero-size-png", "corrupt-jpeg", "missing")
# How every tenth image of a class is stored (the others are RGB JPEG); cycles through the exotic formats.
EXOTIC = ("png", "gray", "exif-rotated", "cmyk", "palette-alpha", "rgba-png", "webp", "gif")
MIN_SIDE, MAX_SIDE = 32, 96
GOLDEN = 0.6180339887498949


class SampleDataError(MixerError):
    """Options that cannot make a sample collection; the message names the option."""


def class_names(layout: str, classes: int) -> list[str]:
    if layout == "i21k-tars":
        return [f"n{1440764 + 7919 * c:08d}" for c in range(classes)]  # synset-like ids, in sorted order
    return [f"class{c:03d}" for c in range(classes)]


def class_pattern(labels: list[int], classes: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 array: for each label, stripes at the class's angle and frequency in the class's colour."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = x / width, y / height
    image = np.zeros((height, width, 3), np.float32)
    for c in labels:
        angle = np.pi * ((c * GOLDEN) % 1.0)
        cycles = 2.0 + (c % 3)
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * cycles * (x * np.cos(angle) + y * np.sin(angle)) + phase)
        colour = np.array(colorsys.hsv_to_rgb(c / max(classes, 1), 0.75, 0.95), np.float32)
        image += (0.25 + 0.75 * wave)[..., None] * colour
    image = image / len(labels) * rng.uniform(0.7, 1.1) + rng.normal(0.0, 0.06, image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def encode(pixels: np.ndarray, kind: str) -> tuple[bytes, str]:
    """(bytes, extension) of the image stored as `kind`."""
    im = Image.fromarray(pixels, "RGB")
    buf = io.BytesIO()
    if kind == "jpeg":
        im.save(buf, "JPEG", quality=90)
    elif kind == "png":
        im.save(buf, "PNG")
    elif kind == "gray":
        im.convert("L").save(buf, "JPEG", quality=90)
    elif kind == "exif-rotated":
        # Stored on its side with orientation 6 ("rotate 90 clockwise to view"): upright only if EXIF is applied.
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "palette-alpha":
        p = im.quantize(colors=64)
        p.info["transparency"] = 0
        p.save(buf, "PNG", transparency=0)
    elif kind == "rgba-png":
        rgba = im.convert("RGBA")
        alpha = np.full(pixels.shape[:2], 255, np.uint8)
        alpha[:2, :] = alpha[-2:, :] = 0  # transparent top and bottom rows
        rgba.putalpha(Image.fromarray(alpha, "L"))
        rgba.save(buf, "PNG")
    elif kind == "webp":
        im.save(buf, "WEBP", quality=90)
        return buf.getvalue(), "webp"
    elif kind == "gif":
        im.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(buf, "GIF")
        return buf.getvalue(), "gif"
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return buf.getvalue(), "png" if kind in ("png", "palette-alpha", "rgba-png") else "jpg"


def photo(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A photograph-like picture for de-duplication trials, unlike any other: smooth colour noise at four scales
    (uint8, size x size x 3)."""
    image = np.zeros((size, size, 3))
    for cells in (4, 8, 16, 32):
        coarse = (rng.normal(size=(cells, cells, 3)) / cells**0.5).astype(np.float32)
        image += np.stack([np.asarray(Image.fromarray(coarse[:, :, c]).resize((size, size), Image.Resampling.BICUBIC))
                           for c in range(3)], axis=-1)
    image -= image.min()
    return (image * (255 / image.max())).astype(np.uint8)


def near_copy(pixels: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    """A copy of a picture as it turns up again elsewhere: up to 10% cut off each side, resized 0.5-2x, brightness,
    colour and contrast changed by up to 10%, saved as JPEG of quality 30-95, PNG or WebP. (bytes, extension)"""
    from PIL import ImageEnhance

    im = Image.fromarray(pixels, "RGB")
    w, h = im.size
    left, top, right, bottom = rng.uniform(0, 0.10, 4) * [w, h, w, h]
    im = im.crop((round(left), round(top), w - round(right), h - round(bottom)))
    scale = rng.uniform(0.5, 2.0)
    im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Color, ImageEnhance.Contrast):
        im = enhance(im).enhance(rng.uniform(0.9, 1.1))
    buf = io.BytesIO()
    kind = ("JPEG", "PNG", "WEBP")[int(rng.integers(3))]
    im.save(buf, kind, **({} if kind == "PNG" else {"quality": int(rng.integers(30, 96))}))
    return buf.getvalue(), {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[kind]


def bad_file(kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """(bytes, extension) of a file that must be rejected, for each of BAD_KINDS but "missing"."""
    good, _ = encode(class_pattern([0], 1, 64, 48, rng), "jpeg")
    if kind == "truncated-jpeg":
        return good[: len(good) * 3 // 5], "jpg"
    if kind == "random-bytes":
        return rng.bytes(2048), "jpg"
    if kind == "empty":
        return b"", "jpg"
    if kind == "text":
        return b"This folder holds the images of one class.\nNothing to see here.\n", "txt"
    if kind == "zero-size-png":
        return _png_header(0, 16), "png"
    if kind == "corrupt-jpeg":
        data = bytearray(good)
        middle = len(data) // 2
        data[middle : middle + 64] = rng.bytes(64)
        return bytes(data), "jpg"
    raise ValueError(f"unknown bad file kind {kind!r}")


def _png_header(width: int, height: int) -> bytes:
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def make_sample_data(
    dest: str,
    layout: str = "imagefolder",
    classes: int = 10,
    per_class: int = 50,
    bad: int = 0,
    seed: int = 0,
    manifest_format: str = "jsonl",
) -> dict[str, Any]:
    """Write the collection under `dest` (any fsspec URL) and say what is in it."""
    if layout not in SAMPLE_LAYOUTS:
        raise SampleDataError(f"--layout must be one of {', '.join(SAMPLE_LAYOUTS)}, got {layout!r}")
    if manifest_format not in MANIFEST_FORMATS:
        raise SampleDataError(f"manifest format must be one of {', '.join(MANIFEST_FORMATS)}, got {manifest_format!r}")
    if classes < 1 or per_class < 1 or bad < 0:
        raise SampleDataError("--classes and --per-class must be at least 1, --bad at least 0")
    rng = np.random.default_rng(seed)
    names = class_names(layout, classes)
    kinds = Counter()
    # (class, file name, bytes, labels); bytes None: listed in the manifest but never written.
    files: list[tuple[int, str, bytes | None, list[int]]] = []
    for c in range(classes):
        for i in range(per_class):
            labels = [c]
            if layout == "manifest" and classes > 2 and i % 4 == 3:
                others = [o for o in range(classes) if o != c]
                labels += sorted(rng.choice(others, size=1 + i % 2, replace=False).tolist())
            kind = EXOTIC[(i // 10 + c) % len(EXOTIC)] if i % 10 == 9 else "jpeg"
            width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
            data, ext = encode(class_pattern(labels, classes, width, height, rng), kind)
            kinds[kind] += 1
            files.append((c, f"{names[c]}_{i:05d}.{ext}", data, labels))
    bad_kinds = [k for k in BAD_KINDS if k != "missing" or layout == "manifest"]
    for b in range(bad):
        kind = bad_kinds[b % len(bad_kinds)]
        c = b % classes
        data, ext = (None, "jpg") if kind == "missing" else bad_file(kind, rng)
        kinds[f"bad:{kind}"] += 1
        files.append((c, f"{names[c]}_bad{b:03d}.{ext}", data, [c]))

    dest = dest.rstrip("/")
    if layout == "imagefolder":
        _write_files(dest, {f"{names[c]}/{name}": data for c, name, data, _ in files})
    elif layout == "i21k-tars":
        _write_files(dest, {f"{names[c]}.tar": _tar([(n, d) for k, n, d, _ in files if k == c])
                            for c in range(classes)})
    else:
        _write_files(dest, {f"images/{name}": data for _, name, data, _ in files if data is not None})
        rows = [{"path": f"images/{name}", "labels": [names[i] for i in labels], "id": number,
                 "note": f"synthetic {'multi' if len(labels) > 1 else 'single'}-label image"}
                for number, (_, name, _, labels) in enumerate(files)]
        _write_files(dest, {f"manifest.{manifest_format}": _manifest(rows, manifest_format)})
    return {"dest": dest, "layout": layout, "classes": classes, "images": classes * per_class, "bad": bad,
            "kinds": dict(sorted(kinds.items()))}


def _write_files(dest: str, files: dict[str, bytes]) -> None:
    fs, root = storage.filesystem(dest)
    paths = {f"{root}/{name}": data for name, data in files.items()}
    for folder in sorted({p.rsplit("/", 1)[0] for p in paths}):
        fs.makedirs(folder, exist_ok=True)
    fs.pipe(paths)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _manifest(rows: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows).encode()
    if fmt == "csv":
        lines = ["path,labels,id,note"] + [
            f"{r['path']},{'|'.join(r['labels'])},{r['id']},{r['note']}" for r in rows
        ]
        return ("\n".join(lines) + "\n").encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()
