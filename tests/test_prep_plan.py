"""Listing sources and planning shards, without Ray: the plan is a pure function of the listing and the options."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.images import Rejected
from data_prep.plan import PlanError, PlanOptions, plan_dataset, sample_key
from data_prep.sample_data import make_sample_data
from data_prep.sources import Item, Listing, SourceError, detect_layout, list_source, read_item


def _listing(classes: int = 5, per_class: int = 30) -> Listing:
    items = [Item(f"c{c}/img{i:03d}.jpg", f"file:///nowhere/c{c}/img{i:03d}.jpg", (c,), 100 + i)
             for c in range(classes) for i in range(per_class)]
    return Listing("imagefolder", [f"c{c}" for c in range(classes)], False, items)


def _contents(plan) -> list[tuple[str, str, list[str]]]:
    return [(s.name, s.split, [key for key, _ in s.samples]) for s in plan.shards]


def test_plan_is_a_pure_function_of_listing_and_options():
    options = PlanOptions(shard_size=16, val_per_class=3, seed=7)
    a, b = plan_dataset(_listing(), options), plan_dataset(_listing(), options)
    assert _contents(a) == _contents(b) and a.digest == b.digest
    other_seed = plan_dataset(_listing(), PlanOptions(shard_size=16, val_per_class=3, seed=8))
    assert other_seed.digest != a.digest and _contents(other_seed) != _contents(a)


def test_val_is_stratified_and_shards_are_balanced_and_mixed():
    plan = plan_dataset(_listing(5, 30), PlanOptions(shard_size=16, val_per_class=3, seed=0))
    val = [item for s in plan.shards if s.split == "val" for _, item in s.samples]
    assert Counter(item.labels[0] for item in val) == {c: 3 for c in range(5)}
    train = [s for s in plan.shards if s.split == "train"]
    assert [s.name for s in train] == [f"train-{i:06d}.tar" for i in range(9)]  # ceil(135 / 16)
    sizes = [len(s.samples) for s in train]
    assert sum(sizes) == 135 and max(sizes) - min(sizes) <= 1
    assert all(len({item.labels[0] for _, item in s.samples}) >= 3 for s in train)  # the shuffle mixes classes
    everything = [item.source for s in plan.shards for _, item in s.samples]
    assert sorted(everything) == sorted(item.source for item in _listing(5, 30).items)  # each input exactly once


def test_val_fraction_rounds_per_class():
    plan = plan_dataset(_listing(4, 10), PlanOptions(shard_size=100, val_fraction=0.25))
    assert plan.split_sizes() == {"train": 28, "val": 12}  # round(2.5) = 3 per class


def test_keys_are_stable_unique_and_dotless():
    listing = _listing()
    plan = plan_dataset(listing, PlanOptions(shard_size=50))
    keys = [key for s in plan.shards for key, _ in s.samples]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    item = listing.items[0]
    assert sample_key(item, listing.classes) == sample_key(Item(item.source, "s3://elsewhere/x", (0,)), ["c0"])
    assert sample_key(Item("a/b.jpg", "", (0,)), ["dotted.name with space"]).startswith("dotted_name_with_space-")


def test_bad_options_are_refused_by_name():
    with pytest.raises(PlanError, match="--shard-size"):
        plan_dataset(_listing(), PlanOptions(shard_size=0))
    with pytest.raises(PlanError, match="not both"):
        plan_dataset(_listing(), PlanOptions(val_per_class=2, val_fraction=0.1))
    with pytest.raises(PlanError, match="--val-fraction"):
        plan_dataset(_listing(), PlanOptions(val_fraction=1.5))


@pytest.fixture(scope="module")
def manifest_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    make_sample_data(str(root), "manifest", classes=5, per_class=8, bad=7, seed=3)
    return root


def test_manifest_formats_give_the_same_listing(manifest_source):
    rows = [json.loads(line) for line in (manifest_source / "manifest.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), manifest_source / "manifest.parquet")
    csv_lines = ["path,labels,id,note"] + [f"{r['path']},{'|'.join(r['labels'])},{r['id']},{r['note']}" for r in rows]
    (manifest_source / "manifest.csv").write_text("\n".join(csv_lines) + "\n")
    listings = {fmt: list_source(str(manifest_source / f"manifest.{fmt}")) for fmt in ("jsonl", "parquet", "csv")}
    for listing in listings.values():
        assert listing.layout == "manifest" and listing.multi_label
        assert listing.classes == [f"class{c:03d}" for c in range(5)]
        assert len(listing.items) == 5 * 8 + 7
    as_tuples = {fmt: [(i.source, i.labels) for i in lst.items] for fmt, lst in listings.items()}
    assert as_tuples["jsonl"] == as_tuples["parquet"] == as_tuples["csv"]
    multi = [i for i in listings["jsonl"].items if len(i.labels) > 1]
    assert multi and all(2 <= len(i.labels) <= 3 for i in multi)
    assert listings["jsonl"].items[0].fields["note"].startswith("synthetic")  # other columns are kept


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
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    listing = list_source(str(tmp_path / "m.jsonl"), classes_file=str(tmp_path / "classes.txt"))
    assert listing.classes == ["zebra", "apple", "mango"]
    assert {i.source: i.labels for i in listing.items} == {"a.jpg": (1,), "b.jpg": (0, 2), "s3://bucket/e.jpg": (0,)}
    assert listing.items[1].fields == {"caption": "two fruits"}
    assert listing.items[2].url == "s3://bucket/e.jpg"
    assert sorted((r["source"], r["reason"]) for r in listing.rejected) == [
        ("a.jpg", "duplicate"), ("c.jpg", "unknown-class"), ("d.jpg", "no-label")]
    assert listing.inputs == len(rows)

    (tmp_path / "idx.csv").write_text("file,label\nx.jpg,2\ny.jpg,0|1\n")
    by_index = list_source(str(tmp_path / "idx.csv"))
    assert by_index.classes == ["0", "1", "2"] and [i.labels for i in by_index.items] == [(2,), (0, 1)]


def test_manifest_without_needed_columns_says_which(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image_path": "a.jpg", "label": "x"}) + "\n")
    with pytest.raises(SourceError, match="needs a path column"):
        list_source(str(tmp_path / "m.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg", "label": "x"}\nnot json\n')
    with pytest.raises(SourceError, match="line 2"):
        list_source(str(tmp_path / "bad.jsonl"))


def test_imagefolder_and_i21k_tars_are_detected_and_listed(tmp_path):
    make_sample_data(str(tmp_path / "folder"), "imagefolder", classes=3, per_class=4, bad=2)
    (tmp_path / "folder" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "folder" / "README.txt").write_text("loose file")
    listing = list_source(str(tmp_path / "folder"))
    assert listing.layout == "imagefolder" and listing.classes == ["class000", "class001", "class002"]
    assert len(listing.items) == 14 and listing.items == sorted(listing.items, key=lambda i: i.source)
    assert len(listing.notes) == 2  # the hidden and the loose file are ignored out loud

    make_sample_data(str(tmp_path / "tars"), "i21k-tars", classes=3, per_class=4, seed=1)
    assert detect_layout(str(tmp_path / "tars")) == "i21k-tars"
    tars = list_source(str(tmp_path / "tars"))
    first = tars.items[0]
    assert first.source.startswith(tars.classes[0] + ".tar/") and first.offset > 0
    with tarfile.open(tmp_path / "tars" / f"{tars.classes[0]}.tar") as tar:
        assert read_item(first) == tar.extractfile(first.source.split("/", 1)[1]).read()


@pytest.mark.parametrize("cut, listed, reason", [(7780, 3, "unreadable"), (7380, 2, "truncated")])
def test_truncated_tar_keeps_the_members_before_the_damage(tmp_path, cut, listed, reason):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"n0001_{i}.jpg")
            info.size = 3000
            tar.addfile(info, io.BytesIO(bytes(3000)))
    # 7780: inside the third member's data; 7380: inside the third member's header.
    (tmp_path / "n0001.tar").write_bytes(buf.getvalue()[:cut])
    listing = list_source(str(tmp_path), layout="i21k-tars")
    assert len(listing.items) == listed
    assert [r["reason"] for r in listing.rejected] == [reason]  # the lost rest is reported, never silent
    assert read_item(listing.items[0]) == bytes(3000)
    if listed == 3:
        with pytest.raises(Rejected) as info:
            read_item(listing.items[2])
        assert info.value.reason == "truncated"


def test_unknown_layout_and_missing_source_are_clear(tmp_path):
    with pytest.raises(SourceError, match="no such file or folder"):
        list_source(str(tmp_path / "nope"))
    for layout, url in (("imagefolder", tmp_path / "nope"), ("i21k-tars", tmp_path / "nope"),
                        ("manifest", tmp_path / "nope" / "m.jsonl"), ("manifest", tmp_path / "nope" / "m.parquet")):
        with pytest.raises(SourceError, match=f"^{re.escape(str(url))}: "):
            list_source(str(url), layout=layout)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.tar").write_bytes(b"")
    (tmp_path / "mixed" / "cls").mkdir()
    with pytest.raises(SourceError, match="--layout"):
        list_source(str(tmp_path / "mixed"))


def test_sample_data_is_deterministic_for_a_seed(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        make_sample_data(str(tmp_path / name), "i21k-tars", classes=2, per_class=6, bad=3, seed=seed)
    assert files(tmp_path / "a") == files(tmp_path / "b") != files(tmp_path / "c")

