"""The shard sample format (pipeline.shard_format) pinned byte for byte, read back by the stock webdataset library,
and its one label rule applied alike by the training reader and by `mixer verify`."""

from __future__ import annotations

import base64
import io
import tarfile

import pytest
import webdataset as wds

from data_prep.images import ImagePolicy
from data_prep.plan import ShardPlan
from data_prep.shard import make_shard
from data_prep.sources import Item
from data_prep.verify import verify
from pipeline import data, dataset_json, storage
from pipeline.dataset_json import DatasetInfo, Shard, Split
from pipeline.shard_format import decode_sample, encode_sample, metadata_json, split_member

# A 12x10 RGB JPEG: small and plain enough that prep keeps its bytes, so everything written below is fixed.
TINY_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1RV19iZ2hnPk1xeXBk"
    "eFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2P/wAARCAAKAAwD"
    "ASIAAhEBAxEB/8QAFAABAAAAAAAAAAAAAAAAAAAABf/EAB4QAAECBwEAAAAAAAAAAAAAAAEAIQIDBAUSIpEx/8QAFQEBAQAAAAAAAAAAAAAAAAAA"
    "AgP/xAAZEQACAwEAAAAAAAAAAAAAAAAAAwECBBL/2gAMAwEAAhEDEQA/AB6Oz+apiVZ9Bqk6OEMw4mJUIwDDinRkhwbmcn//2Q=="
)
CLASSES = ["cat", "dog", "eel"]
# What the writer puts in a shard of two samples, member by member, and the sha256 of the whole tar.
IMAGE_META = b'"source_bytes":325,"source_format":"JPEG","source_mode":"RGB","source_size":[12,10]}'
WRITTEN = {
    False: ([
        ("cat-0001.jpg", TINY_JPEG),
        ("cat-0001.cls", b"0"),
        ("cat-0001.json", b'{"changes":[],"class":"cat","size":[12,10],"source":"cat/a.jpg",' + IMAGE_META),
        ("eel-0002.jpg", TINY_JPEG),
        ("eel-0002.cls", b"2"),
        ("eel-0002.json", b'{"changes":[],"class":"eel","size":[12,10],"source":"eel/b.jpg",' + IMAGE_META),
    ], "4ec743c7572eefa1894673751b247570144de5bdce3008e43e853e8a365fda1e"),
    True: ([
        ("cat-0001.jpg", TINY_JPEG),
        ("cat-0001.json", b'{"changes":[],"classes":["cat"],"fields":{"id":7},"labels":[0],"size":[12,10],'
                          b'"source":"cat/a.jpg",' + IMAGE_META),
        ("eel-0002.jpg", TINY_JPEG),
        ("eel-0002.json", b'{"changes":[],"classes":["dog","eel"],"labels":[1,2],"size":[12,10],"source":"eel/b.jpg",'
                          + IMAGE_META),
    ], "a8146927e80934b4f9daac696b3fa4d5a43715c7cfc06ccfadfe6fd55c7739ce"),
}


def test_members_of_a_sample_are_pinned():
    single = encode_sample("cat-0001", b"<jpeg>", "jpg", (2,), False, {"source": "cat/a.jpg", "class": "eel"})
    assert single == [("cat-0001.jpg", b"<jpeg>"), ("cat-0001.cls", b"2"),
                      ("cat-0001.json", b'{"class":"eel","source":"cat/a.jpg"}')]
    multi = encode_sample("a/dog-0002", b"<png>", "png", (0, 2), True, {"source": "x", "classes": ["cat", "eel"]})
    assert multi == [("a/dog-0002.png", b"<png>"),
                     ("a/dog-0002.json", b'{"classes":["cat","eel"],"labels":[0,2],"source":"x"}')]
    assert metadata_json({"b": 1, "a": [1.5, "\u00e9"]}) == b'{"a":[1.5,"\\u00e9"],"b":1}'
    for key, ext in (("a.b", "jpg"), ("", "jpg"), ("k", "JPG"), ("k", "gif")):
        with pytest.raises(ValueError, match="cannot store"):
            encode_sample(key, b"x", ext, (0,), False, {})


@pytest.mark.parametrize("name, expected", [
    ("key.jpg", ("key", "jpg")), ("a/b/key.JPG", ("a/b/key", "jpg")), ("a/b.c/key.tar.gz", ("a/b.c/key", "tar.gz")),
    ("a/noext", None), ("a.b/noext", None),
])
def test_keys_run_to_the_first_dot_of_the_file_name_as_in_webdataset(name, expected):
    assert split_member(name) == expected
    key, ext = wds.tariterators.base_plus_ext(name)
    assert (None if key is None else (key, ext.lower())) == expected


