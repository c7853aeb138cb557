"""De-duplication against reference sets (`mixer prepare --dedup-against`): the paper leaves out of pretraining the
images that are near-copies of its downstream test images, or every transfer number is inflated.

The fingerprint is a perceptual hash of the DCT kind (pHash): the image in grey, squashed to 64x64, its 2-D DCT,
and one bit per low frequency, set where the coefficient is above their median. Coarse: the 8x8 lowest frequencies
(63 bits without the mean); fine: the 16x16 lowest (255 bits). Resizing, re-encoding down to JPEG quality 30, small
changes of colour, brightness or contrast and changes of format hardly move the low frequencies; a crop does (it
shifts and rescales them all), so each reference image is hashed under 81 crops (0, 5 and 10% off each side) and a
copy cropped by up to 10% of a side lands within 2.5% of one of them. An input is a near-duplicate of the reference
whose crops come nearest when the coarse hashes differ in at most COARSE_MAX bits and the fine ones in at most
FINE_MAX (of 255): on generated photographs copies came within 44 and distinct images no nearer than 86.

The index is built once by Ray tasks (a task per reference shard or per FILES_PER_TASK files), put in the object
store and read by every shard task. A lookup compares the input with every crop of every reference: about
0.4 ms per 1,000 reference images (64-bit XOR and popcount over 81 hashes each, then 255 bits over the few that
pass), so reference sets of tens of thousands of images (the paper's: downstream test splits) cost little next to
decoding; beyond that, an approximate index (faiss's binary indexes) would be the next step.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray
import simplejpeg
from PIL import Image

from data_prep.images import Rejected
from pipeline import storage
from pipeline.errors import MixerError

SIDE = 64
CROPS = (0.0, 0.05, 0.10)
COARSE_MAX = 14
FINE_MAX = 64
FILES_PER_TASK = 256
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# The 16 lowest rows of the DCT-II matrix: only the 16x16 lowest frequencies are ever used.
_DCT = np.cos(np.pi * (2 * np.arange(SIDE)[None, :] + 1) * np.arange(16)[:, None] / (2 * SIDE))


class DedupError(MixerError):
    """A reference set that cannot be read; the message names it and what to do."""


@dataclass
class Index:
    """Every crop's hashes of every reference image: row r is a crop of image `owner[r]`."""

    names: list[str]  # the reference images, as "<set URL>/<name in the set>"
    sets: list[str]  # the reference sets' URLs
    set_of: np.ndarray  # int32, per image: its set
    coarse: np.ndarray  # uint64, per crop
    fine: np.ndarray  # uint64 x 4, per crop
    owner: np.ndarray  # int32, per crop: its image

    def digest(self) -> str:
        h = hashlib.sha256("\n".join(self.names).encode())
        for array in (self.set_of, self.coarse, self.fine, self.owner):
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class Match:
    name: str
    set: str
    distance: int


# ---------------------------------------------------------------------------------------------------------------
# fingerprints


def _grey(data: bytes, at_least: int) -> Image.Image:
    """The image in grey, decoded at a reduced scale where the format allows (JPEG: the DCT scaling)."""
    try:
        im = Image.open(io.BytesIO(data))
        im.draft("L", (at_least, at_least))
        return im.convert("L")
    except Exception as e:  # PIL raises many kinds for a damaged file
        raise Rejected("undecodable", f"{type(e).__name__}: {e}") from e


