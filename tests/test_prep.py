"""`mixer prepare` end to end on a real two-node Ray cluster, with sources and datasets both on local disk and on
S3 (moto's server): counts reconcile, shards are byte-identical across runs and storage, they read back with the
stock webdataset library and `tar`, and a run killed at the driver or at a worker resumes to the same bytes."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import webdataset as wds
from PIL import Image

from data_prep.plan import Runner, plan_source
from data_prep.prepare import PrepareError, PrepareOptions, prepare
from data_prep.sample_data import make_sample_data
from data_prep.shard import shard_url, stats_url
from data_prep.sources import partitions
from data_prep.verify import verify
from pipeline import cli, dataset_json, storage

REPO = Path(__file__).resolve().parents[1]
OPTIONS = PrepareOptions(max_size=40, quality=90, shard_size=8, val_per_class=2, seed=5)
# Reasons each bad kind of make_sample_data must be rejected with.
BAD_REASONS = {"truncated-jpeg": "truncated", "random-bytes": "not-image", "empty": "empty", "text": "not-image",
               "zero-size-png": "zero-size", "corrupt-jpeg": "corrupt", "missing": "missing"}
SOURCES = {
    # layout: (where the source lives, classes, per class, bad files)
    "imagefolder": ("local", 6, 12, 6),
    "i21k-tars": ("s3", 4, 12, 6),
    "manifest": ("s3", 5, 12, 7),
}


@pytest.fixture(scope="module")
def s3_root(s3_endpoint) -> str:
    import boto3

    name = f"prep-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory, s3_root) -> dict[str, dict]:
    local = tmp_path_factory.mktemp("prep_sources")
    made = {}
    for layout, (where, classes, per_class, bad) in SOURCES.items():
        root = f"{s3_root}/raw/{layout}" if where == "s3" else str(local / layout)
        fmt = "parquet" if layout == "manifest" else "jsonl"
        summary = make_sample_data(root, layout, classes, per_class, bad=bad, seed=11, manifest_format=fmt)
        url = f"{root}/manifest.{fmt}" if layout == "manifest" else root
        bad_reasons = Counter()
        for kind, n in summary["kinds"].items():
            if kind.startswith("bad:"):
                bad_reasons[BAD_REASONS[kind[4:]]] += n
        made[layout] = {"url": url, "good": classes * per_class, "bad": bad, "reasons": dict(bad_reasons)}
    return made


@pytest.fixture(scope="module")
def reference(ray_cluster, sources, tmp_path_factory) -> str:
    """An uninterrupted local run of the ImageFolder source: what every resumed run must reproduce."""
    dest = str(tmp_path_factory.mktemp("prep_reference") / "ds")
    prepare(sources["imagefolder"]["url"], dest, OPTIONS, progress=False)
    return dest


def _shard_bytes(url: str) -> dict[str, bytes]:
    info = dataset_json.load(url)
    return {s.name: storage.read_bytes(info.shard_url(s)) for sp in info.splits.values() for s in sp.shards}


def _assert_same_dataset(url: str, reference_url: str) -> None:
    assert storage.read_bytes(f"{url}/dataset.json") == storage.read_bytes(f"{reference_url}/dataset.json")
    assert _shard_bytes(url) == _shard_bytes(reference_url)
    assert storage.read_bytes(f"{url}/rejected.jsonl") == storage.read_bytes(f"{reference_url}/rejected.jsonl")


def _assert_reconciles(url: str, made: dict) -> dataset_json.DatasetInfo:
    info = dataset_json.load(url)
    assert info.inputs == made["good"] + made["bad"] == info.samples + info.rejected
    assert info.samples == made["good"] and info.rejected == made["bad"]
    rejected = [json.loads(line) for line in storage.read_bytes(f"{url}/rejected.jsonl").splitlines()]
    assert dict(Counter(r["reason"] for r in rejected)) == made["reasons"]
    assert all("_bad" in r["source"] and len(r["detail"]) > 10 for r in rejected)
    return info


def _assert_reads_back_locally(url: str, info: dataset_json.DatasetInfo) -> None:
    paths = [str(Path(url) / s.name) for sp in info.splits.values() for s in sp.shards]
    for path, shard in zip(paths, [s for sp in info.splits.values() for s in sp.shards], strict=True):
        names = subprocess.run(["tar", "tf", path], check=True, capture_output=True, text=True).stdout.split()
        assert len(names) == shard.samples * (2 if info.multi_label else 3)
    samples = list(wds.WebDataset(paths, shardshuffle=False, empty_check=False))
    assert len(samples) == info.samples and len({s["__key__"] for s in samples}) == info.samples
    multi = 0
    for sample in samples:
        im = Image.open(io.BytesIO(sample["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and min(im.size) <= OPTIONS.max_size
        meta = json.loads(sample["json"])
        labels = meta["labels"] if info.multi_label else [int(sample["cls"])]
        assert all(0 <= label < info.num_classes for label in labels)
        multi += len(labels) > 1
    assert (multi > 0) == info.multi_label
    assert not [p for p in Path(url).rglob("*") if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("layout", list(SOURCES))
def test_each_layout_prepares_to_local_and_s3_with_identical_bytes(layout, sources, reference, ray_cluster,
                                                                    s3_root, tmp_path):
    made = sources[layout]
    local = reference if layout == "imagefolder" else str(tmp_path / "ds")
    if layout != "imagefolder":
        prepare(made["url"], local, OPTIONS, progress=False)
    remote = f"{s3_root}/datasets/{layout}"
    summary = prepare(made["url"], remote, OPTIONS, workers=4, progress=False)
    assert summary["shards_written"] == sum(summary["shards"].values()) and summary["shards_skipped"] == 0

    info = _assert_reconciles(local, made)
    assert info.multi_label == (layout == "manifest") and info.source["layout"] == layout
    assert set(info.splits) == {"train", "val"}
    assert verify(local)[0] == [] and verify(remote)[0] == []
    _assert_same_dataset(remote, local)  # two runs, two stores, the same bytes
    _assert_reads_back_locally(local, info)


def _committed_progress(dest: Path) -> list[Path]:
    """The progress records of finished shards: not the temporaries of records being written (`.tmp-*`), which a
    task ended with its driver removes."""
    return [p for p in (dest / "_progress").glob("*-0*.json") if not p.name.startswith(".")]


def test_resume_after_the_driver_is_killed(sources, reference, ray_cluster, tmp_path):
    dest = tmp_path / "ds"
    command = [sys.executable, "-m", "pipeline.cli", "prepare", sources["imagefolder"]["url"], str(dest),
               "--max-size", "40", "--quality", "90", "--shard-size", "8", "--val-per-class", "2", "--seed", "5",
               "--ray-address", ray_cluster.address, "--workers", "1", "--no-progress"]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while not _committed_progress(dest):
        assert driver.poll() is None, driver.stdout.read().decode()
        assert time.monotonic() < deadline, "the driver wrote no shard in 90 s"
        time.sleep(0.01)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (dest / "dataset.json").exists()
    done_before = len(_committed_progress(dest))

    summary = prepare(sources["imagefolder"]["url"], str(dest), OPTIONS, progress=False)
    assert summary["shards_skipped"] >= done_before >= 1
    assert summary["shards_written"] >= 1  # it really was part-way
    _assert_same_dataset(str(dest), reference)
    assert not [p for p in dest.rglob("*") if p.name.startswith(".tmp-")]


def _worker_writing(shard: str) -> psutil.Process | None:
    """The Ray worker inside the task that writes `shard`: its process title names the task, and it holds the
    shard's temporary tar open. Only this session's cluster is looked at (its raylets are this process's children),
    never another's that prepares a shard of the same name."""
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] == ["ray::write_shard"] and any(
                    Path(f.path).name == shard and "mixer-shard-" in f.path for f in proc.open_files()):
                return proc
        except psutil.Error:  # it finished or died while we looked
            continue
    return None


