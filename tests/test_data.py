"""The training data stream: the same global batches whatever the world size and loader processes, exact resume,
s3:// reads, evaluation order, and clear errors."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data, storage
from pipeline.config import SpecError
from pipeline.dataset_json import DatasetError, DatasetInfo, Shard, Split, save

SHARD_SIZES = [14, 11, 13, 12, 15, 10, 13, 12, 14, 11, 13, 12]  # 150 samples, uneven on purpose
NUM_CLASSES = 5


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 4, y * 5, (x + y) * 3], -1) + rng.integers(0, 256, 3)
    pixels = (base + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    tar.addfile(member, io.BytesIO(payload))


def write_dataset(url: str, sizes: list[int], tmp: str, multi_label: bool = False, seed: int = 0) -> DatasetInfo:
    """Shards of small JPEGs with .cls (or .json labels) written through fsspec, then dataset.json."""
    rng = np.random.default_rng(seed)
    shards = []
    for s, count in enumerate(sizes):
        local = os.path.join(tmp, f"train-{s:06d}.tar")
        with tarfile.open(local, "w") as tar:
            for i in range(count):
                key = f"s{s:02d}-{i:03d}"
                _add(tar, f"{key}.jpg", _jpeg(rng, int(rng.integers(40, 56)), int(rng.integers(40, 64))))
                if multi_label:
                    labels = sorted(set(rng.integers(0, NUM_CLASSES, 2).tolist()))
                    _add(tar, f"{key}.json", json.dumps({"labels": labels}).encode())
                else:
                    _add(tar, f"{key}.cls", str(int(rng.integers(0, NUM_CLASSES))).encode())
        name = os.path.basename(local)
        storage.put_file_atomic(local, storage.join(url, name))
        shards.append(Shard(name, count, *storage.sha256_of(local)))
    half = len(shards) // 2
    info = DatasetInfo(url=url, classes=[f"c{i}" for i in range(NUM_CLASSES)], multi_label=multi_label,
                       splits={"train": Split(shards), "val": Split(shards[:half])})
    save(info)
    return info


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> DatasetInfo:
    root = tmp_path_factory.mktemp("ds")
    return write_dataset(str(root / "ds"), SHARD_SIZES, str(tmp_path_factory.mktemp("tars")))


def config(**overrides) -> data.StreamConfig:
    base = dict(split="train", seed=3, global_batch=16, streams=4, image_size=32, randaug_layers=2,
                randaug_magnitude=9, mixup=0.2)
    return data.StreamConfig(**{**base, **overrides})


def take(stream: data.TrainStream, n: int) -> list[data.Batch]:
    return [next(stream) for _ in range(n)]


def global_batches(info: DatasetInfo, cfg: data.StreamConfig, world_size: int, n: int) -> list[data.Batch]:
    """Read n batches on every rank and concatenate them in rank order."""
    streams = [data.TrainStream(info, cfg, r, world_size) for r in range(world_size)]
    per_rank = [take(s, n) for s in streams]
    for s in streams:
        s.close()
    return [data.Batch(torch.cat([p[i].images for p in per_rank]), torch.cat([p[i].targets for p in per_rank]),
                       [k for p in per_rank for k in p[i].keys]) for i in range(n)]


def assert_same(a: list[data.Batch], b: list[data.Batch]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys == y.keys, f"batch {i}: keys differ"
        assert torch.equal(x.images, y.images), f"batch {i}: images differ"
        assert torch.equal(x.targets, y.targets), f"batch {i}: targets differ"


@pytest.fixture(scope="module")
def reference(dataset: DatasetInfo) -> list[data.Batch]:
    """One epoch and two batches read by a single process: the sequence everyone else must reproduce."""
    stream = data.TrainStream(dataset, config(), 0, 1)
    return take(stream, stream.batches_per_epoch + 2)


def test_batches_do_not_depend_on_world_size_or_loader_processes(dataset, reference):
    n = len(reference)  # crosses the epoch boundary
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the reference ran on one thread, as loader processes do
    try:
        assert_same(global_batches(dataset, config(), 2, n), reference)
    finally:
        torch.set_num_threads(threads)
    assert_same(global_batches(dataset, config(loader_workers=2), 1, n), reference)
    assert_same(global_batches(dataset, config(loader_workers=2), 2, n), reference)


def test_epoch_shape_and_contents(dataset, reference):
    cfg = config()
    per_rank = [data.TrainStream(dataset, cfg, r, 4) for r in range(4)]
    assert len({s.batches_per_epoch for s in per_rank}) == 1
    bpe = per_rank[0].batches_per_epoch
    # 150 samples in 4 streams of 37, 9 chunks of 4 per stream: 144 used, 6 dropped.
    assert bpe == 150 // 4 // 4 == 9
    assert all(len(b.keys) == 4 for b in take(per_rank[1], 2))

    epoch0 = [k for b in reference[:bpe] for k in b.keys]
    assert len(epoch0) == len(set(epoch0)) == bpe * cfg.global_batch
    epoch1 = [k for b in reference[bpe:] for k in b.keys]
    assert epoch1 != epoch0[:len(epoch1)]
    for b in reference:
        assert b.images.shape == (16, 3, 32, 32) and b.images.dtype == torch.float32
        assert b.images.min() >= -1 and b.images.max() <= 1
        assert b.targets.shape == (16, NUM_CLASSES)
        assert torch.allclose(b.targets.sum(1), torch.ones(16))
    assert any(((b.targets > 0) & (b.targets < 1)).any() for b in reference), "mixup mixed no target"


def test_unmixed_targets_are_the_labels(dataset):
    stream = data.TrainStream(dataset, config(mixup=0.0, randaug_layers=0), 0, 1)
    batch = next(stream)
    labels = {}
    for shard in dataset.split("train").shards:
        with tarfile.open(dataset.shard_url(shard)) as tar:
            for m in tar:
                if m.name.endswith(".cls"):
                    labels[m.name[:-4]] = int(tar.extractfile(m).read())
    assert batch.targets.sum(1).eq(1).all()
    assert batch.targets.argmax(1).tolist() == [labels[k] for k in batch.keys]


@pytest.mark.parametrize("at", [3, 8, 9])  # mid-epoch, the last batch of an epoch, the first of the next
def test_resume_yields_what_an_unbroken_stream_yields(dataset, reference, at):
    first = data.TrainStream(dataset, config(), 0, 1)
    take(first, at)
    state = first.state_dict()
    restored = data.TrainStream(dataset, config(), 0, 1)
    restored.load_state_dict(state)
    assert_same(take(restored, 2), reference[at:at + 2])


def test_resume_on_another_world_size_with_loader_processes(dataset, reference):
    first = data.TrainStream(dataset, config(), 0, 1)
    take(first, 5)
    state = first.state_dict()
    streams = [data.TrainStream(dataset, config(loader_workers=2), r, 2) for r in range(2)]
    for s in streams:
        s.load_state_dict(state)
    parts = [take(s, 2) for s in streams]
    for s in streams:
        s.close()
    for i in range(2):
        assert parts[0][i].keys + parts[1][i].keys == reference[5 + i].keys
        assert torch.equal(torch.cat([parts[0][i].images, parts[1][i].images]), reference[5 + i].images)


def test_resume_skips_shards_and_samples_it_does_not_need(dataset, monkeypatch):
    monkeypatch.setattr(data, "WINDOW", 1)  # one shard per window, so whole shards lie before the position
    cfg = config(streams=2, global_batch=8)
    opened, decoded = [], []
    read_shard, decode = data._read_shard, data._decode
    monkeypatch.setattr(data, "_read_shard", lambda info, shard, *a: opened.append(shard.name) or read_shard(
        info, shard, *a))
    monkeypatch.setattr(data, "_decode", lambda sample, *a: decoded.append(sample.key) or decode(sample, *a))
    fresh = data.TrainStream(dataset, cfg, 0, 1)
    bpe = fresh.batches_per_epoch
    fresh.load_state_dict({**fresh.state_dict(), "batch": bpe - 1})
    batch = next(fresh)
    assert decoded == batch.keys, "only the samples of the batch are decoded"
    # Each of the 2 streams needs only the window(s) holding its last 4 samples: at most 2 shards each.
    assert len(opened) <= 4 < len(SHARD_SIZES)


def test_state_from_another_order_is_refused(dataset):
    state = data.TrainStream(dataset, config(), 0, 1).state_dict()
    with pytest.raises(SpecError, match="streams was 4 when saved, now 2"):
        data.TrainStream(dataset, config(streams=2), 0, 1).load_state_dict(state)
    with pytest.raises(SpecError, match="seed was 3 when saved, now 4"):
        data.TrainStream(dataset, config(seed=4), 0, 1).load_state_dict(state)
    with pytest.raises(SpecError, match=r"position \(epoch 0, batch 9\) is outside the 9 batches"):
        data.TrainStream(dataset, config(), 0, 1).load_state_dict({**state, "batch": 9})
    older = {k: v for k, v in state.items() if k != "augment"}  # saved before RandAugment moved to OpenCV
    with pytest.raises(SpecError, match=f"saved with augmentation version 1, this release draws version "
                                        f"{data.AUGMENT_VERSION}"):
        data.TrainStream(dataset, config(), 0, 1).load_state_dict(older)
    plain = config(randaug_layers=0, mixup=0.0)  # crop and flip only: the same bits as before
    data.TrainStream(dataset, plain, 0, 1).load_state_dict(older)


def test_s3_reads_the_same_batches_as_local(dataset, bucket, tmp_path, reference):
    remote = write_dataset(f"{bucket}/ds", SHARD_SIZES, str(tmp_path))
    info = data.check_dataset(remote.url)
    assert_same(take(data.TrainStream(info, config(), 0, 1), 2), reference[:2])
    # Loader processes forked after this process has talked to the bucket open their own connections.
    assert_same(global_batches(info, config(loader_workers=2), 1, 2), reference[:2])
    local_eval = list(data.eval_batches(dataset, "val", 32, 16, 0, 1))
    assert_same(list(data.eval_batches(info, "val", 32, 16, 0, 1)), local_eval)


def test_eval_reads_every_sample_once_in_a_fixed_order(dataset):
    val = dataset.split("val")
    by_rank = [list(data.eval_batches(dataset, "val", 32, 8, r, 2)) for r in range(2)]
    keys = [k for batches in by_rank for b in batches for k in b.keys]
    assert len(keys) == len(set(keys)) == val.samples
    first_keys = [b.keys[0] for b in by_rank[1]]
    assert first_keys[0].startswith("s01-"), "rank 1 starts at its first shard (shards 1::2)"
    for b in by_rank[0]:
        assert b.images.shape[1:] == (3, 32, 32) and b.images.min() >= -1 and b.images.max() <= 1
        assert b.targets.sum(1).eq(1).all()
    with_workers = list(data.eval_batches(dataset, "val", 32, 8, 0, 2, loader_workers=2))
    again = list(data.eval_batches(dataset, "val", 32, 8, 0, 2, loader_workers=2))
    assert_same(with_workers, again)
    ours = {k: img for b in with_workers for k, img in zip(b.keys, b.images, strict=True)}
    ref = {k: img for b in by_rank[0] for k, img in zip(b.keys, b.images, strict=True)}
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


def test_multi_label_targets_are_multi_hot(tmp_path):
    info = write_dataset(str(tmp_path / "ml"), [6, 6], str(tmp_path), multi_label=True)
    labels = {}
    for shard in info.split("train").shards:
        with tarfile.open(info.shard_url(shard)) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    labels[m.name[:-5]] = json.loads(tar.extractfile(m).read())["labels"]
    batch = next(data.TrainStream(info, config(streams=2, global_batch=4, mixup=0.0), 0, 1))
    for key, row in zip(batch.keys, batch.targets, strict=True):
        assert row.nonzero().flatten().tolist() == labels[key]


def _picture(h: int, w: int, fmt: str) -> tuple[bytes, torch.Tensor]:
    y, x = np.mgrid[0:h, 0:w]
    # Smooth on purpose: cropping at a reduced scale rounds the box to the coarser pixel grid, a shift under one
    # output pixel that only sharp edges would show; a wrong box moves these ramps by many levels.
    pixels = np.stack([x * 255 // w, y * 255 // h, 127 + 100 * np.sin((x + y) / 200)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, quality=95)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return buf.getvalue(), torch.from_numpy(decoded.copy()).permute(2, 0, 1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decoding_at_a_reduced_scale_keeps_the_crop(fmt, monkeypatch):
    """A large JPEG decodes at a fraction of its size when the crop allows it; the picture must stay the crop a
    full-size decode gives (a misplaced box would differ by far more than the resampling does)."""
    from torchvision.transforms.v2 import functional as F

    payload, full = _picture(480, 640, fmt)
    sample = data._Sample("k", payload, (0,), "test://shard.tar")
    cfg = config(image_size=48, randaug_layers=0, crop_scale=(0.5, 1.0))
    decoded_heights = []
    decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: decoded_heights.append(decode(*a).shape[1]) or decode(*a))
    for seed in range(6):
        rnd = __import__("random").Random(seed)
        top, left, h, w = data._crop_box(480, 640, cfg.crop_scale, rnd)
        expected = F.resized_crop(full, top, left, h, w, [48, 48], antialias=True)
        if rnd.random() < 0.5:
            expected = expected.flip(-1)
        got = data._train_image(sample, cfg, seed)
        assert got.shape == (3, 48, 48) and got.dtype == torch.uint8
        assert (got.float() - expected.float()).abs().mean() < 3, f"seed {seed}"
        if fmt == "PNG":  # decoded at full size: torchvision's crop to the bit
            assert torch.equal(got, expected), f"seed {seed}"
    evaluated = data._eval_image(sample, 48, 55)
    expected = F.center_crop(F.resize(full, 55, antialias=True), [48, 48])
    assert (evaluated.float() - expected.float()).abs().mean() < 3
    if fmt == "PNG":
        assert torch.equal(evaluated, expected)
    if fmt == "JPEG":
        assert max(decoded_heights) <= 240, "large crops of a JPEG decode at a reduced DCT scale"
    else:
        assert set(decoded_heights) == {480}


@pytest.mark.parametrize("native", [True, False])
def test_resize_is_torchvisions_to_the_bit(native, monkeypatch):
    """The loader resizes without torchvision (whose import costs every trainer process 2.4 s) and must give its
    bytes, or the crops, and every run's augmentation with them, change: both of torchvision's kernels (uint8 on
    AVX2/AVX512 and Arm, float32 and rounding elsewhere), on HWC views and on plain tensors, up and down."""
    from torchvision.transforms.v2 import functional as F

    monkeypatch.setattr(data, "_NATIVE_UINT8_RESIZE", native)
    import torchvision.transforms.v2.functional._geometry as geometry

    monkeypatch.setattr(geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: native)
    rng = np.random.default_rng(0)
    for h, w, out_h, out_w in [(97, 131, 48, 48), (300, 200, 224, 224), (40, 60, 55, 82), (256, 341, 256, 341)]:
        hwc = torch.from_numpy(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for image in (hwc.permute(2, 0, 1), hwc.permute(2, 0, 1).contiguous(), hwc.permute(2, 0, 1)[:, 3:, 5:]):
            expected = F.resize(image, [out_h, out_w], antialias=True)
            got = data.resize(image, out_h, out_w)
            assert got.shape == expected.shape and torch.equal(got, expected), (h, w, out_h, out_w, image.stride())


def test_missing_dataset_json_names_the_url_and_prepare(tmp_path):
    url = str(tmp_path / "nothing-here")
    with pytest.raises(DatasetError) as e:
        data.check_dataset(url)
    assert url in str(e.value) and "mixer prepare" in str(e.value)


def test_too_few_shards_for_the_streams(dataset):
    with pytest.raises(DatasetError, match=r"12 shards.*data.streams=16.*--shard-size"):
        data.TrainStream(dataset, config(streams=16), 0, 1)


def test_the_stream_layout_is_the_specs_rule_and_the_split_size_the_datasets(dataset):
    with pytest.raises(SpecError, match=r"batch.global=16 is not divisible by data.streams=3"):
        data.TrainStream(dataset, config(streams=3), 0, 1)
    with pytest.raises(SpecError, match=r"data.streams=4 is not divisible by cluster.workers x .* = 8 x 1 = 8"):
        data.TrainStream(dataset, config(), 0, 8)
    with pytest.raises(SpecError, match=r"= 2 x 4 = 8"):
        data.TrainStream(dataset, config(loader_workers=4), 0, 2)
    data.check_split(dataset, "train", 12, 150)  # a stream per shard, one global batch: just enough
    with pytest.raises(DatasetError, match=r"12 shards, fewer than data.streams=13"):
        data.check_split(dataset, "train", 13, 13)
    with pytest.raises(DatasetError, match=r"150 samples, fewer than one global batch of 152"):
        data.check_split(dataset, "train", 4, 152)
    with pytest.raises(DatasetError, match=r"no split 'test'"):
        data.check_split(dataset, "test", 4, 16)


def test_mixup_mixes_each_streams_run_with_itself_reversed_on_either_path():
    """lam * x + (1 - lam) * x reversed within each stream's run, scaled to [-1, 1]: the loader's (numpy and OpenCV)
    and the device's (torch) conversion, against the formula in float64."""
    from pipeline import device_views

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 3, 8, 10), dtype=np.uint8)
    lams, per_stream = [0.3, 0.9, 0.55], 4
    runs = x.reshape(3, 4, 3, 8, 10).astype(np.float64)
    lam = np.repeat(lams, 4)[:, None, None, None]
    want = (lam * runs.reshape(x.shape) + (1 - lam) * runs[:, ::-1].reshape(x.shape)) / 127.5 - 1
    chunks = [torch.from_numpy(x[:4]), torch.from_numpy(x[4:])]  # two loader processes' chunks
    for got in (data._mixed_float(chunks, lams, per_stream),
                device_views.to_float(torch.from_numpy(x), lams, per_stream)):
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert np.abs(got.numpy() - want).max() < 1e-6
        assert got.min() >= -1 and got.max() <= 1
