"""data.decode: gpu, run on a CPU device (the same code; only nvJPEG itself needs a GPU): each RandAugment operation
equals its OpenCV counterpart, and the stream keeps the CPU path's order, parameters, bad-sample rule and resume."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import augment, data, device_views
from pipeline.dataset_json import DatasetError
from tests.test_augment import picture
from tests.test_bad_samples import bad_dataset, config_  # noqa: F401  (a fixture, shared)

# Rounded the same way up to float32's order of operations: at most 1 apart, on a few pixels.
NEAR = {"color", "sharpness"}


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("magnitude", [9, 20, 30])
@pytest.mark.parametrize("op", augment.OPS)
def test_each_operation_is_its_opencv_counterpart(op, magnitude, negative):
    image = picture(seed=magnitude, size=56)
    want = augment._apply(image.copy(), op, magnitude, negative)
    batch = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].repeat(3, 1, 1, 1)
    got = device_views.apply(batch, op, magnitude, negative)
    assert got.dtype == torch.uint8 and got.shape == batch.shape
    for one in got:
        diff = np.abs(one.permute(1, 2, 0).numpy().astype(int) - want.astype(int))
        if op in NEAR:
            assert diff.max() <= 1 and (diff > 0).mean() < 0.03, (diff.max(), (diff > 0).mean())
        else:
            assert diff.max() == 0, (op, diff.max(), (diff > 0).mean())


def test_equalize_and_autocontrast_take_each_image_and_channel_alone():
    flat = np.full((20, 20, 3), 77, np.uint8)  # one level: left as it is
    mixed = picture(seed=3, size=20)
    batch = torch.from_numpy(np.stack([flat, mixed]).transpose(0, 3, 1, 2).copy())
    for op in ("equalize", "autocontrast"):
        got = device_views.apply(batch.clone(), op, 9, False)
        for one, image in zip(got, (flat, mixed), strict=True):
            assert np.array_equal(one.permute(1, 2, 0).numpy(), augment._apply(image.copy(), op, 9, False))


def test_a_batch_applies_each_images_own_operations_layer_by_layer():
    images = [picture(seed=s, size=32) for s in range(6)]
    ops = [tuple(augment.draw(2, random.Random(s))) for s in range(6)]
    batch = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    got = device_views.rand_augment(batch, ops, 15)
    for one, image, own in zip(got, images, ops, strict=True):
        want = augment.augment_planes(image.transpose(2, 0, 1).copy(), False, list(own), 15)
        diff = np.abs(one.numpy().astype(int) - want.astype(int))
        assert diff.max() <= (1 if NEAR & {op for op, _ in own} else 0)


def _streams(info, cfg, n: int, state: dict | None = None) -> list[data.Batch]:
    stream = data.TrainStream(info, cfg, 0, 1, torch.device("cpu"))
    if state is not None:
        stream.load_state_dict(state)
    batches = [next(stream) for _ in range(n)]
    stream.close()
    return batches


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_the_device_path_keeps_the_cpu_paths_order_parameters_and_bad_sample_rule(bad_dataset,  # noqa: F811
                                                                                   loader_workers, monkeypatch):
    """With the CPU path decoding at full scale too (it decodes large images at a reduced DCT scale, which the device
    does not), both make the same views: the same crop boxes, flips, operations and mixup, to a rounding step."""
    full_scale = data._decode
    monkeypatch.setattr(data, "_decode", lambda sample, min_height, min_width: full_scale(sample, 1 << 30, 1 << 30))
    info, bad = bad_dataset
    n = 12
    cpu = _streams(info, config_(loader_workers=loader_workers), n)
    gpu = _streams(info, config_(loader_workers=loader_workers, decode="gpu"), n)
    skipped = 0
    for a, b in zip(cpu, gpu, strict=True):
        assert a.keys == b.keys
        assert torch.equal(a.targets, b.targets)  # labels and mixup's lam
        assert [(s.key, s.shard, s.epoch, s.stream, s.position) for s in a.skipped] == \
            [(s.key, s.shard, s.epoch, s.stream, s.position) for s in b.skipped]
        skipped += len(b.skipped)
        assert b.images.dtype == torch.float32 and b.images.shape == a.images.shape
        diff = (a.images - b.images).abs()
        assert diff.max() <= 1 / 127.5 + 1e-5, diff.max()  # colour and sharpness: 1 apart on a few pixels
        assert (diff > 1e-5).float().mean() < 0.01
    assert skipped >= 4 and {s.key for b in gpu for s in b.skipped} <= set(bad)


def test_the_device_path_resumes_exactly(bad_dataset):  # noqa: F811
    info, _ = bad_dataset
    cfg = config_(decode="gpu")
    unbroken = _streams(info, cfg, 8)
    stream = data.TrainStream(info, cfg, 0, 1, torch.device("cpu"))
    for _ in range(5):
        next(stream)
    resumed = _streams(info, cfg, 3, stream.state_dict())
    for a, b in zip(unbroken[5:], resumed, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def _jpeg(size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(picture(size=size)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_pngs_and_cmyk_jpegs_are_cropped_on_the_cpu_and_cut_off_jpegs_refused():
    cfg = config_(decode="gpu")
    png, cmyk = io.BytesIO(), io.BytesIO()
    Image.fromarray(picture(size=24)).save(png, "PNG")
    Image.fromarray(picture(size=24)).convert("CMYK").save(cmyk, "JPEG")
    for payload in (png.getvalue(), cmyk.getvalue()):
        encoded = data._encoded_view(data._Sample("k", payload, (0,), "mem://ds/a.tar"), cfg, 7)
        assert encoded.jpeg is None and encoded.cropped.shape == (3, 16, 16)
    whole = data._encoded_view(data._Sample("k", _jpeg(), (0,), "mem://ds/a.tar"), cfg, 7)
    assert whole.jpeg is not None and whole.cropped is None
    appended = _jpeg() + b"\x00trailer written by a camera"  # after the end-of-image marker: still whole
    assert data._encoded_view(data._Sample("k", appended, (0,), "mem://ds/a.tar"), cfg, 7).jpeg == appended
    with pytest.raises(data.BadSampleError, match="cut off"):
        data._encoded_view(data._Sample("k", _jpeg()[:-40], (0,), "mem://ds/a.tar"), cfg, 7)


def test_a_jpeg_the_decoder_refuses_names_its_shard_and_key():
    """Damage past the header the loader reads (a progressive JPEG's later Huffman table): found only by the decode
    on the device, which then names the sample."""
    cfg = config_(decode="gpu", randaug_layers=0, mixup=0.0)
    good = data._encoded_view(data._Sample("good", _jpeg(), (0,), "mem://ds/a.tar"), cfg, 1)
    buf = io.BytesIO()
    Image.fromarray(picture(size=24)).save(buf, "JPEG", quality=90, progressive=True)
    payload = bytearray(buf.getvalue())
    table = payload.index(b"\xff\xc4", payload.index(b"\xff\xda"))  # a table after the first scan
    payload[table + 5:table + 21] = b"\xff" * 16  # its code counts now sum past 256
    broken = data._encoded_view(data._Sample("broken", bytes(payload), (0,), "mem://ds/b.tar"), cfg, 2)
    with pytest.raises(DatasetError, match=r"mem://ds/b.tar: sample 'broken': the JPEG decoder refused it "
                                           r"\(.*Bogus Huffman table"):
        device_views.make_batch([good, broken], 16, 0, [], 2, torch.device("cpu"))
    assert device_views.make_batch([good, good], 16, 0, [], 2, torch.device("cpu")).shape == (2, 3, 16, 16)