def _replace_fifo_with_empty_file(path: Path, wake_reader: bool) -> None:
    """Put the empty input back. A reader blocked opening the FIFO keeps waiting on it after the swap unless woken
    (it then fails its read, and its shard is retried)."""
    if not stat.S_ISFIFO(path.lstat().st_mode):
        return
    writer = None
    if wake_reader:
        try:
            writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is waiting
            pass
    path.unlink()
    path.write_bytes(b"")
    if writer is not None:
        os.close(writer)


def _kill_mid_shard(fifo: Path, dest: Path, shard: str, seen: dict) -> None:
    """Kill the worker writing `shard` from outside, then let the retry read what the input was: an empty file."""
    try:
        deadline = time.monotonic() + 300
        while (worker := _worker_writing(shard)) is None:
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        seen["title"] = worker.cmdline()[0]
        seen["published"] = [url for url in (shard_url(str(dest), shard), stats_url(str(dest), shard))
                             if os.path.exists(url)]
        _replace_fifo_with_empty_file(fifo, wake_reader=False)  # before the kill, so the retry finds the file
        worker.kill()
        worker.wait(120)
        seen["killed"] = worker.pid
    finally:
        _replace_fifo_with_empty_file(fifo, wake_reader=True)  # never leave the run waiting for ever


