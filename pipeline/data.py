"""The training data stream: a deterministic, resumable sequence of augmented batches read from a prepared dataset.

Order. The sequence of global batches is a pure function of (dataset, seed, epoch, global batch G, streams C); the
world size and the number of loader processes only decide who computes which part of it.

* Epoch e permutes the split's shards with rng(seed, e) and lays their samples end to end (tar order inside a shard).
  That sequence of N samples is cut into C streams of equal length L = N // C: stream c is positions [c*L, (c+1)*L).
  A shard that straddles a cut is read by both neighbouring streams, each taking its own part.
* A stream is a list of pieces (a shard, or the part of one that falls in the stream). Groups of `WINDOW` consecutive
  pieces form windows; samples are shuffled within a window with rng(seed, e, c, window).
* Global batch b is the concatenation over c = 0..C-1 of stream c's samples [b*G/C, (b+1)*G/C).
  batches_per_epoch = L // (G/C), the same for every epoch and rank; the tail of each stream (fewer than G/C samples)
  and the N mod C samples past the last cut are dropped, i.e. less than one global batch plus C samples per epoch.
  Which samples fall there changes with the shard permutation, so none is dropped for ever.
* Rank r of n owns the contiguous streams [r*C/n, (r+1)*C/n): the ranks' batches concatenated in rank order are the
  global batch. With m loader processes, process w of a rank owns a contiguous sub-block of the rank's streams and
  yields, per batch, one chunk with its streams' samples; the main process joins m consecutive chunks (DataLoader
  hands them out round robin) in process order. C must be divisible by n * max(m, 1), and G by C.

Pixels. Sample i of stream c in epoch e is augmented from its own seed, derived from (seed, e, c, i): inception crop
(RandomResizedCrop's sampling rule), horizontal flip, then RandAugment (pipeline/augment.py: torchvision v2's
operations and scales in OpenCV's kernels, drawn from a Random seeded per sample), then (x - 127.5) / 127.5. JPEGs are
decoded with libjpeg-turbo (simplejpeg) at the smallest DCT scale that still leaves the crop at least `image_size`
pixels, so large sources decode at a fraction of the cost.
Mixup (when > 0) mixes each stream's chunk of a batch with itself reversed, with lam ~ Beta(a, a) from
rng(seed, e, b, c); targets (one-hot or multi-hot) are mixed alike. The bits do not depend on where a sample is
computed (main or loader process, any number of torch threads). With `decode="gpu"` the loader processes draw the
same parameters (`draw_view`) and hand over the JPEG bytes; `TrainStream` makes the views on its device
(pipeline/device_views.py).

Bad samples. A sample whose members break the shard format, whose image header cannot be read, that is not a JPEG
or PNG, that has more than MAX_IMAGE_PIXELS pixels (a decompression bomb), or whose image does not decode, is
skipped and reported (`Batch.skipped`, a `SkippedSample` each) instead of ending the run. Its position i in stream c
is filled by the first sample of the same stream, at positions i+1, i+2, ... up to the end of the stream's epoch,
then 0, 1, ..., i-1, that decodes, augmented with position i's seed. The replacement depends only on the stream's
contents, never on where reading began or who reads, so batches keep their size and the order stays the same for
any world size, loader processes or resume point; a clean dataset gives the same bits as if no sample could fail.
Looking ahead may read the next window early, so a stream briefly holds two.

Memory. A stream holds one window of encoded samples at a time: a rank holds about C/n * WINDOW shards' bytes.

Resume. `state_dict()` is the position of the next batch (epoch, batch) with the order's identity (seed, streams,
global batch, split, dataset). Restoring skips whole windows by the sample counts in dataset.json without reading
them, and inside the first window reads only up to the samples still needed, decoding none of the others.

Evaluation (`eval_batches`): rank r reads shards r::n in order (uneven is fine), resize of the short side, centre
crop, no augmentation, every sample once; a bad sample is left out with a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import itertools
import json
import logging
import math
import os
import platform
import posixpath
import random
import struct
import tarfile
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import augment, storage
from pipeline.config import SpecError, check_stream_layout
from pipeline.dataset_json import DatasetError, DatasetInfo, Shard, Split
from pipeline.dataset_json import load as load_dataset
from pipeline.shard_format import decode_sample, split_member
from pipeline.views import Encoded, View

WINDOW = 4  # consecutive pieces of a stream shuffled together
ORDER_VERSION = 1  # bump when the order scheme changes: old stream states then refuse to load
# Bump when the augmentation's bits change; a run with RandAugment or mixup saved under another version refuses to
# resume.
# 2: RandAugment in OpenCV's kernels (pipeline/augment.py) instead of torchvision's v2.RandAugment; mixup fused
# into the float conversion (other rounding).
# 3: mixup's weighted sum in one pass of OpenCV's addWeighted (other float32 rounding).
AUGMENT_VERSION = 3
# Above this an image is refused unread: a few KB of PNG or JPEG can claim enough pixels to exhaust memory.
MAX_IMAGE_PIXELS = 8192 * 8192
_IMAGE_FORMATS = ["JPEG", "PNG"]  # what `mixer prepare` writes; PIL tries no other decoder on a shard's bytes

log = logging.getLogger("mixer.data")

# Domains of the derived seeds, so that e.g. a window's permutation and a sample's crop never share a seed.
_SHARDS, _WINDOW, _SAMPLE, _MIXUP = range(4)


@dataclass
class StreamConfig:
    split: str
    seed: int
    global_batch: int
    streams: int
    image_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    randaug_layers: int = 0
    randaug_magnitude: int = 0
    mixup: float = 0.0
    loader_workers: int = 0
    # "gpu": loader processes draw each view's parameters and ship the JPEG bytes; the trainer's device decodes and
    # augments them (pipeline/device_views.py). Same order, parameters and resume as "cpu".
    decode: str = "cpu"


@dataclass(frozen=True)
class SkippedSample:
    """A training sample that could not be used, and its place in the order (plain data: it crosses from a loader
    process with its chunk)."""

    key: str
    shard: str  # the shard's URL
    reason: str
    epoch: int
    stream: int
    position: int  # in the stream's epoch


class BadSampleError(DatasetError):
    """One sample that cannot be used (the training stream skips it); `reason` says why, without the place."""

    def __init__(self, sample: _Sample, reason: str):
        super().__init__(f"{sample.shard_url}: sample {sample.key!r}: {reason}")
        self.reason = reason


@dataclass
class Batch:
    images: torch.Tensor  # float32 [N, 3, H, W] in [-1, 1]
    targets: torch.Tensor  # float32 [N, K]: one-hot or multi-hot, mixed by mixup
    keys: list[str]
    skipped: list[SkippedSample] = field(default_factory=list)  # replaced in this batch, in stream order


@dataclass
class _Sample:
    key: str
    image: bytes
    labels: tuple[int, ...]
    shard_url: str
    problem: str | None = None  # members that break the shard format: the sample is skipped


@dataclass
class _Chunk:
    """What a loader process hands to the main process: uint8 images (4x less to copy than float), or with
    data.decode: gpu the encoded views."""

    images: torch.Tensor | None
    labels: list[tuple[int, ...]]
    keys: list[str]
    epoch: int = 0
    batch: int = 0
    first_stream: int = 0
    skipped: list[SkippedSample] = field(default_factory=list)
    encoded: list[Encoded] = field(default_factory=list)

    def pin_memory(self) -> _Chunk:
        """The DataLoader's pinning thread calls this (pin_memory=True, on a GPU): the copy to the device is then
        asynchronous."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def check_dataset(url: str) -> DatasetInfo:
    """Load and sanity-check `url/dataset.json`; raises DatasetError saying what to do."""
    info = load_dataset(url)
    if not info.splits:
        raise DatasetError(f"{info.url}/dataset.json lists no splits; prepare the dataset again with `mixer prepare`")
    if not info.classes:
        raise DatasetError(f"{info.url}/dataset.json lists no classes; prepare the dataset again with `mixer prepare`")
    for name, split in info.splits.items():
        if split.shards and split.samples == 0:
            raise DatasetError(f"{info.url}: split {name!r} has shards but no samples")
    return info