def _bits(grey: Image.Image) -> tuple[np.uint64, np.ndarray]:
    pixels = np.asarray(grey.resize((SIDE, SIDE), Image.Resampling.BOX), dtype=np.float64)
    dct = _DCT @ pixels @ _DCT.T
    out = []
    for side in (8, 16):
        low = dct[:side, :side].reshape(-1)[1:]  # without the mean, which brightness moves
        median = np.partition(low, len(low) // 2)[len(low) // 2]  # an odd count: np.median's value, 6x sooner
        out.append(np.packbits(np.append(low > median, False)))
    return out[0].view(">u8")[0].astype(np.uint64), out[1].view(">u8").astype(np.uint64)


def fingerprint(data: bytes) -> tuple[np.uint64, np.ndarray]:
    """(coarse, fine) hashes of an image file's bytes. A sample's own JPEG, decoded again at a quarter of its scale
    or less, costs less than greying and shrinking the pixels it was encoded from."""
    grey = _jpeg_grey(data)
    return _bits(Image.fromarray(grey) if grey is not None else _grey(data, SIDE))


def _jpeg_grey(data: bytes) -> np.ndarray | None:
    """The pixels `_grey(data, SIDE)` gives for a JPEG, from libjpeg-turbo through simplejpeg in three quarters of
    the time: the scale PIL's draft mode picks (1/8, 1/4, 1/2 or 1: the largest that keeps both sides at least
    SIDE), the same IDCT. None where simplejpeg cannot read the file, or it is under 8 pixels on a side (libjpeg's
    7/8 scale would give the full size there)."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        if min(width, height) < 8:
            return None
        scale = next((s for s in (8, 4, 2) if min(width, height) // SIDE >= s), 1)
        grey = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_width=-(-width // scale),
                                      min_height=-(-height // scale))
    except Exception:  # simplejpeg's errors are of several kinds; PIL's path reads or rejects the file
        return None
    return grey[:, :, 0]


def _crops(grey: Image.Image) -> Iterator[Image.Image]:
    w, h = grey.size
    for left, top, right, bottom in itertools.product(CROPS, repeat=4):
        yield grey.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))


def reference_fingerprints(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The (coarse, fine) hashes of each of the 81 crops of a reference image."""
    hashes = [_bits(crop) for crop in _crops(_grey(data, 2 * SIDE))]
    return np.array([c for c, _ in hashes], dtype=np.uint64), np.stack([f for _, f in hashes])


# ---------------------------------------------------------------------------------------------------------------
# the index


def _units(url: str) -> list[tuple[str, list[str]]]:
    """A reference set's work, as (kind, names): a prepared dataset's shards, or chunks of a folder's image files."""
    url = url.rstrip("/")
    if storage.exists(storage.join(url, "dataset.json")):
        from pipeline.dataset_json import load

        info = load(url)
        return [("shard", [shard.name]) for split in info.splits.values() for shard in split.shards]
    fs, root = storage.filesystem(url)
    try:
        found = sorted(fs.find(root))
    except FileNotFoundError:
        found = []
    names = [posixpath.relpath(p, root.rstrip("/")) for p in found if p.lower().endswith(IMAGE_EXTS)]
    if not names:
        raise DedupError(f"--dedup-against {url}: neither a prepared dataset (no dataset.json) nor a folder holding "
                         f"images ({', '.join(IMAGE_EXTS)})")
    return [("files", names[i:i + FILES_PER_TASK]) for i in range(0, len(names), FILES_PER_TASK)]


def _unit_images(url: str, kind: str, names: list[str]) -> Iterator[tuple[str, bytes]]:
    if kind == "files":
        for name in names:
            yield name, storage.read_bytes(storage.join(url, name))
        return
    import tarfile

    from pipeline.shard_format import split_member

    with storage.ResilientReader(storage.join(url, names[0])) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            named = split_member(member.name) if member.isfile() else None
            if named and named[1] in ("jpg", "jpeg", "png", "webp"):
                yield f"{names[0].removesuffix('.tar')}/{named[0]}", tar.extractfile(member).read()


def _hash_unit(url: str, kind: str, names: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(image names, coarse [n, 81], fine [n, 81, 4], unreadable images) of one unit of a reference set."""
    kept, coarse, fine, bad = [], [], [], []
    for name, data in _unit_images(url, kind, names):
        try:
            c, f = reference_fingerprints(data)
        except Rejected as r:
            bad.append(f"{name}: {r.detail}")
            continue
        kept.append(name)
        coarse.append(c)
        fine.append(f)
    empty = (np.zeros((0, len(CROPS) ** 4), np.uint64), np.zeros((0, len(CROPS) ** 4, 4), np.uint64))
    return (kept, np.stack(coarse) if kept else empty[0], np.stack(fine) if kept else empty[1], bad)


def build_index(urls: list[str]) -> tuple[Index, list[str]]:
    """Hash every image of the reference sets with Ray tasks (Ray must be up); (the index, unreadable images)."""
    task = ray.remote(_hash_unit).options(num_cpus=1)
    names, set_of, coarse, fine, bad = [], [], [], [], []
    for number, url in enumerate(u.rstrip("/") for u in urls):
        for kept, c, f, unreadable in ray.get([task.remote(url, kind, unit) for kind, unit in _units(url)]):
            names += [f"{url}/{name}" for name in kept]
            set_of += [number] * len(kept)
            coarse.append(c)
            fine.append(f)
            bad += [f"{url}/{b}" for b in unreadable]
    if not names:
        raise DedupError(f"--dedup-against {' '.join(urls)}: no readable reference image")
    crops = len(CROPS) ** 4
    index = Index(names, [u.rstrip("/") for u in urls], np.array(set_of, np.int32),
                  np.concatenate(coarse).reshape(-1), np.concatenate(fine).reshape(-1, 4),
                  np.repeat(np.arange(len(names), dtype=np.int32), crops))
    return index, bad


def nearest(index: Index, data: bytes) -> Match | None:
    """The reference image `data` (an image file's bytes) is a near-duplicate of, if any."""
    coarse, fine = fingerprint(data)
    candidates = np.flatnonzero(np.bitwise_count(index.coarse ^ coarse) <= COARSE_MAX)
    if not len(candidates):
        return None
    distances = np.bitwise_count(index.fine[candidates] ^ fine).sum(axis=1)
    best = int(np.argmin(distances))
    if distances[best] > FINE_MAX:
        return None
    image = int(index.owner[candidates[best]])
    return Match(index.names[image], index.sets[int(index.set_of[image])], int(distances[best]))