def test_resume_after_a_worker_is_killed_mid_shard(sources, reference, ray_cluster, tmp_path, capsys):
    source = Path(sources["imagefolder"]["url"])
    rejected = [json.loads(line) for line in (Path(reference) / "rejected.jsonl").read_text().splitlines()]
    empty = next(r["source"] for r in rejected if r["reason"] == "empty")
    plan = plan_source(partitions(str(source)), OPTIONS, runner=Runner(ray=False))
    shard = next(s.name for s in plan.shards if any(item.source == empty for _, item in plan.shard_plan(s).samples))
    dest = tmp_path / "ds"
    # The empty input becomes a FIFO: it lists the same (0 bytes), and the task that reads it waits inside its
    # shard for a writer that never comes, however fast or slow this machine is.
    (source / empty).unlink()
    os.mkfifo(source / empty)
    seen: dict = {}
    killer = threading.Thread(target=_kill_mid_shard, args=(source / empty, dest, shard, seen))
    killer.start()
    try:
        prepare(str(source), str(dest), OPTIONS, workers=2, progress=False)
    finally:
        killer.join()
        _replace_fifo_with_empty_file(source / empty, wake_reader=True)
    assert seen.get("title") == "ray::write_shard" and "killed" in seen, seen
    assert seen["published"] == []  # killed with its shard neither published nor recorded
    assert f"{shard}: attempt 1 failed" in capsys.readouterr().err
    _assert_same_dataset(str(dest), reference)
    assert not [p for p in dest.rglob("*") if p.name.startswith(".tmp-")]


def test_verify_names_a_damaged_shard_and_a_rerun_repairs_it(sources, reference, ray_cluster, tmp_path, capsys):
    dest = tmp_path / "ds"
    shutil.copytree(reference, dest)
    shard = dest / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cli.main(["verify", str(dest)]) == 1
    out = capsys.readouterr().out
    assert "train-000001.tar: sha256" in out and "train-000000.tar" not in out

    summary = prepare(sources["imagefolder"]["url"], str(dest), OPTIONS, progress=False)
    assert summary["shards_written"] == 1
    assert cli.main(["verify", str(dest)]) == 0
    _assert_same_dataset(str(dest), reference)

    other = PrepareOptions(**{**OPTIONS.__dict__, "max_size": 64})
    with pytest.raises(PrepareError, match="--max-size was 40, now 64"):
        prepare(sources["imagefolder"]["url"], str(dest), other, progress=False)


def test_verify_catches_count_and_label_mismatches(reference, tmp_path):
    dest = tmp_path / "ds"
    shutil.copytree(reference, dest)
    meta = json.loads((dest / "dataset.json").read_text())
    meta["splits"]["val"]["shards"][0]["samples"] += 1
    meta["classes"] = meta["classes"][:2]  # labels 2.. are now out of range
    (dest / "dataset.json").write_text(json.dumps(meta))
    problems, _ = verify(str(dest))
    assert any(p.startswith("val-000000.tar:") and "samples" in p for p in problems)
    assert any("outside 0..1" in p for p in problems)
    assert any("inputs" in p for p in problems)


