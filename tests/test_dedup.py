"""`mixer prepare --dedup-against`: a source holding near-copies of reference images (cropped, resized, re-encoded,
recoloured) among many other pictures, prepared on the test cluster: the copies are left out and named, the others
kept, the same bytes on a re-run, the same shards whether the reference set is a folder or a prepared dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import dedup
from data_prep.sample_data import encode, near_copy, photo
from pipeline import cli

REFERENCES, COPIES, OTHERS = 200, 100, 1000


@pytest.fixture(scope="module")
def collection(ray_cluster, tmp_path_factory) -> dict[str, Path]:
    """references/photos/ref-III.jpg (200 pictures); source/<a|b>/: copy-III.* (near-copies of references 0-99) among
    other-JJJJ.jpg (1,000 other pictures); and the source prepared against the references."""
    root = tmp_path_factory.mktemp("dedup")
    rng = np.random.default_rng(7)
    refs = [photo(rng) for _ in range(REFERENCES)]
    for i, pixels in enumerate(refs):
        _write(root / "references" / "photos" / f"ref-{i:03d}.jpg", encode(pixels, "jpeg")[0])
    for i in range(COPIES):
        data, ext = near_copy(refs[i], rng)
        _write(root / "source" / "ab"[i % 2] / f"copy-{i:03d}.{ext}", data)
    for j in range(OTHERS):
        _write(root / "source" / "ab"[j % 2] / f"other-{j:04d}.jpg", encode(photo(rng), "jpeg")[0])
    args = ["--shard-size", "100", "--val-per-class", "20", "--no-progress"]
    assert cli.main(["prepare", str(root / "source"), str(root / "ds"), *args, "--dedup-against",
                     str(root / "references")]) == 0
    return {"root": root, "args": args}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "_progress"}


def _near_duplicates(ds: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (ds / "rejected.jsonl").read_text().splitlines()]
    return {Path(r["source"]).stem: r for r in lines if r["reason"] == "near-duplicate"}


def test_planted_copies_are_left_out_naming_their_reference_and_other_pictures_kept(collection, record_property):
    root = collection["root"]
    found = _near_duplicates(root / "ds")
    copies = {k: r for k, r in found.items() if k.startswith("copy-")}
    false = sorted(k for k in found if k.startswith("other-"))
    recall, flagged = len(copies) / COPIES, len(false) / OTHERS
    record_property("summary", f"de-duplication: {len(copies)}/{COPIES} planted copies found (recall {recall:.1%}), "
                               f"{len(false)}/{OTHERS} other pictures flagged ({flagged:.2%})")
    assert recall >= 0.95, sorted(set(f"copy-{i:03d}" for i in range(COPIES)) - set(copies))
    assert flagged <= 0.005, false
    for key, record in copies.items():  # each copy matched to the picture it was made from
        assert record["match"] == f"{root / 'references'}/photos/ref-{key[5:]}.jpg", record
        assert record["reference_set"] == str(root / "references")
        assert "a near-duplicate of" in record["detail"] and "Hamming distance" in record["detail"]
    info = json.loads((root / "ds" / "dataset.json").read_text())
    assert info["source"]["dedup_against"] == {str(root / "references"): {"references": REFERENCES,
                                                                         "near_duplicates": len(found)}}
    assert info["inputs"] == COPIES + OTHERS and info["rejected"] == len(found)


def test_a_rerun_gives_the_same_bytes_and_a_prepared_reference_set_the_same_shards(collection):
    root, args = collection["root"], collection["args"]
    assert cli.main(["prepare", str(root / "source"), str(root / "again"), *args, "--dedup-against",
                     str(root / "references")]) == 0
    assert _files(root / "again") == _files(root / "ds")

    assert cli.main(["prepare", str(root / "references"), str(root / "refs-ds"), "--shard-size", "50",
                     "--no-progress"]) == 0
    assert cli.main(["prepare", str(root / "source"), str(root / "against-ds"), *args, "--dedup-against",
                     str(root / "refs-ds")]) == 0
    shards = {k: v for k, v in _files(root / "against-ds").items() if k.endswith(".tar")}
    assert shards == {k: v for k, v in _files(root / "ds").items() if k.endswith(".tar")}
    matches = {k: r["match"] for k, r in _near_duplicates(root / "against-ds").items()}
    assert matches.keys() == _near_duplicates(root / "ds").keys()
    assert all(m.startswith(f"{root / 'refs-ds'}/") for m in matches.values())


def test_a_changed_reference_set_is_refused_on_a_rerun(collection, tmp_path, capsys):
    root, args = collection["root"], collection["args"]
    _write(tmp_path / "one.jpg", encode(photo(np.random.default_rng(0)), "jpeg")[0])
    capsys.readouterr()
    assert cli.main(["prepare", str(root / "source"), str(root / "ds"), *args, "--dedup-against",
                     str(tmp_path)]) == 2
    assert f"holds a run made with other options (--dedup-against was ['{root / 'references'}']" in (
        capsys.readouterr().err)


def test_a_reference_set_without_images_is_refused_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(dedup.DedupError, match=rf"--dedup-against {tmp_path}: neither a prepared dataset"):
        dedup._units(str(tmp_path))


def test_fingerprints_ignore_re_encoding_and_brightness_but_not_another_picture():
    rng = np.random.default_rng(3)
    a, b = photo(rng), photo(rng)
    base = dedup.fingerprint(encode(a, "jpeg")[0])
    brighter = np.clip(a.astype(int) + 12, 0, 255).astype(np.uint8)
    for variant in (encode(a, "png")[0], encode(brighter, "webp")[0]):
        coarse, fine = dedup.fingerprint(variant)
        assert int(np.bitwise_count(base[0] ^ coarse)) <= 4 and int(np.bitwise_count(base[1] ^ fine).sum()) <= 24
    other = dedup.fingerprint(encode(b, "jpeg")[0])
    assert int(np.bitwise_count(base[1] ^ other[1]).sum()) > dedup.FINE_MAX


@pytest.mark.parametrize("width, height", [(700, 520), (1100, 260), (330, 100), (285, 190), (60, 40), (6, 300)])
@pytest.mark.parametrize("grey, progressive", [(False, False), (True, True)])
def test_a_jpeg_is_hashed_from_the_pixels_of_pils_draft_mode(width, height, grey, progressive):
    """A sample's JPEG is decoded by simplejpeg at the scale PIL's draft mode picks (1/8 to 1, sides of at least
    64): the hashes are those of PIL's decode, the one reference images go through."""
    pixels = np.asarray(Image.fromarray(photo(np.random.default_rng(width))).resize((width, height)))
    buf = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if grey else pixels).save(buf, "JPEG", quality=85, progressive=progressive)
    data = buf.getvalue()
    grey = dedup._jpeg_grey(data)
    if min(width, height) < 8:
        assert grey is None  # PIL's path: libjpeg's 7/8 scale would give the full size
    else:
        assert np.array_equal(grey, np.asarray(dedup._grey(data, dedup.SIDE)))
    coarse, fine = dedup.fingerprint(data)
    pil_coarse, pil_fine = dedup._bits(dedup._grey(data, dedup.SIDE))
    assert coarse == pil_coarse and fine.tolist() == pil_fine.tolist()


