"""One bad sample must not end a run: the training stream skips it, fills its place by a fixed rule and reports it;
the trainer logs the skips (RUN/skipped.jsonl, `skipped_samples`) and stops only past data.max_skipped_fraction.

Unit tests build small datasets by hand (plain tars of `shard_format.encode_sample` members, with real sizes and
sha256 in dataset.json); the integration tests rot a copy of the `mixer prepare` sample dataset and train on it with
two Ray Train workers (a few rotten samples through a stop and resume: tests/test_resume.py, whose runs all train on
such a copy)."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config, data, storage
from pipeline.dataset_json import DatasetError, DatasetInfo, Shard, Split, save
from pipeline.dataset_json import load as load_dataset
from pipeline.metrics import read_records
from pipeline.shard_format import encode_sample, split_member
from pipeline.skips import TooManySkipsError
from tests.test_train import read_metrics, run_training, tiny_spec

SIZES = [12] * 8  # 96 samples, 4 streams of 24, 12 batches of 8: no tail dropped, every sample once per epoch
CLASSES = 3
KINDS = {  # what is wrong with a bad sample -> what its reported reason says
    "garbage": "not a JPEG or PNG image",
    "gif": "not a JPEG or PNG image",
    "bomb": "decompression bomb",
    "label": ".cls is not a decimal integer",
    "truncated": "cannot decode the image",
}


def _jpeg(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, (int(rng.integers(18, 26)), int(rng.integers(18, 26)), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buf, "GIF")
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels in a few dozen bytes: a decompression bomb as far as a reader can tell."""
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _members(s: int, i: int, kind: str | None) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng([s, i])  # per sample: a good sample's bytes do not depend on which others are bad
    key, label, image, ext = f"s{s:02d}-{i:03d}", int(rng.integers(0, CLASSES)), _jpeg(rng), "jpg"
    if kind == "garbage":
        image = b"\x00garbage" * 40
    elif kind == "gif":
        image = _gif()
    elif kind == "bomb":
        image, ext = png_header(100_000, 100_000), "png"
    elif kind == "truncated":
        image = image[:len(image) // 2]
    members = encode_sample(key, image, ext, [label], False, {"source": key})
    if kind == "label":
        members = [(name, b"x" if name.endswith(".cls") else payload) for name, payload in members]
    return members


def write_dataset(url: str, tmp: str, bad: dict[str, str]) -> DatasetInfo:
    """Shards of SIZES samples keyed s{shard}-{index}; `bad` maps keys to one of KINDS."""
    shards = []
    for s, count in enumerate(SIZES):
        local = os.path.join(tmp, f"train-{s:06d}.tar")
        with tarfile.open(local, "w") as tar:
            for i in range(count):
                for name, payload in _members(s, i, bad.get(f"s{s:02d}-{i:03d}")):
                    member = tarfile.TarInfo(name)
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
        with open(local, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        storage.put_file_atomic(local, storage.join(url, os.path.basename(local)))
        shards.append(Shard(os.path.basename(local), count, os.path.getsize(local), digest))
    info = DatasetInfo(url=url, classes=[f"c{i}" for i in range(CLASSES)], multi_label=False,
                       splits={"train": Split(shards), "val": Split(shards[:2])})
    save(info)
    return info


def config_(**overrides) -> data.StreamConfig:
    base = dict(split="train", seed=5, global_batch=8, streams=4, image_size=16, randaug_layers=2,
                randaug_magnitude=9, mixup=0.2)
    return data.StreamConfig(**{**base, **overrides})


def stream_keys(batches: list[data.Batch], stream: int, per_stream: int = 2) -> list[str]:
    """Stream `stream`'s keys by position, from single-rank batches."""
    return [k for b in batches for k in b.keys[stream * per_stream:(stream + 1) * per_stream]]


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory) -> tuple[DatasetInfo, dict[str, str]]:
    """Bad samples placed by the order of the clean dataset (which does not depend on the contents): the last two
    positions of stream 3 (nothing good after them in the epoch: the start of the stream fills them), two in a row
    in stream 0, the first position of stream 1, and a few more."""
    root = tmp_path_factory.mktemp("bad")
    clean = write_dataset(str(root / "clean"), str(tmp_path_factory.mktemp("tars")), {})
    stream = data.TrainStream(clean, config_(randaug_layers=0, mixup=0.0), 0, 1)
    epoch = [next(stream) for _ in range(stream.batches_per_epoch)]
    picks = stream_keys(epoch, 3)[-2:] + stream_keys(epoch, 0)[9:11] + stream_keys(epoch, 1)[:1]
    picks += [stream_keys(epoch, 2)[5], stream_keys(epoch, 1)[17]]
    bad = {key: kind for key, kind in zip(picks, [*KINDS, *KINDS], strict=False)}
    info = write_dataset(str(root / "rotten"), str(tmp_path_factory.mktemp("tars")), bad)
    return info, bad


@pytest.fixture(scope="module")
def reference(bad_dataset) -> list[data.Batch]:
    """Epoch 0 and two batches of epoch 1, read by one process."""
    info, _ = bad_dataset
    stream = data.TrainStream(info, config_(), 0, 1)
    return [next(stream) for _ in range(stream.batches_per_epoch + 2)]


def global_batches(info: DatasetInfo, cfg: data.StreamConfig, world_size: int, n: int,
                   state: dict | None = None) -> list[data.Batch]:
    streams = [data.TrainStream(info, cfg, r, world_size) for r in range(world_size)]
    for s in streams:
        if state is not None:
            s.load_state_dict(state)
    per_rank = [[next(s) for _ in range(n)] for s in streams]
    for s in streams:
        s.close()
    return [data.Batch(torch.cat([p[i].images for p in per_rank]), torch.cat([p[i].targets for p in per_rank]),
                       [k for p in per_rank for k in p[i].keys], [x for p in per_rank for x in p[i].skipped])
            for i in range(n)]


def assert_same(a: list[data.Batch], b: list[data.Batch]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.keys == y.keys, f"batch {i}: keys differ"
        assert x.skipped == y.skipped, f"batch {i}: skips differ"
        assert torch.equal(x.images, y.images), f"batch {i}: images differ"
        assert torch.equal(x.targets, y.targets), f"batch {i}: targets differ"


def test_bad_samples_are_skipped_replaced_and_reported(bad_dataset, reference):
    info, bad = bad_dataset
    epoch = reference[:12]
    assert all(len(b.keys) == 8 and b.images.shape == (8, 3, 16, 16) for b in reference)
    skipped = [s for b in epoch for s in b.skipped]
    assert sorted(s.key for s in skipped) == sorted(bad), "every bad sample is skipped once per epoch"
    assert not set(bad) & {k for b in reference for k in b.keys}
    for s in skipped:
        assert s.epoch == 0 and s.shard == info.shard_url(info.split("train").shards[int(s.key[1:3])])
        assert KINDS[bad[s.key]] in s.reason, (s.key, s.reason)
    # The rule: the next good position of the same stream, else the first good one from its start.
    for s in skipped:
        keys = stream_keys(epoch, s.stream)
        good = set(range(len(keys))) - {x.position for x in skipped if x.stream == s.stream}
        later = [p for p in sorted(good) if p > s.position]
        assert keys[s.position] == keys[later[0] if later else min(good)], s
    assert {s.position for s in skipped if s.stream == 3} >= {22, 23}, "the wrap-around case is covered"
    assert [s.epoch for b in reference[12:] for s in b.skipped] == [1] * sum(len(b.skipped) for b in reference[12:])


def test_batches_with_bad_samples_do_not_depend_on_world_size_or_loader_processes(bad_dataset, reference):
    info, _ = bad_dataset
    n = len(reference)
    assert_same(global_batches(info, config_(), 2, n), reference)
    assert_same(global_batches(info, config_(loader_workers=2), 1, n), reference)


@pytest.mark.parametrize("at", [4, 11])  # before stream 0's bad pair; the last batch (the wrap-around)
def test_a_stream_restored_mid_epoch_yields_the_same_batches(bad_dataset, reference, at):
    info, _ = bad_dataset
    first = data.TrainStream(info, config_(), 0, 1)
    for _ in range(at):
        next(first)
    state = first.state_dict()
    assert_same(global_batches(info, config_(), 1, 2, state), reference[at:at + 2])
    assert_same(global_batches(info, config_(loader_workers=2), 2, 1, state), reference[at:at + 1])


def _sample(image: bytes, problem: str | None = None) -> data._Sample:
    return data._Sample("k", image, (0,), "mem://shard.tar", problem)


def test_only_jpeg_and_png_within_the_pixel_limit_are_decoded(monkeypatch):
    rng = np.random.default_rng(0)
    cases = {
        "bomb": (png_header(100_000, 100_000), "refused as a decompression bomb"),
        "over our limit, under PIL's": (png_header(9000, 9000), "claims 9000x9000 pixels, over the limit"),
        "gif": (_gif(), "not a JPEG or PNG image"),
        "bmp": (_encoded("BMP"), "not a JPEG or PNG image"),
    }
    for name, (payload, reason) in cases.items():
        with pytest.raises(data.BadSampleError, match=reason) as e:
            data._image_size(_sample(payload))
        assert str(e.value).startswith("mem://shard.tar: sample 'k': "), name
    with pytest.raises(data.BadSampleError, match="labels .* outside"):
        data._image_size(_sample(b"", "labels [7] outside 0..2"))
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    for payload in (_jpeg(rng), _encoded("PNG")):  # the JPEG header is read by libjpeg-turbo, the PNG by PIL
        with pytest.raises(data.BadSampleError, match="over the limit of 100"):
            data._image_size(_sample(payload))


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (1, 2, 3)).save(buf, fmt)
    return buf.getvalue()


def test_eval_leaves_bad_samples_out(bad_dataset, caplog):
    info, bad = bad_dataset
    keys = [k for b in data.eval_batches(info, "train", 16, 5, 0, 1) for k in b.keys]
    expected = [f"s{s:02d}-{i:03d}" for s in range(len(SIZES)) for i in range(SIZES[s])]
    assert keys == [k for k in expected if k not in bad]
    assert any("left out of the evaluation" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------------------
# the trainer's side: RUN/skipped.jsonl and the stop rule, on a one-process gloo group


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _skip(position: int, shard: str = "mem://ds/a.tar") -> data.SkippedSample:
    return data.SkippedSample(f"k{position}", shard, "not a JPEG or PNG image", 0, 0, position)


def test_skip_log_writes_lines_and_stops_past_the_fraction(one_rank, tmp_path):
    from pipeline.skips import SkipLog

    run_url = str(tmp_path / "run")
    spec = config.from_dict({"data": {"dataset": "mem://ds", "streams": 4, "max_skipped_fraction": 0.1},
                             "batch": {"global": 8, "micro": 8}, "schedule": {"total_steps": 100},
                             "model": {"variant": "tiny", "image_size": 32}, "run": {"url": run_url}})
    log = SkipLog(spec, enabled=True, resume_step=0)
    # 3 skips in 16 samples is far over 0.1, but 0.1 x 16 allows fewer than 10: not judged yet.
    log.add(1, [_skip(0), _skip(1, "mem://ds/b.tar")])
    log.add(2, [_skip(2)])
    assert log.gather(2) == 3
    log.stop_if_over(None)
    lines = [json.loads(x) for x in storage.read_bytes(f"{run_url}/skipped.jsonl").decode().splitlines()]
    assert [(x["step"], x["key"], x["shard"]) for x in lines] == [(1, "k0", "mem://ds/a.tar"),
                                                                  (1, "k1", "mem://ds/b.tar"),
                                                                  (2, "k2", "mem://ds/a.tar")]
    assert lines[0]["reason"] == "not a JPEG or PNG image"
    # At step 13, 104 samples read allow 10.4: 11 skips stop the run.
    log.add(13, [_skip(p) for p in range(3, 11)])
    assert log.gather(13) == 11
    with pytest.raises(DatasetError) as e:
        log.stop_if_over(None)
    assert str(e.value) == (
        "11 of the 104 samples read by step 13 were skipped as unusable (fraction 0.1058, over "
        "data.max_skipped_fraction=0.1); most skips in a.tar (10), b.tar (1); each one and why: skipped.jsonl in the "
        "run folder. Check the dataset with `mixer verify mem://ds` and prepare it again, or raise "
        "data.max_skipped_fraction to train on")
    # A resume from step 1 keeps the lines up to it; steps 2.. run again and add theirs back.
    assert SkipLog(spec, enabled=True, resume_step=1).count == 2
    assert len(storage.read_bytes(f"{run_url}/skipped.jsonl").decode().splitlines()) == 2


def test_a_zero_fraction_stops_at_the_first_skip(one_rank, tmp_path):
    from pipeline.skips import SkipLog

    spec = config.from_dict({"data": {"dataset": "mem://ds", "streams": 4, "max_skipped_fraction": 0},
                             "batch": {"global": 8, "micro": 8}, "schedule": {"total_steps": 100},
                             "model": {"variant": "tiny", "image_size": 32}, "run": {"url": str(tmp_path / "r")}})
    log = SkipLog(spec, enabled=True, resume_step=0)
    assert log.gather(1) == 0
    log.stop_if_over(None)
    log.add(2, [_skip(0)])
    log.gather(2)
    with pytest.raises(DatasetError, match="1 of the 16 samples read by step 2"):
        log.stop_if_over(None)


def test_max_skipped_fraction_is_checked_and_left_out_of_the_run_identity():
    base = {"data": {"dataset": "s3://b/ds"}, "run": {"url": "s3://b/run"}, "schedule": {"total_steps": 10},
            "batch": {"global": 512, "micro": 64}}
    assert config.from_dict(base).data.max_skipped_fraction == 0.001
    for value in (1.0, -0.1):
        with pytest.raises(config.SpecError, match=r"data.max_skipped_fraction: .* is outside \[0, 1\)"):
            config.from_dict(base, [f"data.max_skipped_fraction={value}"])
    # Raising the threshold must let a run that stopped on it resume.
    assert config.from_dict(base, ["data.max_skipped_fraction=0.2"]).hash() == config.from_dict(base).hash()



# ---------------------------------------------------------------------------------------------------------------
# training on 2 Ray Train workers: a rotten copy of the sample dataset (16 train shards x 20, 8 streams, batch 32:
# 10 batches an epoch, none dropped). The runs of tests/test_resume.py train on one too (3 rotten samples): an
# unbroken run and one stopped and resumed skip, replace and log the same samples.

STEPS = 20  # two epochs


def rot(src: str, dst: str, tmp: str, fraction: float, seed: int) -> set[str]:
    """A copy of dataset `src` at `dst` in which about `fraction` of the train samples have garbage for image
    bytes (dataset.json updated: sizes and sha256 are right, the samples are not); returns their keys."""
    info = load_dataset(src)
    rng = np.random.default_rng(seed)
    rotten = set()
    for split_name, split in info.splits.items():
        for shard in split.shards:
            local = os.path.join(tmp, shard.name)
            with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(info.shard_url(shard)))) as source, \
                    tarfile.open(local, "w") as out:
                for member in source:
                    key, ext = split_member(member.name)
                    payload = source.extractfile(member).read()
                    if split_name == "train" and ext in ("jpg", "png") and rng.random() < fraction:
                        payload = b"\xff\xd8 not a jpeg" * 8
                        rotten.add(key)
                    member.size = len(payload)
                    out.addfile(member, io.BytesIO(payload))
            storage.put_file_atomic(local, storage.join(dst, shard.name))
            shard.bytes, shard.sha256 = storage.sha256_of(local)
    info.url = dst
    save(info)
    return rotten