def test_sample_images_are_learnable_by_class(reference):
    """Mean colour at 32x32 already separates the classes: a nearest-centroid rule is near perfect."""
    info = dataset_json.load(reference)
    paths = [str(Path(reference) / s.name) for s in info.split("train").shards]
    xs, ys = [], []
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        im = Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((32, 32))
        xs.append(np.asarray(im, np.float32).mean(axis=(0, 1)))
        ys.append(int(sample["cls"]))
    xs, ys = np.stack(xs), np.array(ys)
    centroids = np.stack([xs[ys == c].mean(0) for c in range(info.num_classes)])
    predicted = np.argmin(((xs[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == ys).mean() > 0.8


def test_cli_reports_errors_on_stderr_with_status_2(tmp_path, capsys):
    """Every mistake below is found before Ray starts; `mixer` prints it once, as `error: ...`."""
    missing = str(tmp_path / "nope" / "m.jsonl")
    dest = str(tmp_path / "ds")
    cases = [
        (["prepare", missing, dest, "--layout", "manifest"], f"{missing}: not found"),
        (["prepare", str(tmp_path), dest, "--max-size", "0"], "--max-size must be at least 1"),
        (["prepare", str(tmp_path), dest, "--shard-size", "0"], "--shard-size must be at least 1"),
        (["make-sample-data", str(tmp_path / "raw"), "--layout", "imagefolder", "--classes", "0", "--per-class", "1"],
         "--classes and --per-class must be at least 1"),
        (["verify", str(tmp_path / "nope")], "dataset.json does not exist"),
    ]
    for argv, says in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err, err


def _files(url: str) -> dict[str, bytes]:
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.parent.name != "_progress"}


def test_same_bytes_whatever_the_workers_buckets_and_manifest_parts(ray_cluster, tmp_path, monkeypatch):
    """One manifest, planned with 1 and with 4 workers, in one bucket and in many, as one part and as 7 parts at
    the same URL: the same shards, dataset.json and rejected.jsonl, byte for byte."""
    import data_prep.plan

    source = tmp_path / "raw"
    make_sample_data(str(source), "manifest", classes=4, per_class=14, bad=5, seed=2)
    whole = (source / "manifest.jsonl").read_text().splitlines(keepends=True)
    options = PrepareOptions(max_size=40, quality=90, shard_size=9, val_per_class=2, seed=3)
    made = {}
    for run, workers in (("one-part-1-worker", 1), ("one-part-4-workers", 4)):
        made[run] = prepare(str(source), str(tmp_path / run), PrepareOptions(**{**options.__dict__,
                            "layout": "manifest"}), workers=workers, progress=False)
    (source / "manifest.jsonl").unlink()
    cuts = np.linspace(0, len(whole), 8).astype(int)
    for part, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        (source / f"part-{part:02d}.jsonl").write_text("".join(whole[a:b]))
    monkeypatch.setattr(data_prep.plan, "ROWS_PER_BUCKET", 5)  # many buckets instead of one
    monkeypatch.setattr(data_prep.plan, "ROWS_PER_LIST_OUTPUT", 1)  # and a list task per part
    made["7-parts-4-workers"] = prepare(str(source), str(tmp_path / "7-parts-4-workers"),
                                        PrepareOptions(**{**options.__dict__, "layout": "manifest"}), workers=4,
                                        progress=False)
    reference = _files(str(tmp_path / "one-part-1-worker"))
    assert {"dataset.json", "rejected.jsonl", "train-000000.tar", "val-000000.tar"} <= set(reference)
    assert made["one-part-1-worker"]["rejected"] and made["one-part-1-worker"]["samples"]["val"] > 0
    for run in ("one-part-4-workers", "7-parts-4-workers"):
        assert _files(str(tmp_path / run)) == reference, run
        assert made[run]["plan_sha256"] == made["one-part-1-worker"]["plan_sha256"]


def test_plan_only_prints_the_plan_and_writes_only_its_record(sources, reference, ray_cluster, tmp_path, capsys):
    dest = tmp_path / "ds"
    summary = prepare(sources["imagefolder"]["url"], str(dest), OPTIONS, plan_only=True)
    out = capsys.readouterr().out
    assert [str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()] == ["_progress/plan.json"]
    made = dataset_json.load(reference)
    recorded = json.loads((Path(reference) / "_progress" / "plan.json").read_text())
    assert summary["plan_sha256"] == recorded["plan_sha256"] and summary["plan_sha256"] in out
    assert summary["inputs"] == made.inputs and summary["classes"] == made.num_classes
    assert summary["shards"] == {name: len(split.shards) for name, split in made.splits.items()}
    assert "run the same command without --plan-only" in out

    # The real run that follows takes up the plan as recorded and makes the same dataset.
    prepare(sources["imagefolder"]["url"], str(dest), OPTIONS, progress=False)
    _assert_same_dataset(str(dest), reference)


def test_rerun_over_a_complete_dataset_on_s3_reads_no_shard_and_redoes_a_replaced_one(sources, ray_cluster, s3_root,
                                                                                      s3_endpoint):
    from tests.s3_faults import FaultPlan, S3FaultProxy
    from tests.test_faults import clients_through

    dest = f"{s3_root}/datasets/rerun"
    first = prepare(sources["imagefolder"]["url"], dest, OPTIONS, workers=4, progress=False)
    shards = [s.name for sp in dataset_json.load(dest).splits.values() for s in sp.shards]
    before = _shard_bytes(dest)

    def shard_gets(proxy: S3FaultProxy) -> list[str]:
        return [target for (method, target, _), n in proxy.seen().items() for _ in range(n)
                if method == "GET" and target.split("?")[0].endswith(".tar")]

    with S3FaultProxy(s3_endpoint, FaultPlan(rate=0.0)) as proxy, clients_through(proxy.endpoint):
        again = prepare(sources["imagefolder"]["url"], dest, OPTIONS, workers=4, progress=False)
        assert again["shards_skipped"] == len(shards) and again["shards_written"] == 0
        assert shard_gets(proxy) == []  # resumed from stats and one listing: no shard's bytes read
        assert proxy.seen()  # and the driver's traffic did go through the proxy

        replaced = shards[1]
        damaged = bytearray(before[replaced])
        damaged[600] ^= 0xFF  # inside the first member's bytes: same size, other content
        storage.write_bytes_atomic(f"{dest}/{replaced}", bytes(damaged))
        redone = prepare(sources["imagefolder"]["url"], dest, OPTIONS, workers=4, progress=False)
    assert redone["shards_written"] == 1 and redone["shards_skipped"] == len(shards) - 1
    assert _shard_bytes(dest) == before and redone["plan_sha256"] == first["plan_sha256"]
    assert verify(dest)[0] == []


def _images_of(source: Path) -> list[tuple[str, str, bytes]]:
    """(class, file name, bytes) of an ImageFolder source, in a stable order."""
    return [(p.parent.name, p.name, p.read_bytes()) for p in sorted(source.glob("*/*")) if p.is_file()]


@pytest.mark.parametrize("layout", ["wds", "parquet-with-images"])
def test_webdataset_tars_and_parquet_with_embedded_images_are_resharded(layout, sources, ray_cluster, tmp_path):
    """The same images, held as WebDataset tars (timm's ImageNet-22k shards: .jpg with a .cls index) or inside
    Parquet parts (the Hugging Face layout: an image struct of bytes and path, a label column), become the same
    samples: every good image a sample with its class, every bad one refused for its reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    made = sources["imagefolder"]
    images = _images_of(Path(made["url"]))
    classes = sorted({c for c, _, _ in images})
    raw = tmp_path / "raw"
    raw.mkdir()
    if layout == "wds":
        for part in range(3):
            with wds.TarWriter(str(raw / f"in22k-{part:04d}.tar")) as sink:
                for c, name, data in images[part::3]:
                    sink.write({"__key__": f"{c}_{name.split('.')[0]}", "jpg": data,
                                "cls": str(classes.index(c)).encode()})
        (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")  # .cls holds indices; names come from here
        options = PrepareOptions(**{**OPTIONS.__dict__, "layout": "wds", "classes_file": str(tmp_path / "classes.txt")})
    else:
        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        schema = pa.schema([("image", image), ("label", pa.int64())], metadata={
            b"huggingface": json.dumps({"info": {"features": {"label": {"names": classes}}}}).encode()})
        for part in range(2):
            rows = images[part::2]
            table = pa.table({"image": pa.array([{"bytes": d, "path": f"{c}/{n}"} for c, n, d in rows], image),
                              "label": [classes.index(c) for c, _, _ in rows]}, schema=schema)
            pq.write_table(table, raw / f"train-{part:05d}-of-00002.parquet", row_group_size=10)
        options = OPTIONS
    dest = tmp_path / "ds"
    prepare(str(raw), str(dest), options, progress=False)
    info = _assert_reconciles(str(dest), made)
    assert info.classes == classes and info.source["layout"] == options.layout.replace("auto", "manifest")
    assert verify(str(dest))[0] == []
    by_source = {}
    for sample in wds.WebDataset([str(dest / s.name) for sp in info.splits.values() for s in sp.shards],
                                 shardshuffle=False, empty_check=False):
        by_source[json.loads(sample["json"])["source"]] = int(sample["cls"])
    assert len(by_source) == made["good"]
    for source, label in by_source.items():
        name = source.split("/", 1)[1] if layout == "wds" else source
        assert classes[label] == name.split("_" if layout == "wds" else "/")[0], source