def _write(tmp_path, multi_label: bool) -> tuple[str, dict]:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jpg").write_bytes(TINY_JPEG)
    (raw / "b.jpg").write_bytes(TINY_JPEG)
    items = [Item("cat/a.jpg", str(raw / "a.jpg"), (0,), len(TINY_JPEG), fields={"id": 7} if multi_label else None),
             Item("eel/b.jpg", str(raw / "b.jpg"), (1, 2) if multi_label else (2,), len(TINY_JPEG))]
    shard = ShardPlan("train-000000.tar", "train", [("cat-0001", items[0]), ("eel-0002", items[1])])
    dest = str(tmp_path / "ds")
    stats = make_shard(shard, dest, ImagePolicy(40, 90), CLASSES, multi_label)
    return storage.join(dest, shard.name), stats


@pytest.mark.parametrize("multi_label", [False, True], ids=["single-label", "multi-label"])
def test_the_writer_writes_the_pinned_format_and_webdataset_reads_it_back(tmp_path, multi_label):
    path, stats = _write(tmp_path, multi_label)
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    expected, sha256 = WRITTEN[multi_label]
    assert members == expected
    assert stats["samples"] == 2 and stats["sha256"] == sha256

    labels = {"cat-0001": (0,), "eel-0002": (1, 2) if multi_label else (2,)}
    samples = list(wds.WebDataset(path, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == list(labels)
    for s in samples:
        members = {ext: value for ext, value in s.items() if not ext.startswith("__")}
        assert decode_sample(path, s["__key__"], members, multi_label, len(CLASSES)) == (TINY_JPEG,
                                                                                        labels[s["__key__"]])


def _dataset_of_one_sample(tmp_path, multi_label: bool, members: dict[str, bytes]) -> DatasetInfo:
    url = str(tmp_path / "ds")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for ext, payload in members.items():
            member = tarfile.TarInfo(f"k0.{ext}")
            member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))
    storage.write_bytes_atomic(storage.join(url, "train-000000.tar"), buf.getvalue())
    size, sha256 = storage.sha256_of(storage.join(url, "train-000000.tar"))
    storage.write_bytes_atomic(storage.join(url, "rejected.jsonl"), b"")
    info = DatasetInfo(url=url, classes=CLASSES, multi_label=multi_label, inputs=1,
                       splits={"train": Split([Shard("train-000000.tar", 1, size, sha256)])})
    dataset_json.save(info)
    return info


@pytest.mark.parametrize("multi_label, members, problem", [
    # The training reader used to take a single-label sample's labels from its .json when .cls was missing.
    (False, {"jpg": TINY_JPEG, "json": b'{"labels":[1]}'}, "no .cls label"),
    (False, {"jpg": TINY_JPEG, "cls": b"-1", "json": b"{}"}, ".cls is not a decimal integer: '-1'"),
    (False, {"jpg": TINY_JPEG, "cls": b"3"}, "labels [3] outside 0..2"),
    (True, {"jpg": TINY_JPEG, "cls": b"1"}, "no .json with labels"),
    (True, {"jpg": TINY_JPEG, "json": b'{"labels":[]}'}, ".json has no list of label indices (got [])"),
    (True, {"jpg": TINY_JPEG, "json": b'{"labels":[0,5]}'}, "labels [5] outside 0..2"),
    (False, {"cls": b"1", "json": b"{}"}, "expected one image (jpg/jpeg/png), found 0"),
    (False, {"jpg": TINY_JPEG, "png": TINY_JPEG, "cls": b"1"}, "expected one image (jpg/jpeg/png), found 2"),
], ids=["single-no-cls", "single-bad-cls", "single-out-of-range", "multi-no-json", "multi-empty-labels",
        "multi-out-of-range", "no-image", "two-images"])
def test_reader_and_verify_refuse_a_broken_sample_with_the_same_message(tmp_path, multi_label, members, problem):
    info = _dataset_of_one_sample(tmp_path, multi_label, members)
    shard = info.split("train").shards[0]
    [(_, sample)] = list(data._read_shard(info, shard, None, 1))
    assert sample.problem is not None and sample.problem.startswith(problem)
    # The loader leaves the sample out (training fills its place and reports it; evaluation skips it).
    assert list(data.eval_batches(info, "train", 8, 1, 0, 1)) == []
    problems, _ = verify(info.url)
    assert problems == [f"train-000000.tar: sample 'k0': {sample.problem}"]