def check_shards_present(info: DatasetInfo, splits: Sequence[str | None]) -> None:
    """Every shard of the splits is in the store at the size dataset.json lists: one listing per folder, no
    shard read."""
    try:
        found = {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in storage.ls(info.url, detail=True)}
    except FileNotFoundError:
        found = {}
    problems = []
    for name in filter(None, splits):
        for shard in info.split(name).shards:
            size = found.get(shard.name)
            if size is None:
                problems.append(f"{shard.name} is missing")
            elif size != shard.bytes:
                problems.append(f"{shard.name} has {size} bytes, dataset.json lists {shard.bytes}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DatasetError(f"{info.url}: {'; '.join(problems[:3])}{more}; the dataset changed after preparation: "
                           "check it with `mixer verify`, or prepare it again")


def batches_per_epoch(samples: int, streams: int, global_batch: int) -> int:
    """Whole global batches in an epoch of `samples`: each of the streams holds samples // streams of them and
    gives global_batch // streams to every batch; the tails are dropped."""
    return samples // streams // (global_batch // streams)


def check_split(info: DatasetInfo, split_name: str, streams: int, global_batch: int) -> None:
    """What a training order needs of the dataset: every stream starts in its own shard, and an epoch holds at
    least one global batch. The spec-only rules are pipeline.config.check_stream_layout's."""
    split = info.split(split_name)
    if len(split.shards) < streams:
        raise DatasetError(
            f"{info.url}: split {split_name!r} has {len(split.shards)} shards, fewer than data.streams={streams}; "
            "prepare the dataset with a smaller --shard-size or lower data.streams"
        )
    if split.samples < global_batch:
        raise DatasetError(f"{info.url}: split {split_name!r} has {split.samples} samples, fewer than one global "
                           f"batch of {global_batch}; lower batch.global or use a larger dataset")


# ---------------------------------------------------------------------------------------------------------------
# seeds