def test_a_run_recorded_before_dedup_existed_resumes_and_one_with_references_is_refused(tmp_path):
    from types import SimpleNamespace

    from data_prep.prepare import PrepareError, PrepareOptions, _claim
    from pipeline import storage

    plan = SimpleNamespace(layout="imagefolder", inputs=10, shards=[1], digest="abc")
    dest = str(tmp_path / "ds")
    _claim(dest, "raw", plan, PrepareOptions())
    record = storage.read_json(f"{dest}/_progress/plan.json")
    del record["dedup_against"]  # as a release without --dedup-against wrote it
    storage.write_json_atomic(f"{dest}/_progress/plan.json", record)
    _claim(dest, "raw", plan, PrepareOptions())
    with pytest.raises(PrepareError, match=r"--dedup-against was \[\], now \['refs'\]"):
        _claim(dest, "raw", plan, PrepareOptions(dedup_against=("refs",)))


def test_a_run_whose_images_were_made_by_another_image_path_is_refused(tmp_path):
    """Its shards would mix two resizes in one dataset: a record from before `images.VERSION` is the first path."""
    from types import SimpleNamespace

    from data_prep.images import VERSION
    from data_prep.prepare import PrepareError, PrepareOptions, _claim
    from pipeline import storage

    plan = SimpleNamespace(layout="imagefolder", inputs=10, shards=[1], digest="abc")
    dest = str(tmp_path / "ds")
    _claim(dest, "raw", plan, PrepareOptions())
    record = storage.read_json(f"{dest}/_progress/plan.json")
    assert record["image_version"] == VERSION > 1
    _claim(dest, "raw", plan, PrepareOptions())  # the same release resumes
    del record["image_version"]
    storage.write_json_atomic(f"{dest}/_progress/plan.json", record)
    with pytest.raises(PrepareError, match=f"images were made by image path 1; this release makes them with image "
                                           f"path {VERSION}, and one dataset must not mix the two"):
        _claim(dest, "raw", plan, PrepareOptions())
