"""Listing sources and planning shards, without Ray: the plan is a pure function of the source and the options,
whatever the partitions, buckets and workers it was made with. Planning never reads an image's bytes, so most
sources here are folders of empty files."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

import data_prep.plan
from data_prep.images import Rejected
from data_prep.plan import Plan, PlanError, PlanOptions, Runner, plan_source, sample_key
from data_prep.sample_data import make_sample_data
from data_prep.sources import Item, SourceError, detect_layout, list_partition, partitions, read_item


def _plan(url, options: PlanOptions, layout: str = "auto", **kw) -> Plan:
    """Plan `url` in this process, the way `mixer prepare` does with Ray."""
    return plan_source(partitions(str(url), layout), options, runner=Runner(ray=False), **kw)


def _samples(plan: Plan) -> list[tuple[str, str, str, Item]]:
    """(shard name, split, key, input) of every sample, in shard order."""
    return [(spec.name, spec.split, key, item) for spec in plan.shards for key, item in plan.shard_plan(spec).samples]


def _contents(plan: Plan) -> list[tuple[str, str, str, str]]:
    return [(name, split, key, item.source) for name, split, key, item in _samples(plan)]


def _imagefolder(root, classes: int = 5, per_class: int = 30):
    """ROOT/c<c>/img<i>.jpg of empty files: enough to plan."""
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"img{i:03d}.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def folder_5x30(tmp_path_factory):
    return _imagefolder(tmp_path_factory.mktemp("folder") / "src", 5, 30)


def test_plan_is_a_pure_function_of_source_and_options(folder_5x30):
    options = PlanOptions(shard_size=16, val_per_class=3, seed=7)
    a, b = _plan(folder_5x30, options), _plan(folder_5x30, options)
    assert _contents(a) == _contents(b) and a.digest == b.digest
    assert [item for *_, item in _samples(a)] == [item for *_, item in _samples(b)]
    other_seed = _plan(folder_5x30, PlanOptions(shard_size=16, val_per_class=3, seed=8))
    assert other_seed.digest != a.digest and _contents(other_seed) != _contents(a)
    assert sorted(_contents(other_seed), key=lambda r: r[3]) != sorted(_contents(a), key=lambda r: r[3])


def test_val_is_stratified_and_shards_are_balanced_and_mixed(folder_5x30):
    plan = _plan(folder_5x30, PlanOptions(shard_size=16, val_per_class=3, seed=0))
    samples = _samples(plan)
    assert plan.layout == "imagefolder" and plan.classes == [f"c{c}" for c in range(5)] and not plan.multi_label
    val = [item for _, split, _, item in samples if split == "val"]
    assert Counter(item.labels[0] for item in val) == {c: 3 for c in range(5)}
    assert all(name.startswith("val-") for name, split, _, _ in samples if split == "val")
    train = [spec for spec in plan.shards if spec.split == "train"]
    assert [s.name for s in train] == [f"train-{i:06d}.tar" for i in range(9)]  # ceil(135 / 16)
    sizes = [len(plan.shard_plan(s).samples) for s in train]
    assert sum(sizes) == 135 and max(sizes) - min(sizes) <= 1 and sizes == [s.size for s in train]
    assert plan.split_sizes() == {"train": 135, "val": 15}
    for spec in train:  # the shuffle mixes classes
        assert len({item.labels[0] for _, item in plan.shard_plan(spec).samples}) >= 3, spec.name
    everything = [item.source for *_, item in samples]
    expected = [f"c{c}/img{i:03d}.jpg" for c in range(5) for i in range(30)]
    assert sorted(everything) == expected and plan.inputs == 150  # each input exactly once
    assert all(item.labels == (int(item.source[1]),) for item in (s[3] for s in samples))  # the folder's class
    assert list(plan.rejected()) == [] and plan.rejected_counts == {}


def test_val_fraction_rounds_per_class(tmp_path):
    plan = _plan(_imagefolder(tmp_path / "src", 4, 10), PlanOptions(shard_size=100, val_fraction=0.25))
    assert plan.split_sizes() == {"train": 28, "val": 12}  # round(2.5) = 3 per class
    val = [item for _, split, _, item in _samples(plan) if split == "val"]
    assert Counter(item.labels[0] for item in val) == {c: 3 for c in range(4)}


def test_keys_are_stable_unique_dotless_and_named_by_the_source_only(folder_5x30, tmp_path):
    plan = _plan(folder_5x30, PlanOptions(shard_size=50))
    samples = _samples(plan)
    keys = [key for _, _, key, _ in samples]
    assert len(keys) == 150 and len(set(keys)) == len(keys) and not any("." in k for k in keys)
    for _, _, key, item in samples:
        assert key == sample_key(item.source, plan.classes[item.labels[0]])
        assert key.startswith(plan.classes[item.labels[0]] + "-")
    # The same images at another URL: the same keys in the same shards; only the URLs differ.
    moved = shutil.copytree(folder_5x30, tmp_path / "elsewhere" / "copy")
    elsewhere = _samples(_plan(moved, PlanOptions(shard_size=50)))
    assert [s[:3] + (s[3].source,) for s in elsewhere] == [s[:3] + (s[3].source,) for s in samples]
    assert elsewhere[0][3].url != samples[0][3].url
    assert sample_key("a/b.jpg", "c0") == sample_key("a/b.jpg", "c0") != sample_key("a/c.jpg", "c0")
    assert sample_key("a/b.jpg", "dotted.name with space").startswith("dotted_name_with_space-")
    assert "." not in sample_key("a/b.jpg", "dotted.name with space")


def test_bad_options_are_refused_by_name(folder_5x30):
    with pytest.raises(PlanError, match="--shard-size"):
        _plan(folder_5x30, PlanOptions(shard_size=0))
    with pytest.raises(PlanError, match="not both"):
        _plan(folder_5x30, PlanOptions(val_per_class=2, val_fraction=0.1))
    with pytest.raises(PlanError, match="--val-fraction"):
        _plan(folder_5x30, PlanOptions(val_fraction=1.5))


def test_list_outputs_stay_large_enough_to_keep_out_of_the_driver(folder_5x30, monkeypatch):
    # A real plan in many buckets: one list task, since five (one per class folder) would each hand the driver
    # outputs of a row or two.
    listed = []
    call = Runner.call

    def counting(self, fn, *args, **kw):
        listed.append(fn.__name__)
        return call(self, fn, *args, **kw)

    monkeypatch.setattr(Runner, "call", counting)
    monkeypatch.setattr(data_prep.plan, "ROWS_PER_BUCKET", 7)
    plan = _plan(folder_5x30, PlanOptions(shard_size=16, val_per_class=3), workers=4)
    assert listed.count("_list_task") == 1 and len(plan.tables) > 16
    # ImageNet-21k on 64 workers: 64 buckets, and list tasks capped so each (task, bucket) output holds >= 4096 rows.
    tasks = data_prep.plan._list_task_count(14_200_000, 21_841, 64, 64)
    assert 14_200_000 / (tasks * 64) >= data_prep.plan.ROWS_PER_LIST_OUTPUT
    assert tasks >= 32  # still most of the cluster listing at once
    # JFT-300M: about a million rows a task, and the references the driver holds grow with the inputs.
    tasks, buckets = data_prep.plan._list_task_count(300_000_000, 4_000, 256, 64), 256
    assert 200 <= tasks <= 300 and tasks * buckets <= 300_000_000 // data_prep.plan.ROWS_PER_LIST_OUTPUT
    assert data_prep.plan._list_task_count(1_000, 3, 1, 8) == 1  # a small source lists in one task
    assert data_prep.plan._list_task_count(0, 0, 1, 1) == 1


def test_the_plan_does_not_depend_on_buckets_list_tasks_or_workers(folder_5x30, monkeypatch):
    options = PlanOptions(shard_size=16, val_per_class=3, seed=5)
    reference = _plan(folder_5x30, options)
    assert len(reference.tables) == 1  # the default: one bucket for this small source
    monkeypatch.setattr(data_prep.plan, "ROWS_PER_BUCKET", 7)
    monkeypatch.setattr(data_prep.plan, "ROWS_PER_LIST_TASK", 3)
    monkeypatch.setattr(data_prep.plan, "ROWS_PER_LIST_OUTPUT", 1)
    for workers in (1, 4):
        cut = _plan(folder_5x30, options, workers=workers)
        assert len(cut.tables) > 100, workers  # many buckets, most of them holding a sample or none
        assert cut.digest == reference.digest, workers
        assert _contents(cut) == _contents(reference), workers
        assert [s.size for s in cut.shards] == [s.size for s in reference.shards]


def _manifest_rows(n: int = 120) -> list[dict]:
    rows = [{"path": f"img/c{i % 4}/{i:04d}.jpg", "label": f"class{i % 4}", "id": i} for i in range(n)]
    rows[30]["label"] = []  # no-label
    rows[n - 20] = {"path": "./img/c1/0005.jpg", "label": "class3", "id": n - 20}  # a duplicate of row 5: it wins
    return rows


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_parts(folder, rows, parts: int = 7) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cuts = [len(rows) * p // parts for p in range(parts + 1)]
    for p in range(parts):
        _write_jsonl(folder / f"part-{p:02d}.jsonl", rows[cuts[p] : cuts[p + 1]])


def test_the_plan_does_not_depend_on_how_a_manifest_is_cut_into_parts(tmp_path, monkeypatch):
    rows = _manifest_rows()
    _write_jsonl(tmp_path / "whole.jsonl", rows)
    _write_parts(tmp_path, rows)  # the same rows, 7 parts, in the same folder (the same image URLs)
    _write_parts(tmp_path / "other", rows)  # and in another folder
    options = PlanOptions(shard_size=10, val_per_class=2, seed=1)
    whole = _plan(tmp_path / "whole.jsonl", options)
    assert len(partitions(str(tmp_path / "whole.jsonl")).parts) == 1
    assert whole.inputs == 120 and whole.split_sizes() == {"train": 110, "val": 8}
    assert sorted((r["source"], r["reason"]) for r in whole.rejected()) == [
        ("img/c1/0005.jpg", "duplicate"), ("img/c2/0030.jpg", "no-label")]
    first = {item.source: item for *_, item in _samples(whole)}
    assert first["img/c1/0005.jpg"].labels == (1,) and first["img/c1/0005.jpg"].fields == {"id": 5}

    monkeypatch.setattr(data_prep.plan, "ROWS_PER_BUCKET", 7)
    monkeypatch.setattr(data_prep.plan, "ROWS_PER_LIST_TASK", 10)
    glob = str(tmp_path / "part-*.jsonl")
    assert len(partitions(glob).parts) == 7
    for workers in (1, 4):
        cut = _plan(glob, options, workers=workers)
        assert len(cut.tables) > 1, workers
        assert cut.digest == whole.digest, workers  # the digest does not depend on the partitioning
        assert _contents(cut) == _contents(whole), workers
        assert [(s[3].url, s[3].labels, s[3].fields) for s in _samples(cut)] == [
            (s[3].url, s[3].labels, s[3].fields) for s in _samples(whole)]
        assert list(cut.rejected()) == list(whole.rejected())
    other = _plan(tmp_path / "other", options, workers=4)
    assert len(partitions(str(tmp_path / "other")).parts) == 7
    assert _contents(other) == _contents(whole) and other.split_sizes() == whole.split_sizes()
    assert list(other.rejected()) == list(whole.rejected())


def test_manifest_parts_as_a_folder_a_glob_and_parquet_row_groups(tmp_path):
    rows = _manifest_rows(60)
    _write_parts(tmp_path / "parts", rows, parts=5)
    (tmp_path / "parts" / "README.md").write_text("not a part")
    folder = partitions(str(tmp_path / "parts"))
    glob = partitions(str(tmp_path / "parts" / "part-*.jsonl"))
    assert folder.layout == glob.layout == "manifest"
    assert [p.url.rsplit("/", 1)[1] for p in folder.parts] == [f"part-{p:02d}.jsonl" for p in range(5)]
    assert [p.url for p in glob.parts] == [p.url for p in folder.parts]
    assert any("not manifest parts" in note for note in folder.notes)
    for url in (tmp_path / "parts", tmp_path / "parts" / "part-*.jsonl"):
        plan = _plan(url, PlanOptions(shard_size=100))
        assert plan.inputs == 60
        planned = {item.source for *_, item in _samples(plan)} | {r["source"] for r in plan.rejected()}
        assert planned == {r["path"].removeprefix("./") for r in rows}

    (tmp_path / "mixed").mkdir()
    _write_jsonl(tmp_path / "mixed" / "part-00.jsonl", rows[:5])
    (tmp_path / "mixed" / "part-01.csv").write_text("path,label\nx.jpg,class0\n")
    with pytest.raises(SourceError, match="several formats"):
        partitions(str(tmp_path / "mixed"))

    table = pa.Table.from_pylist([{"path": r["path"], "label": r["label"] or None, "id": r["id"]} for r in rows])
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=16)
    groups = pq.ParquetFile(tmp_path / "m.parquet").metadata.num_row_groups
    assert groups >= 3
    parts = partitions(str(tmp_path / "m.parquet"))
    assert len(parts.parts) == groups and [p.row_group for p in parts.parts] == list(range(groups))
    assert [p.rows for p in parts.parts] == [16, 16, 16, 12]
    plan = _plan(tmp_path / "m.parquet", PlanOptions(shard_size=100))
    assert plan.inputs == 60 and plan.split_sizes() == {"train": 58}
    by_jsonl = _plan(tmp_path / "parts", PlanOptions(shard_size=100))
    assert [(s[2], s[3].source, s[3].labels) for s in _samples(plan)] == [
        (s[2], s[3].source, s[3].labels) for s in _samples(by_jsonl)]


@pytest.fixture(scope="module")
def manifest_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    make_sample_data(str(root), "manifest", classes=5, per_class=8, bad=7, seed=3)
    return root


def test_manifest_formats_give_the_same_samples(manifest_source):
    rows = [json.loads(line) for line in (manifest_source / "manifest.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), manifest_source / "manifest.parquet")
    csv_lines = ["path,labels,id,note"] + [f"{r['path']},{'|'.join(r['labels'])},{r['id']},{r['note']}" for r in rows]
    (manifest_source / "manifest.csv").write_text("\n".join(csv_lines) + "\n")
    plans = {fmt: _plan(manifest_source / f"manifest.{fmt}", PlanOptions(shard_size=10))
             for fmt in ("jsonl", "parquet", "csv")}
    for plan in plans.values():
        assert plan.layout == "manifest" and plan.multi_label
        assert plan.classes == [f"class{c:03d}" for c in range(5)]
        assert plan.inputs == 5 * 8 + 7 and sum(plan.split_sizes().values()) == 47 and not plan.rejected_counts
    samples = {fmt: _samples(plan) for fmt, plan in plans.items()}
    as_tuples = {fmt: [(item.source, item.labels) for *_, item in s] for fmt, s in samples.items()}
    assert as_tuples["jsonl"] == as_tuples["parquet"] == as_tuples["csv"]
    assert sorted(source for source, _ in as_tuples["jsonl"]) == sorted(r["path"] for r in rows)
    multi = [labels for _, labels in as_tuples["jsonl"] if len(labels) > 1]
    assert multi and all(2 <= len(labels) <= 3 for labels in multi)
    for fmt in ("jsonl", "parquet", "csv"):  # other columns are kept
        assert all(item.fields["note"].startswith("synthetic") for *_, item in samples[fmt]), fmt
    assert {item.fields["id"] for *_, item in samples["jsonl"]} == set(range(47))


def test_manifest_labels_indices_duplicates_and_classes_file(tmp_path):
    (tmp_path / "classes.txt").write_text("zebra\napple\nmango\n")
    rows = [
        {"path": "a.jpg", "label": "apple"},
        {"path": "b.jpg", "label": ["zebra", "mango"], "caption": "two fruits"},
        {"path": "./a.jpg", "label": "mango"},  # the same file again: the first row wins
        {"path": "c.jpg", "label": "kiwi"},
        {"path": "d.jpg", "label": []},
        {"path": "s3://bucket/e.jpg", "label": "zebra"},
    ]
    _write_jsonl(tmp_path / "m.jsonl", rows)
    plan = _plan(tmp_path / "m.jsonl", PlanOptions(shard_size=10), classes_file=str(tmp_path / "classes.txt"))
    assert plan.classes == ["zebra", "apple", "mango"] and plan.multi_label
    items = {item.source: item for *_, item in _samples(plan)}
    assert {source: item.labels for source, item in items.items()} == {
        "a.jpg": (1,), "b.jpg": (0, 2), "s3://bucket/e.jpg": (0,)}
    assert items["b.jpg"].fields == {"caption": "two fruits"} and items["a.jpg"].fields is None
    assert items["s3://bucket/e.jpg"].url == "s3://bucket/e.jpg"
    assert items["a.jpg"].url == f"file://{tmp_path}/a.jpg"
    rejected = list(plan.rejected())
    assert sorted((r["source"], r["reason"]) for r in rejected) == [
        ("a.jpg", "duplicate"), ("c.jpg", "unknown-class"), ("d.jpg", "no-label")]
    assert "kiwi" in next(r["detail"] for r in rejected if r["reason"] == "unknown-class")
    assert plan.rejected_counts == {"duplicate": 1, "no-label": 1, "unknown-class": 1}
    assert plan.inputs == len(rows)

    (tmp_path / "idx.csv").write_text("file,label\nx.jpg,2\ny.jpg,0|1\n")
    by_index = _plan(tmp_path / "idx.csv", PlanOptions(shard_size=10))
    assert by_index.classes == ["0", "1", "2"]
    assert {item.source: item.labels for *_, item in _samples(by_index)} == {"x.jpg": (2,), "y.jpg": (0, 1)}


def test_label_indices_out_of_range_and_mixed_kinds_are_refused(tmp_path):
    (tmp_path / "classes.txt").write_text("zebra\napple\nmango\n")
    rows = [{"path": "a.jpg", "label": 0}, {"path": "b.jpg", "label": 2}, {"path": "c.jpg", "label": 3},
            {"path": "d.jpg", "label": [1, 5]}]
    _write_jsonl(tmp_path / "idx.jsonl", rows)
    plan = _plan(tmp_path / "idx.jsonl", PlanOptions(shard_size=10), classes_file=str(tmp_path / "classes.txt"))
    assert plan.classes == ["zebra", "apple", "mango"]
    assert {item.source: item.labels for *_, item in _samples(plan)} == {"a.jpg": (0,), "b.jpg": (2,)}
    assert sorted((r["source"], r["reason"]) for r in plan.rejected()) == [
        ("c.jpg", "unknown-class"), ("d.jpg", "unknown-class")]
    assert all("out of range 0..2" in r["detail"] for r in plan.rejected())

    _write_jsonl(tmp_path / "negative.jsonl", [{"path": "a.jpg", "label": 0}, {"path": "n.jpg", "label": -1}])
    negative = _plan(tmp_path / "negative.jsonl", PlanOptions(shard_size=10))
    assert [(r["source"], r["reason"]) for r in negative.rejected()] == [("n.jpg", "unknown-class")]
    assert [item.source for *_, item in _samples(negative)] == ["a.jpg"]

    _write_jsonl(tmp_path / "mixed.jsonl", [{"path": "a.jpg", "label": "apple"}, {"path": "b.jpg", "label": 1}])
    with pytest.raises(SourceError, match="mix class names and indices"):
        _plan(tmp_path / "mixed.jsonl", PlanOptions(shard_size=10))
    _write_parts(tmp_path / "mixed-parts", [{"path": "a.jpg", "label": "apple"}, {"path": "b.jpg", "label": 1}], 2)
    with pytest.raises(SourceError, match="mix class names and indices"):  # each part alone is of one kind
        _plan(tmp_path / "mixed-parts", PlanOptions(shard_size=10))


def test_manifest_without_needed_columns_says_which(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image_path": "a.jpg", "label": "x"}) + "\n")
    with pytest.raises(SourceError, match="needs a path column"):
        _plan(tmp_path / "m.jsonl", PlanOptions())
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg", "label": "x"}\nnot json\n')
    with pytest.raises(SourceError, match="line 2"):
        _plan(tmp_path / "bad.jsonl", PlanOptions())


def test_imagefolder_and_i21k_tars_are_detected_and_listed(tmp_path):
    make_sample_data(str(tmp_path / "folder"), "imagefolder", classes=3, per_class=4, bad=2)
    (tmp_path / "folder" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "folder" / "README.txt").write_text("loose file")
    (tmp_path / "folder" / "class001" / ".thumb.jpg").write_bytes(b"x")
    assert detect_layout(str(tmp_path / "folder")) == "imagefolder"
    parts = partitions(str(tmp_path / "folder"))
    assert [p.url.rsplit("/", 1)[1] for p in parts.parts] == ["class000", "class001", "class002"]
    listed = list_partition(parts.parts[1], "imagefolder")
    assert [r.source for r in listed.raws] == sorted(r.source for r in listed.raws) and listed.hidden == 1
    plan = _plan(tmp_path / "folder", PlanOptions(shard_size=5))
    assert plan.layout == "imagefolder" and plan.classes == ["class000", "class001", "class002"]
    assert plan.inputs == 14 and sum(plan.split_sizes().values()) == 14 and len(_samples(plan)) == 14
    assert not any("/." in item.source for *_, item in _samples(plan))
    # The hidden and the loose file at the top, and the hidden file in a class, are ignored out loud.
    assert len(plan.notes) == 3
    assert any("hidden" in n and "directly under" in n for n in plan.notes)
    assert any("directly under" in n and "ImageFolder images live in" in n for n in plan.notes)
    assert any("1 hidden files" in n and "inside the partitions" in n for n in plan.notes)

    make_sample_data(str(tmp_path / "tars"), "i21k-tars", classes=3, per_class=4, seed=1)
    assert detect_layout(str(tmp_path / "tars")) == "i21k-tars"
    tars = _plan(tmp_path / "tars", PlanOptions(shard_size=5))
    assert tars.layout == "i21k-tars" and len(tars.classes) == 3 and tars.inputs == 12
    samples = _samples(tars)
    assert len(samples) == 12
    for *_, item in samples:
        synset, member = item.source.split("/", 1)
        assert synset == tars.classes[item.labels[0]] + ".tar" and item.offset > 0
        with tarfile.open(tmp_path / "tars" / synset) as tar:
            assert read_item(item) == tar.extractfile(member).read()


def _three_member_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"n0001_{i}.jpg")
            info.size = 3000
            tar.addfile(info, io.BytesIO(bytes(3000)))
    return buf.getvalue()


@pytest.mark.parametrize("cut, listed, reason", [(7780, 3, "unreadable"), (7380, 2, "truncated")])
def test_truncated_tar_keeps_the_members_before_the_damage(tmp_path, cut, listed, reason):
    # 7780: inside the third member's data; 7380: inside the third member's header.
    (tmp_path / "n0001.tar").write_bytes(_three_member_tar()[:cut])
    plan = _plan(tmp_path, PlanOptions(shard_size=10), layout="i21k-tars")
    items = {item.source: item for *_, item in _samples(plan)}
    assert sorted(items) == [f"n0001.tar/n0001_{i}.jpg" for i in range(listed)]
    rejected = list(plan.rejected())
    assert [r["reason"] for r in rejected] == [reason]  # the lost rest is reported, never silent
    assert rejected[0]["source"] == f"n0001.tar/<after member {listed}>"
    assert plan.inputs == listed + 1 and plan.rejected_counts == {reason: 1}
    assert read_item(items["n0001.tar/n0001_0.jpg"]) == bytes(3000)
    if listed == 3:
        with pytest.raises(Rejected) as info:
            read_item(items["n0001.tar/n0001_2.jpg"])
        assert info.value.reason == "truncated"


def test_wds_tars_are_listed_by_key_with_their_labels(tmp_path):
    written = {}
    (tmp_path / "wds").mkdir()
    for t in range(2):
        with wds.TarWriter(str(tmp_path / "wds" / f"shard-{t}.tar")) as sink:
            for i in range(6):
                key = f"s{t}_{i:03d}"
                written[f"shard-{t}.tar/{key}"] = data = bytes([t, i]) * (50 + 37 * i)
                sink.write({"__key__": key, "jpg": data, "cls": (t + i) % 3})
            if t == 1:
                sink.write({"__key__": "label_only", "cls": 1})  # no image: refused
    assert partitions(str(tmp_path / "wds")).layout == "i21k-tars"  # wds is never guessed: it must be asked for
    parts = partitions(str(tmp_path / "wds"), "wds")
    assert parts.layout == "wds" and len(parts.parts) == 2
    plan = _plan(tmp_path / "wds", PlanOptions(shard_size=5), layout="wds")
    assert plan.layout == "wds" and plan.classes == ["0", "1", "2"] and not plan.multi_label
    assert plan.inputs == 13 and plan.split_sizes() == {"train": 12}
    assert [(r["source"], r["reason"]) for r in plan.rejected()] == [("shard-1.tar/label_only", "no-image")]
    items = {item.source: item for *_, item in _samples(plan)}
    assert sorted(items) == sorted(written)
    for source, item in items.items():
        t, i = int(source[6]), int(source[-3:])
        assert item.labels == ((t + i) % 3,), source
        assert item.url.endswith(f"/wds/shard-{t}.tar") and read_item(item) == written[source], source

    (tmp_path / "named").mkdir()
    with wds.TarWriter(str(tmp_path / "named" / "a.tar")) as sink:
        for i, name in enumerate(["owl", "bat", "owl", "cow"]):
            sink.write({"__key__": f"k{i}", "png": b"png" * (i + 1), "json": {"label": name}})
    named = _plan(tmp_path / "named", PlanOptions(shard_size=5), layout="wds")
    assert named.classes == ["bat", "cow", "owl"]
    assert {item.source: named.classes[item.labels[0]] for *_, item in _samples(named)} == {
        "a.tar/k0": "owl", "a.tar/k1": "bat", "a.tar/k2": "owl", "a.tar/k3": "cow"}


def _hugging_face_parquet(path, rows: list[dict], names: list[str], row_group_size: int) -> None:
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())]))
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"names": names, "_type": "ClassLabel"}}}}
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()}), path,
                   row_group_size=row_group_size)


def test_parquet_with_embedded_images_is_read_back_from_its_row_groups(tmp_path):
    (tmp_path / "hf").mkdir()
    names = ["cat", "dog", "eel", "fox"]
    rows = [{"image": {"bytes": b"\xff\xd8" + bytes([i]) * (10 + i), "path": None if i % 7 == 3 else f"img{i}.jpg"},
             "label": i % 3} for i in range(20)]  # "fox" is named but never used
    _hugging_face_parquet(tmp_path / "hf" / "train-00000-of-00001.parquet", rows, names, row_group_size=6)
    parts = partitions(str(tmp_path / "hf"))
    assert parts.layout == "manifest" and [p.row_group for p in parts.parts] == [0, 1, 2, 3]
    plan = _plan(tmp_path / "hf", PlanOptions(shard_size=8))
    assert plan.classes == names and plan.inputs == 20 and plan.split_sizes() == {"train": 20}
    items = {item.source: item for *_, item in _samples(plan)}
    # A row without a file name is named by its part, row group and row: rows 3, 10 and 17.
    assert {s for s in items if not s.startswith("img")} == {
        "train-00000-of-00001.parquet/0/3", "train-00000-of-00001.parquet/1/4", "train-00000-of-00001.parquet/2/5"}
    by_row = {}
    for item in items.values():
        number = item.offset * 6 + item.row
        by_row[number] = item
        assert item.labels == (number % 3,)
    assert sorted(by_row) == list(range(20))
    assert {item.offset for item in by_row.values()} == {0, 1, 2, 3}
    for number, item in by_row.items():  # the bytes come back from the item's own row group
        assert read_item(item) == rows[number]["image"]["bytes"], number


def test_declared_class_names_survive_an_out_of_range_label(tmp_path):
    """A Hugging Face Parquet names its classes; a row whose index is past them is refused, not a new class."""
    (tmp_path / "hf").mkdir()
    rows = [{"image": {"bytes": b"x", "path": f"img{i}.jpg"}, "label": i % 3} for i in range(9)]
    rows.append({"image": {"bytes": b"x", "path": "stray.jpg"}, "label": 7})
    _hugging_face_parquet(tmp_path / "hf" / "train.parquet", rows, ["cat", "dog", "eel"], row_group_size=4)
    plan = _plan(tmp_path / "hf", PlanOptions(shard_size=8))
    assert plan.classes == ["cat", "dog", "eel"], "the declared names were replaced by indices"
    assert [(r["source"], r["reason"]) for r in plan.rejected()] == [("stray.jpg", "unknown-class")]
    assert plan.split_sizes() == {"train": 9}


def test_unknown_layout_and_missing_source_are_clear(tmp_path):
    with pytest.raises(SourceError, match=f"^{re.escape(str(tmp_path / 'nope'))}: no such file or folder"):
        partitions(str(tmp_path / "nope"))
    for layout, url in (("imagefolder", tmp_path / "nope"), ("i21k-tars", tmp_path / "nope"),
                        ("wds", tmp_path / "nope"), ("manifest", tmp_path / "nope" / "m.jsonl"),
                        ("manifest", tmp_path / "nope" / "m.parquet")):
        with pytest.raises(SourceError, match=f"^{re.escape(str(url))}: "):
            partitions(str(url), layout)
        with pytest.raises(SourceError, match=f"^{re.escape(str(url))}: "):
            _plan(url, PlanOptions(), layout=layout)
    _imagefolder(tmp_path / "ok", 1, 1)
    with pytest.raises(SourceError, match="unknown layout 'folders'"):
        partitions(str(tmp_path / "ok"), "folders")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.tar").write_bytes(b"")
    (tmp_path / "mixed" / "cls").mkdir()
    with pytest.raises(SourceError, match="--layout"):
        partitions(str(tmp_path / "mixed"))


def test_sample_data_is_deterministic_for_a_seed(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        make_sample_data(str(tmp_path / name), "i21k-tars", classes=2, per_class=6, bad=3, seed=seed)
    assert files(tmp_path / "a") == files(tmp_path / "b") != files(tmp_path / "c")