def _seed_sequence(*key: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([k % 2**64 for k in key])


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(_seed_sequence(*key))


def _seed(*key: int) -> int:
    return int(_seed_sequence(*key).generate_state(1, np.uint64)[0]) >> 1


# ---------------------------------------------------------------------------------------------------------------
# the order


@dataclass(frozen=True)
class _Piece:
    shard: int  # index into the split's shard list
    start: int  # first sample (tar order) of the shard in this piece
    stop: int


@dataclass(frozen=True)
class _Window:
    pieces: list[_Piece]
    order: np.ndarray  # permutation of the window's samples (indices in piece order)


def _stream_windows(split: Split, seed: int, epoch: int, stream: int, start: int, length: int) -> list[_Window]:
    """Stream `stream` of epoch `epoch`: positions [start, start + length) of the epoch's shard sequence."""
    perm = _rng(_SHARDS, seed, epoch).permutation(len(split.shards))
    ends = np.cumsum([split.shards[i].samples for i in perm])
    pieces = []
    pos, stop = start, start + length
    k = int(np.searchsorted(ends, pos, side="right"))
    while pos < stop:
        shard_begin = int(ends[k]) - split.shards[perm[k]].samples
        piece_end = min(int(ends[k]), stop)
        if piece_end > pos:  # an empty shard adds no piece
            pieces.append(_Piece(int(perm[k]), pos - shard_begin, piece_end - shard_begin))
        pos, k = piece_end, k + 1
    windows = []
    for w in range(0, len(pieces), WINDOW):
        group = pieces[w:w + WINDOW]
        n = sum(p.stop - p.start for p in group)
        windows.append(_Window(group, _rng(_WINDOW, seed, epoch, stream, w // WINDOW).permutation(n)))
    return windows


def _stream_samples(info: DatasetInfo, split: Split, windows: list[_Window], skip: int) -> Iterator[_Sample]:
    """The stream's samples in order, from position `skip` on. Windows before it are not read at all."""
    pos = 0
    for window in windows:
        n = len(window.order)
        if pos + n <= skip:
            pos += n
            continue
        needed = window.order[max(0, skip - pos):]
        loaded = _load_window(info, split, window.pieces, set(needed.tolist()))
        for i in needed.tolist():
            yield loaded.pop(i)
        pos += n


def _load_window(info: DatasetInfo, split: Split, pieces: list[_Piece], wanted: set[int]) -> dict[int, _Sample]:
    """The wanted samples of a window (indices in piece order), read shard by shard; others are skipped unread."""
    loaded: dict[int, _Sample] = {}
    base = 0
    for p in pieces:
        in_piece = sorted(i - base + p.start for i in wanted if base <= i < base + p.stop - p.start)
        if in_piece:
            shard = split.shards[p.shard]
            for index, sample in _read_shard(info, shard, set(in_piece), in_piece[-1] + 1):
                loaded[base + index - p.start] = sample
        base += p.stop - p.start
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# reading shards

VERIFY_MODES = ("off", "warn", "fail")
# The mode travels in the environment, so that loader processes (forked or spawned) read shards the same way.
VERIFY_ENV = "MIXER_DATA_VERIFY"
_warned_digests: set[str] = set()  # shards whose mismatch this process has reported (`warn`: once per shard)


def set_verify(mode: str) -> None:
    """How a shard read to its end is checked against dataset.json's sha256 (`data.verify`), for this process and
    the loader processes it starts later: `fail` raises DatasetError, `warn` logs once per shard, `off` skips the
    hash."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"data.verify: {mode!r} is not one of {', '.join(VERIFY_MODES)}")
    os.environ[VERIFY_ENV] = mode


def _verify_mode() -> str:
    mode = os.environ.get(VERIFY_ENV, "fail")
    return mode if mode in VERIFY_MODES else "fail"


def _check_digest(f: storage.ResilientReader, shard: Shard, url: str, mode: str) -> None:
    """Called once the tar stream has ended: hash what tarfile left unread (the end-of-archive padding) and compare
    the whole file's sha256 with dataset.json's."""
    if f.digest is None:
        return
    while f.read(1 << 20):  # ends at the object's end
        pass
    digest = f.digest.hexdigest()
    if digest == shard.sha256:
        return
    message = (f"{url}: the sha256 of the {f.offset} bytes read is {digest[:16]}..., dataset.json lists "
               f"{shard.sha256[:16]}... ({shard.bytes} bytes); the shard changed after preparation: check the "
               "dataset with `mixer verify` and prepare it again")
    if mode == "fail":
        raise DatasetError(f"{message} (or set data.verify: warn to train on)")
    if url not in _warned_digests:
        _warned_digests.add(url)
        log.warning(message)


def _read_shard(info: DatasetInfo, shard: Shard, wanted: set[int] | None, stop: int) -> Iterator[tuple[int, _Sample]]:
    """Samples [0, stop) of a shard that are in `wanted` (None: all), streamed through fsspec. Members of other
    samples are passed over without being extracted; reading ends at `stop`.

    The shard is read once, front to back, through a `storage.ResilientReader`: a brief store fault re-opens it
    where the read stopped, so the tar stream goes on. The reader hashes the bytes as they pass; when the tar stream
    reaches its end, the sha256 is compared with dataset.json's (`data.verify`, see `set_verify`) before the last
    sample is handed out. A read that stops early (`stop` before the shard's last sample, as a resume inside a
    window or a stream's cut does) has not seen every byte and is not checked, nor is a shard without a recorded
    digest. Samples before the end are handed out before the check can run: a mismatch stops the run (`fail`), it
    cannot take back the samples already used."""
    url = info.shard_url(shard)
    mode = _verify_mode()
    index, key, files = -1, None, {}
    try:
        with storage.ResilientReader(url, sha256=mode != "off" and bool(shard.sha256)) as f, \
                tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                named = split_member(member.name) if member.isfile() else None
                if named is None:
                    continue
                name, ext = named
                if name != key:
                    if key is not None and (wanted is None or index in wanted):
                        yield index, _make_sample(url, key, files, info)
                    index, key, files = index + 1, name, {}
                    if index >= stop:
                        return
                if wanted is None or index in wanted:
                    files[ext] = tar.extractfile(member).read()
            _check_digest(f, shard, url, mode)
    except (tarfile.TarError, OSError) as e:
        raise DatasetError(f"{url}: cannot read the shard ({e}); check the dataset with `mixer verify`") from e
    if key is not None and (wanted is None or index in wanted):
        yield index, _make_sample(url, key, files, info)
    if index + 1 < min(stop, shard.samples):
        raise DatasetError(
            f"{url}: holds {index + 1} samples but dataset.json lists {shard.samples}; the shard changed after "
            "preparation: check the dataset with `mixer verify` or prepare it again"
        )


def _make_sample(url: str, key: str, files: dict[str, bytes], info: DatasetInfo) -> _Sample:
    try:
        image, labels = decode_sample(url, key, files, info.multi_label, info.num_classes)
    except DatasetError as e:
        # Not raised here: a malformed sample is skipped and reported where it is used, like an undecodable image.
        return _Sample(key, b"", (), url, problem=str(e).removeprefix(f"{url}: sample {key!r}: "))
    return _Sample(key, image, labels, url)


# ---------------------------------------------------------------------------------------------------------------
# decoding and augmentation


# What PIL raises on damaged JPEG or PNG bytes (its plugins are not uniform); anything else is a bug of ours.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
# JPEGs the device's decoder (nvJPEG through torchvision) takes; CMYK and others are cropped on the CPU.
_DEVICE_COLORSPACES = ("Gray", "YCbCr", "RGB")
_JPEG_SCAN, _JPEG_END = b"\xff\xda", b"\xff\xd9"


def _check_pixels(sample: _Sample, h: int, w: int) -> None:
    if h * w > MAX_IMAGE_PIXELS:
        raise BadSampleError(sample, f"the image claims {w}x{h} pixels, over the limit of {MAX_IMAGE_PIXELS} "
                                     "(a decompression bomb, or a shard `mixer prepare` did not write)")


def _open_image(sample: _Sample) -> Image.Image:
    """PIL's lazy open (the header only) of a JPEG or PNG within the pixel limit."""
    try:
        with warnings.catch_warnings():
            # PIL's own, higher limit: past it PIL warns, past twice it raises; both mean the same to us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(sample.image), formats=_IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSampleError(sample, f"refused as a decompression bomb ({e})") from e
    except UnidentifiedImageError as e:  # its message names a BytesIO object: no text the same on every reader
        raise BadSampleError(sample, "not a JPEG or PNG image, or its header is damaged") from e
    except _PIL_ERRORS as e:
        raise BadSampleError(sample, f"cannot read the image header ({e})") from e
    _check_pixels(sample, image.height, image.width)
    return image


def _header(sample: _Sample) -> tuple[int, int, bool]:
    """(height, width, whether libjpeg-turbo reads it) from the header alone; BadSampleError for a sample that
    cannot be used."""
    if sample.problem is not None:
        raise BadSampleError(sample, sample.problem)
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(sample.image)
    except ValueError:
        image = _open_image(sample)
        return image.height, image.width, False
    _check_pixels(sample, h, w)
    return h, w, colorspace in _DEVICE_COLORSPACES


def _image_size(sample: _Sample) -> tuple[int, int]:
    """(height, width) from the header alone; BadSampleError for a sample that cannot be used."""
    h, w, _ = _header(sample)
    return h, w


def _decode(sample: _Sample, min_height: int, min_width: int) -> torch.Tensor:
    """uint8 [3, h, w], a view of HWC memory (the layout the uint8 resize kernels are fastest on). JPEGs decode at
    the smallest DCT scale that keeps at least min_height x min_width; other formats at full size."""
    try:
        array = simplejpeg.decode_jpeg(sample.image, colorspace="RGB", min_height=min_height, min_width=min_width)
    except ValueError:
        # Not only PNGs: PIL also takes JPEGs libjpeg-turbo refuses in strict mode (CMYK, extraneous bytes).
        image = _open_image(sample)
        try:
            array = np.array(image.convert("RGB"))
        except _PIL_ERRORS as e:
            raise BadSampleError(sample, f"cannot decode the image ({e})") from e
    return torch.from_numpy(array).permute(2, 0, 1)


# Where torchvision resizes uint8 with its own kernel; elsewhere it goes through float32 and rounds (other bits).
_NATIVE_UINT8_RESIZE = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                        or platform.machine() in ("aarch64", "arm64"))


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [3, h, w] -> [3, height, width], antialiased bilinear: torchvision v2's `resize` to the bit, the same
    kernel chosen the same way, without importing torchvision (2.4 s of CPU in every trainer process's start)."""
    c, h, w = image.shape
    if (h, w) == (height, width):
        return image
    batch = image.reshape(-1, c, h, w)
    if batch.is_contiguous(memory_format=torch.channels_last) and batch.numel() != batch.stride(0):
        # A [1, C, H, W] view of HWC memory whose batch stride does not say so: torch would allocate the output
        # contiguous and repack it; restrided, the output stays channels-last (torchvision does the same).
        batch = batch.as_strided(batch.shape, (batch.numel(),) + batch.stride()[1:])
    if _NATIVE_UINT8_RESIZE:
        out = torch.nn.functional.interpolate(batch, size=[height, width], mode="bilinear", align_corners=False,
                                              antialias=True)
    else:
        out = torch.nn.functional.interpolate(batch.float(), size=[height, width], mode="bilinear",
                                              align_corners=False, antialias=True).round_().to(torch.uint8)
    return out[0]


def _crop_box(h: int, w: int, scale: tuple[float, float], rnd: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's rule (area fraction in `scale`, aspect ratio log-uniform in [3/4, 4/3], ten tries, then
    a centre crop), drawn from `rnd`."""
    area = h * w
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rnd.uniform(*scale)
        aspect = math.exp(rnd.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rnd.random() * (h - ch + 1)), int(rnd.random() * (w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < 3 / 4:
        cw, ch = w, round(w / (3 / 4))
    elif ratio > 4 / 3:
        ch, cw = h, round(h * (4 / 3))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def draw_view(h: int, w: int, cfg: StreamConfig, seed: int) -> View:
    """The view of an h x w image with this per-sample seed: crop box, flip, then RandAugment's operations from a
    seed of their own."""
    rnd = random.Random(seed)
    top, left, ch, cw = _crop_box(h, w, cfg.crop_scale, rnd)
    flip = rnd.random() < 0.5
    aug_seed = rnd.getrandbits(63)
    ops = tuple(augment.draw(cfg.randaug_layers, random.Random(aug_seed))) if cfg.randaug_layers > 0 else ()
    return View(h, w, top, left, ch, cw, cfg.flip and flip, ops)


def _crop(sample: _Sample, view: View, size: int) -> torch.Tensor:
    """The view's box resized to size x size, uint8 [3, size, size], not yet flipped or augmented."""
    h, w = view.height, view.width
    top, left, ch, cw = view.top, view.left, view.crop_height, view.crop_width
    image = _decode(sample, math.ceil(size * h / ch), math.ceil(size * w / cw))
    dh, dw = image.shape[1:]
    if (dh, dw) != (h, w):  # decoded at a reduced scale: the same box in its coordinates
        top, left = min(round(top * dh / h), dh - 1), min(round(left * dw / w), dw - 1)
        ch, cw = max(1, min(dh - top, round(ch * dh / h))), max(1, min(dw - left, round(cw * dw / w)))
    return resize(image[:, top:top + ch, left:left + cw], size, size)


def _train_image(sample: _Sample, cfg: StreamConfig, seed: int) -> torch.Tensor:
    h, w = _image_size(sample)
    view = draw_view(h, w, cfg, seed)
    image = _crop(sample, view, cfg.image_size)
    if cfg.randaug_layers > 0:
        return torch.from_numpy(augment.augment_planes(image.contiguous().numpy(), view.flip, view.ops,
                                                       cfg.randaug_magnitude))
    if view.flip:
        image = image.flip(-1)
    return image.contiguous()


def _encoded_view(sample: _Sample, cfg: StreamConfig, seed: int) -> Encoded:
    """data.decode: gpu: the view's parameters, drawn as `_train_image` draws them, and what the device needs."""
    h, w, device_reads = _header(sample)
    view = draw_view(h, w, cfg, seed)
    if device_reads:
        # The device decodes whole batches and cannot skip one sample, so the commonest damage, a cut-off file
        # (which the CPU path's decode refuses), is refused here: no end-of-image marker after the scan starts (in
        # the entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker). Bytes appended after
        # the marker, as some cameras write, are fine. See device_views for the rest.
        scan = sample.image.find(_JPEG_SCAN)
        if scan < 0 or sample.image.find(_JPEG_END, scan) < 0:
            raise BadSampleError(sample, "the JPEG is cut off (no end-of-image marker after its scan)")
        return Encoded(view, sample.key, sample.shard_url, jpeg=sample.image)
    return Encoded(view, sample.key, sample.shard_url, cropped=_crop(sample, view, cfg.image_size).contiguous())


def _eval_image(sample: _Sample, image_size: int, short_side: int) -> torch.Tensor:
    h, w = _image_size(sample)
    image = _decode(sample, math.ceil(short_side * h / min(h, w)), math.ceil(short_side * w / min(h, w)))
    h, w = image.shape[1:]
    short, long = min(h, w), max(h, w)
    # torchvision's rule for a short-side resize: the long side rounded down.
    h, w = (short_side, int(short_side * long / short)) if h <= w else (int(short_side * long / short), short_side)
    image = resize(image, h, w)
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    return image[:, top:top + image_size, left:left + image_size].contiguous()


def _to_float(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """uint8 chunks -> one float32 batch of (x - 127.5) / 127.5. Done in numpy: one thread whatever torch's setting,
    and its allocator reuses memory where torch's would fault in fresh pages for every batch."""
    out = np.empty((sum(len(c) for c in chunks), *chunks[0].shape[1:]), dtype=np.float32)
    start = 0
    for c in chunks:
        out[start:start + len(c)] = c.numpy()
        start += len(c)
    out -= 127.5
    out /= 127.5
    return torch.from_numpy(out)


def to_float(views: torch.Tensor) -> torch.Tensor:
    """A uint8 batch as the model takes it: float32 in [-1, 1]."""
    return _to_float([views])


def shard_labels(info: DatasetInfo, shard: Shard) -> list[tuple[int, ...]]:
    """Each sample's labels, in shard order; the images are not decoded."""
    return [sample.labels for _, sample in _read_shard(info, shard, None, shard.samples)]


def eval_views(info: DatasetInfo, shard: Shard, wanted: set[int] | None, image_size: int,
               resize: int | None = None) -> Iterator[tuple[int, _Sample, torch.Tensor]]:
    """(position in the shard, sample, uint8 view) of the `wanted` samples of a shard (None: all), in shard order,
    resized and centre-cropped for evaluation; an unusable sample is left out with a warning."""
    if wanted is not None and not wanted:
        return
    resize = resize or round(image_size * 8 / 7)
    for index, sample in _read_shard(info, shard, wanted, shard.samples if wanted is None else max(wanted) + 1):
        try:
            view = _eval_image(sample, image_size, resize)
        except BadSampleError as e:
            log.warning("%s; left out of the evaluation", e)
            continue
        yield index, sample, view


def _mixed_float(chunks: Sequence[torch.Tensor], lams: list[float], per_stream: int) -> torch.Tensor:
    """Mixup fused into the float conversion: each stream's run of `per_stream` uint8 images x mixed with itself
    reversed, lam * x + (1 - lam) * x[::-1], scaled to [-1, 1]: one pass of OpenCV's addWeighted an image (float32
    out), then the clip."""
    x = np.concatenate([c.numpy() for c in chunks]) if len(chunks) > 1 else chunks[0].numpy()
    out = np.empty(x.shape, dtype=np.float32)
    rows = x.shape[1] * x.shape[2] if x.ndim == 4 else x.shape[1]
    for j, lam in enumerate(lams):
        for i in range(per_stream):
            a, b = j * per_stream + i, (j + 1) * per_stream - 1 - i
            cv2.addWeighted(x[a].reshape(rows, -1), lam / 127.5, x[b].reshape(rows, -1), (1 - lam) / 127.5, -1.0,
                            dst=out[a].reshape(rows, -1), dtype=cv2.CV_32F)
    np.clip(out, -1.0, 1.0, out=out)
    return torch.from_numpy(out)


def _on_device(chunks: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The chunks' uint8 images in one tensor on `device`, copied chunk by chunk (asynchronous from pinned memory)."""
    out = torch.empty((sum(len(c) for c in chunks), *chunks[0].shape[1:]), dtype=torch.uint8, device=device)
    start = 0
    for c in chunks:
        out[start:start + len(c)].copy_(c, non_blocking=True)
        start += len(c)
    return out


def _targets(labels: Sequence[tuple[int, ...]], num_classes: int) -> torch.Tensor:
    targets = torch.zeros(len(labels), num_classes)
    rows = [i for i, ls in enumerate(labels) for _ in ls]
    cols = [label for ls in labels for label in ls]
    targets[rows, cols] = 1.0
    return targets


# ---------------------------------------------------------------------------------------------------------------
# training stream


class _StreamCursor:
    """Stream `stream` of epoch `epoch` read position by position from `start`, bad samples replaced by the rule
    of the module docstring."""

    def __init__(self, info: DatasetInfo, cfg: StreamConfig, epoch: int, stream: int, start: int):
        split = info.split(cfg.split)
        self.length = batches_per_epoch(split.samples, cfg.streams, cfg.global_batch) * (cfg.global_batch //
                                                                                         cfg.streams)
        self.windows = _stream_windows(split, cfg.seed, epoch, stream, stream * (split.samples // cfg.streams),
                                       self.length)
        self.info, self.split, self.cfg, self.epoch, self.stream = info, split, cfg, epoch, stream
        self.position = start
        self._source = _stream_samples(info, split, self.windows, start)
        self._ahead: deque[_Sample] = deque()  # read past `position` while looking for a replacement

    def take(self) -> tuple[torch.Tensor | Encoded, _Sample, SkippedSample | None]:
        """The next position's image (data.decode: gpu, its encoded view), the sample it shows, and the bad sample
        that was there (None if good)."""
        i, sample = self.position, self._ahead.popleft() if self._ahead else next(self._source)
        self.position += 1
        seed = _seed(_SAMPLE, self.cfg.seed, self.epoch, self.stream, i)
        make = _encoded_view if self.cfg.decode == "gpu" else _train_image
        try:
            return make(sample, self.cfg, seed), sample, None
        except BadSampleError as e:
            skipped = SkippedSample(sample.key, sample.shard_url, e.reason, self.epoch, self.stream, i)
        for candidate in self._replacements(i):
            try:
                return make(candidate, self.cfg, seed), candidate, skipped
            except BadSampleError:
                continue
        raise DatasetError(f"{self.info.url}: no sample of stream {self.stream} in epoch {self.epoch} can be used "
                           f"(the first: {skipped.shard}: {skipped.key!r}: {skipped.reason}); check the dataset "
                           f"with `mixer verify {self.info.url}` and prepare it again")

    def _replacements(self, i: int) -> Iterator[_Sample]:
        """The stream's samples after position i, then those before it. The ones after stay queued for their own
        positions; the ones before are read again (rare: only for bad samples near the end of the epoch)."""
        for k in itertools.count():
            if k == len(self._ahead):
                if i + 1 + k >= self.length:
                    break
                self._ahead.append(next(self._source))
            yield self._ahead[k]
        yield from itertools.islice(_stream_samples(self.info, self.split, self.windows, 0), i)


def _produce_train(info: DatasetInfo, cfg: StreamConfig, streams: range, epoch: int,
                   batch: int) -> Iterator[_Chunk]:
    """Chunks of `streams` (a contiguous block) for every batch from (epoch, batch) on, forever."""
    per_stream = cfg.global_batch // cfg.streams
    batches = batches_per_epoch(info.split(cfg.split).samples, cfg.streams, cfg.global_batch)
    while True:
        cursors = [_StreamCursor(info, cfg, epoch, c, batch * per_stream) for c in streams]
        for b in range(batch, batches):
            images, samples, skipped = [], [], []
            for cursor in cursors:
                for _ in range(per_stream):
                    image, sample, bad = cursor.take()
                    images.append(image)
                    samples.append(sample)
                    if bad is not None:
                        skipped.append(bad)
            on_device = cfg.decode == "gpu"
            yield _Chunk(None if on_device else torch.stack(images), [s.labels for s in samples],
                         [s.key for s in samples], epoch, b, streams.start, skipped, images if on_device else [])
        epoch, batch = epoch + 1, 0


def _block(streams: range, part: int, parts: int) -> range:
    size = len(streams) // parts
    return range(streams.start + part * size, streams.start + (part + 1) * size)


class _TrainSource(IterableDataset):
    """A rank's streams for a DataLoader: loader process w produces the w-th sub-block."""

    def __init__(self, info: DatasetInfo, cfg: StreamConfig, streams: range, epoch: int, batch: int):
        self.info, self.cfg, self.streams, self.epoch, self.batch = info, cfg, streams, epoch, batch

    def __iter__(self) -> Iterator[_Chunk]:
        worker = get_worker_info()
        part, parts = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return _produce_train(self.info, self.cfg, _block(self.streams, part, parts), self.epoch, self.batch)


def _dataset_fingerprint(split: Split) -> str:
    text = json.dumps([[s.name, s.samples] for s in split.shards])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def keep_freed_image_buffers() -> None:
    """Have glibc's malloc keep freed blocks of up to 16 MiB for reuse. By default it hands every block above its
    mmap threshold (128 KiB at first) back to the system when freed, so each image-sized buffer of the pipeline (a
    decoded JPEG, a 224x224 crop, each augmentation's output) is mapped and page-faulted in afresh, which cost
    4-6x the work done on it. Inherited by the loader processes, which fork from this one. Elsewhere than glibc:
    nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 16 << 20)
    libc.mallopt(m_trim_threshold, 64 << 20)


class TrainStream:
    """This rank's share of the global batch sequence, epoch after epoch, resumable with state_dict()."""

    def __init__(self, info: DatasetInfo, cfg: StreamConfig, rank: int, world_size: int,
                 device: torch.device | None = None):
        """`device`: where data.decode: gpu makes the views (the trainer's device); the batch's images are on it."""
        keep_freed_image_buffers()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of size {world_size}")
        check_stream_layout(cfg.streams, cfg.global_batch, world_size, cfg.loader_workers)
        check_split(info, cfg.split, cfg.streams, cfg.global_batch)
        split = info.split(cfg.split)
        self.batches_per_epoch = batches_per_epoch(split.samples, cfg.streams, cfg.global_batch)
        self.info, self.cfg, self.device = info, cfg, device or torch.device("cpu")
        per_rank = cfg.streams // world_size
        self.streams = range(rank * per_rank, (rank + 1) * per_rank)
        self.epoch, self.batch = 0, 0
        self._fingerprint = _dataset_fingerprint(split)
        self._source: Iterator[_Chunk] | None = None

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        if self._source is None:
            self._source = self._open()
        parts = max(self.cfg.loader_workers, 1)
        chunks = [next(self._source) for _ in range(parts)]
        for part, chunk in enumerate(chunks):
            expected = (self.epoch, self.batch, _block(self.streams, part, parts).start)
            if (chunk.epoch, chunk.batch, chunk.first_stream) != expected:
                raise RuntimeError(f"data stream out of order: got (epoch, batch, stream) "
                                   f"{(chunk.epoch, chunk.batch, chunk.first_stream)}, expected {expected}")
        batch = self._assemble(chunks)
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return batch

    def _open(self) -> Iterator[_Chunk]:
        if not self.cfg.loader_workers:
            return _produce_train(self.info, self.cfg, self.streams, self.epoch, self.batch)
        source = _TrainSource(self.info, self.cfg, self.streams, self.epoch, self.batch)
        # An own generator: the DataLoader would otherwise draw its base seed from the trainer's global RNG.
        loader = DataLoader(source, batch_size=None, num_workers=self.cfg.loader_workers,
                            generator=torch.Generator().manual_seed(0), pin_memory=self.device.type == "cuda")
        return iter(loader)

    def _assemble(self, chunks: list[_Chunk]) -> Batch:
        # Imported here: it needs torchvision (nvJPEG), whose import the CPU path's processes need not pay.
        from pipeline import device_views

        labels = [label for c in chunks for label in c.labels]
        targets = _targets(labels, self.info.num_classes)
        per_stream = self.cfg.global_batch // self.cfg.streams
        lams = [float(_rng(_MIXUP, self.cfg.seed, self.epoch, self.batch, c).beta(self.cfg.mixup, self.cfg.mixup))
                for c in self.streams] if self.cfg.mixup > 0 else []
        if self.cfg.decode == "gpu":
            images = device_views.make_batch([e for c in chunks for e in c.encoded], self.cfg.image_size,
                                             self.cfg.randaug_magnitude, lams, per_stream, self.device)
        elif self.device.type != "cpu":
            # uint8 over the bus (4x less than float) and the conversion there: on the trainer's CPU it costs about
            # 0.5 ms an image, a whole step's time at B/16's batch on one GPU.
            images = device_views.to_float(_on_device([c.images for c in chunks], self.device), lams, per_stream)
        elif lams:
            images = _mixed_float([c.images for c in chunks], lams, per_stream)
        else:
            images = _to_float([c.images for c in chunks])
        if lams:
            for j, lam in enumerate(lams):
                rows = slice(j * per_stream, (j + 1) * per_stream)
                part = targets[rows]
                targets[rows] = part * lam + part.flip(0) * (1 - lam)
        return Batch(images, targets, [k for c in chunks for k in c.keys], [s for c in chunks for s in c.skipped])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position. The order's identity must match: a different seed, number of streams,
        global batch or dataset would give another sequence, so the saved position would mean nothing."""
        mine = self._identity()
        if "augment" in mine and state.get("augment") != mine["augment"]:
            raise SpecError(f"data stream state: saved with augmentation version {state.get('augment', 1)}, this "
                            f"release draws version {mine['augment']} (other bits for the same seed), so the resumed "
                            "run would not continue the saved one exactly; finish the run with the release that "
                            "started it, or start a new run")
        for name, value in mine.items():
            if state.get(name) != value:
                raise SpecError(
                    f"data stream state: {name} was {state.get(name)!r} when saved, now {value!r}; the saved "
                    "position belongs to another sample order (seed, data.streams, batch.global, the split and "
                    "the dataset must stay fixed for the life of a run)"
                )
        if not 0 <= state["batch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise SpecError(f"data stream state: position (epoch {state['epoch']}, batch {state['batch']}) is "
                            f"outside the {self.batches_per_epoch} batches of an epoch")
        self.close()
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def close(self) -> None:
        """Stop the loader processes (they also stop when the stream is garbage collected)."""
        source, self._source = self._source, None
        shutdown = getattr(source, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _identity(self) -> dict[str, Any]:
        identity = {"order": ORDER_VERSION, "seed": self.cfg.seed, "streams": self.cfg.streams,
                    "global_batch": self.cfg.global_batch, "split": self.cfg.split, "dataset": self._fingerprint}
        if self.cfg.randaug_layers > 0 or self.cfg.mixup > 0:
            identity["augment"] = AUGMENT_VERSION
        return identity


# ---------------------------------------------------------------------------------------------------------------
# evaluation


def _produce_eval(info: DatasetInfo, shards: list[Shard], image_size: int, resize: int,
                  batch_size: int) -> Iterator[_Chunk]:
    images, labels, keys = [], [], []
    for shard in shards:
        for _, sample, view in eval_views(info, shard, None, image_size, resize):
            images.append(view)
            labels.append(sample.labels)
            keys.append(sample.key)
            if len(images) == batch_size:
                yield _Chunk(torch.stack(images), labels, keys)
                images, labels, keys = [], [], []
    if images:
        yield _Chunk(torch.stack(images), labels, keys)


class _EvalSource(IterableDataset):
    """A rank's eval shards for a DataLoader: loader process w reads every m-th of them."""

    def __init__(self, info: DatasetInfo, shards: list[Shard], image_size: int, resize: int, batch_size: int):
        self.info, self.shards, self.image_size, self.resize, self.batch_size = (info, shards, image_size, resize,
                                                                                 batch_size)

    def __iter__(self) -> Iterator[_Chunk]:
        worker = get_worker_info()
        part, parts = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        return _produce_eval(self.info, self.shards[part::parts], self.image_size, self.resize, self.batch_size)


def eval_batches(info: DatasetInfo, split: str, image_size: int, batch_size: int, rank: int, world_size: int,
                 resize: int | None = None, loader_workers: int = 0) -> Iterator[Batch]:
    """Every sample of `split` once, in a fixed order: rank r reads shards r::n (loader process w of them w::m);
    short side resized to `resize` (default image_size * 8 / 7), centre crop, no augmentation."""
    shards = info.split(split).shards[rank::world_size]
    resize = resize or round(image_size * 8 / 7)
    if loader_workers:
        source = _EvalSource(info, shards, image_size, resize, batch_size)
        chunks: Iterator[_Chunk] = iter(DataLoader(source, batch_size=None, num_workers=loader_workers,
                                                   generator=torch.Generator().manual_seed(0)))
    else:
        chunks = _produce_eval(info, shards, image_size, resize, batch_size)
    for chunk in chunks:
        yield Batch(_to_float([chunk.images]), _targets(chunk.labels, info.num_classes), chunk.keys)