def skip_lines(run_url: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(storage.join(run_url, "skipped.jsonl")).decode().splitlines()]


def test_a_rotten_dataset_stops_the_run_with_the_fraction_threshold_and_worst_shards(sample_dataset, ray_cluster,
                                                                                     tmp_path):
    ds = str(tmp_path / "ds")
    rot(sample_dataset, ds, str(tmp_path), 0.3, seed=2)
    url = str(tmp_path / "run")
    # 0.1 x 32 samples a step allows 10 skips from step 4 on: the run stops there, and for good: a restart from
    # the newest checkpoint would read the same samples, so the retries allowed are not spent on it.
    with pytest.raises(TooManySkipsError) as e:
        run_training(tiny_spec(ds, url, schedule__total_steps=STEPS, data__max_skipped_fraction=0.1,
                               cluster__max_failures=2))
    lines = skip_lines(url)
    train, _ = read_metrics(url)
    assert train[-1]["step"] == 4 and train[-1]["skipped_samples"] == len(lines)
    assert [r["step"] for r in read_records(url) if r["kind"] == "start"] == [0]
    # The driver raises the workers' own error with its whole message.
    fraction = f"{len(lines) / 128:.4g}"
    worst = collections.Counter(os.path.basename(line["shard"]) for line in lines).most_common(3)
    assert str(e.value) == (
        f"{len(lines)} of the 128 samples read by step 4 were skipped as unusable (fraction "
        f"{fraction}, over data.max_skipped_fraction=0.1); most skips in "
        f"{', '.join(f'{name} ({n})' for name, n in worst)}; each one and why: skipped.jsonl in the run folder. "
        f"Check the dataset with `mixer verify {ds}` and prepare it again, or raise data.max_skipped_fraction "
        "to train on")
