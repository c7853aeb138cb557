"""Brief S3 faults must not kill a job: storage retries them, shard reads stream on through them, a commit's tidy-up
and metrics publishing never fail a run, and shards are checked against dataset.json as they stream.

The S3 tests put tests/s3_faults.py's proxy between the clients and moto's server. The end-to-end test runs
`mixer prepare` (Ray tasks) through it and reads the dataset back as training does, and checks that the shards,
dataset.json and every batch equal those of the same work done without faults; it prints a table of the faults
injected per phase. tests/test_resume.py stops, resumes and exports a training run (Ray Train, 2 workers) through
the same proxy.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import tarfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline import data, storage
from pipeline.dataset_json import DatasetError, DatasetInfo, Shard, Split
from tests.s3_faults import KINDS, FaultPlan, Phases, S3FaultProxy, clients_through, ray_through


def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def _translated(status: int, code: str) -> OSError:
    """What s3fs raises for an S3 error: an OSError with the ClientError as its cause."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(status, code))


@pytest.mark.parametrize("error, transient", [
    (lambda: _translated(503, "SlowDown"), True),
    (lambda: _translated(500, "InternalError"), True),
    (lambda: _translated(502, "BadGateway"), True),
    (lambda: _translated(429, "TooManyRequests"), True),
    (lambda: ConnectionResetError(errno.ECONNRESET, "reset by peer"), True),
    (lambda: TimeoutError("read timed out"), True),
    (lambda: storage.IncompleteReadError("cut"), True),
    (lambda: __import__("botocore.exceptions").exceptions.IncompleteReadError(actual_bytes=1, expected_bytes=2),
     True),
    (lambda: _translated(404, "NoSuchKey"), False),
    (lambda: _translated(403, "AccessDenied"), False),
    (lambda: _translated(412, "PreconditionFailed"), False),
    (lambda: _translated(400, "InvalidArgument"), False),
    (lambda: FileNotFoundError("gone"), False),
    (lambda: ValueError("not JSON"), False),
])
def test_transient_errors_are_told_from_permanent_ones(error, transient):
    assert storage.is_transient(error()) is transient


def test_retry_backs_off_within_its_budget_and_leaves_the_global_rng_alone():
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "done"

    random.seed(7)
    expected = random.random()
    random.seed(7)
    assert storage.retry(flaky, what="flaky", budget_s=30) == "done"
    assert random.random() == expected  # jitter comes from its own generator: a seeded run repeats
    assert len(calls) == 3

    started = time.monotonic()
    with pytest.raises(ConnectionResetError) as caught:
        storage.retry(lambda: (_ for _ in ()).throw(ConnectionResetError("down")), what="down", budget_s=0.5)
    assert time.monotonic() - started < 0.5 + storage.FIRST_DELAY_S * 8
    assert "gave up after" in "".join(caught.value.__notes__)
    with pytest.raises(FileNotFoundError):  # permanent: raised at the first attempt
        storage.retry(lambda: (_ for _ in ()).throw(FileNotFoundError("no")), what="missing", budget_s=30)


# ---- storage against a faulty S3 --------------------------------------------------------------------------------

def _new_bucket(endpoint: str) -> str:
    import boto3

    name = f"faults-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_storage_outlasts_faults_its_client_does_not_retry(s3_endpoint, monkeypatch):
    """With botocore's own retries off (AWS_MAX_ATTEMPTS=1), every fault the proxy injects reaches s3fs, and what
    s3fs does not retry (500s, cut bodies, checksum mismatches) reaches pipeline.storage, which must absorb it."""
    monkeypatch.setenv(storage.RETRY_ENV, "60")
    monkeypatch.setattr(storage, "_retry_s", 60.0)
    rng = random.Random(0)
    members = {f"m{i:03d}.bin": rng.randbytes(rng.randrange(1000, 30000)) for i in range(40)}
    blob = _tar(members)
    root = _new_bucket(s3_endpoint)
    raw_failures = Counter()
    with S3FaultProxy(s3_endpoint, FaultPlan(rate=0.3, seed=11)) as proxy, \
            clients_through(proxy.endpoint, AWS_MAX_ATTEMPTS="1"):
        for i in range(3):
            url = storage.join(root, f"obj-{i}.tar")
            storage.write_bytes_atomic(url, blob)
            assert storage.read_bytes(url) == blob
            assert storage.sha256_of(url) == (len(blob), hashlib.sha256(blob).hexdigest())
            with storage.ResilientReader(url, block_size=32 << 10) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                assert {m.name: tar.extractfile(m).read() for m in tar} == members
        local = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"faults-{uuid.uuid4().hex[:8]}")
        try:
            storage.get_file(storage.join(root, "obj-0.tar"), local)
            assert Path(local).read_bytes() == blob
        finally:
            Path(local).unlink(missing_ok=True)
        assert sorted(os.path.basename(n) for n in storage.ls(root)) == [f"obj-{i}.tar" for i in range(3)]
        storage.remove(storage.join(root, "obj-2.tar"))
        assert not storage.exists(storage.join(root, "obj-2.tar"))
        with pytest.raises(FileNotFoundError):  # permanent, through the same faults: not retried for a minute
            storage.read_bytes(storage.join(root, "never-written"))
        # The same reads without pipeline.storage's retries: what the faults do to a bare client.
        fs, _ = storage.filesystem(root)
        for i in range(2):
            try:
                assert fs.cat_file(storage.join(root, f"obj-{i}.tar")[5:]) == blob
            except Exception as e:
                raw_failures[type(e).__name__] += 1
        faults, requests = proxy.snapshot()
    print(f"\nfaults injected {dict(faults)} in {sum(requests.values())} requests; bare s3fs reads that failed "
          f"or came back wrong: {dict(raw_failures)}")
    assert sum(faults.values()) >= 10


def test_a_listing_cut_to_nothing_is_not_an_empty_folder(s3_endpoint, monkeypatch):
    """A 200 listing whose body is cut to nothing parses as an empty folder (a run without checkpoints, a dataset
    without shards) in a bare client; storage's listings take it for the cut it is and ask again."""
    import s3fs

    monkeypatch.setattr(storage, "_retry_s", 30.0)
    root = _new_bucket(s3_endpoint)
    folder = storage.join(root, "checkpoints")
    for name in ("step-000000001", "step-000000002"):
        storage.write_bytes_atomic(storage.join(folder, name, "manifest.json"), b"{}")
    cut_all = FaultPlan(rate=1.0, max_in_a_row=2, kinds=("cut",), cut_fraction=0.0)
    with S3FaultProxy(s3_endpoint, cut_all) as proxy, clients_through(proxy.endpoint):
        bare = s3fs.S3FileSystem(skip_instance_cache=True)
        try:
            seen_bare = bare.ls(folder[5:], detail=False)
        except FileNotFoundError:
            seen_bare = []
        assert seen_bare == []  # the hazard: two committed steps gone from sight
        assert sorted(os.path.basename(n) for n in storage.ls(folder)) == ["step-000000001", "step-000000002"]
        assert proxy.snapshot()[0]["cut"] >= 2


def _shard_dataset(root: str) -> DatasetInfo:
    """Two shards of two tiny JPEG samples; shard 1's recorded sha256 is wrong."""
    shards = []
    for s in range(2):
        members = {}
        for i in range(2):
            buf = io.BytesIO()
            Image.new("RGB", (12, 10), (40 * s, 60 * i, 90)).save(buf, "JPEG")
            members[f"s{s}-{i}.jpg"], members[f"s{s}-{i}.cls"] = buf.getvalue(), str(i).encode()
        blob = _tar(members)
        storage.write_bytes_atomic(storage.join(root, f"val-{s:06d}.tar"), blob)
        digest = hashlib.sha256(blob).hexdigest()
        shards.append(Shard(f"val-{s:06d}.tar", 2, len(blob), digest if s == 0 else digest[::-1]))
    return DatasetInfo(url=root, classes=["a", "b"], multi_label=False, splits={"val": Split(shards)})


def _read_all(info: DatasetInfo) -> int:
    return sum(len(b.keys) for b in data.eval_batches(info, "val", 8, 4, 0, 1))


def test_a_full_shard_read_is_checked_against_its_sha256(tmp_path, monkeypatch, caplog):
    info = _shard_dataset(str(tmp_path / "ds"))
    monkeypatch.setenv(data.VERIFY_ENV, "fail")
    data.set_verify("fail")
    with pytest.raises(DatasetError, match=r"val-000001\.tar: the sha256 of the \d+ bytes read"):
        _read_all(info)
    # A read that stops before the end cannot be checked, and is not.
    assert [i for i, _ in data._read_shard(info, info.split("val").shards[1], None, 1)] == [0]

    data.set_verify("warn")
    with caplog.at_level(logging.WARNING):
        assert _read_all(info) == 4 and _read_all(info) == 4
    warned = [r.getMessage() for r in caplog.records if "sha256" in r.getMessage()]
    assert len(warned) == 1 and "val-000001.tar" in warned[0]  # once per shard

    caplog.clear()
    data.set_verify("off")
    with caplog.at_level(logging.WARNING):
        assert _read_all(info) == 4
    assert not [r for r in caplog.records if "sha256" in r.getMessage()]
    with pytest.raises(ValueError, match="data.verify"):
        data.set_verify("sometimes")


def test_metrics_publishing_never_blocks_or_fails_the_run(s3_endpoint, monkeypatch, caplog):
    """A store that answers nothing but 500s: flushes return at once, a publish gives up with a warning within the
    retry budget (botocore's own retries off, so that its backoff does not stretch the test), and once the store
    answers again the next flush publishes everything."""
    from pipeline.metrics import MetricsLog, read_records

    monkeypatch.setenv(storage.RETRY_ENV, "3")
    monkeypatch.setattr(storage, "_retry_s", 3.0)
    run = storage.join(_new_bucket(s3_endpoint), "run")
    down = FaultPlan(rate=1.0, max_in_a_row=10**9, kinds=("500",))
    with S3FaultProxy(s3_endpoint, down) as proxy, clients_through(proxy.endpoint, AWS_MAX_ATTEMPTS="1"):
        proxy.enabled = False
        metrics = MetricsLog(run, enabled=True, flush_every_s=0.0)
        proxy.enabled = True
        started = time.monotonic()
        for step in range(1, 6):
            metrics.log({"kind": "train", "step": step, "loss": 1.0 / step})  # each one asks for a publish
        metrics.flush()
        assert time.monotonic() - started < 1.0  # a publish waited for would take the 3 s budget
        with caplog.at_level(logging.WARNING, logger="pipeline.metrics"):
            assert metrics.flush(wait=True) is False
        assert any("publishing" in r.getMessage() for r in caplog.records)
        proxy.enabled = False
        metrics.log({"kind": "train", "step": 6, "loss": 0.1})
        metrics.close()
        assert [r["step"] for r in read_records(run)] == [1, 2, 3, 4, 5, 6]

        # Closed while the store is down: no exception, and the lines stay on this machine.
        other = MetricsLog(storage.join(run, "other"), enabled=True)
        proxy.enabled = True
        other.log({"kind": "train", "step": 1, "loss": 1.0})
        other.close()
        kept = Path(other._tb_local) / "metrics.jsonl"
        assert [json.loads(line)["step"] for line in kept.read_text().splitlines()] == [1]


def test_a_failed_tidy_up_after_a_commit_is_a_warning(tmp_path, monkeypatch, caplog):
    """Retention failing after the manifest is written leaves the step committed and the store usable."""
    from pipeline import checkpoint
    from pipeline.checkpoint import CheckpointStore, StepRecord

    store = CheckpointStore(str(tmp_path / "run"), keep_last=1)
    remove = storage.remove

    def refuse_step_1(url: str, recursive: bool = False) -> None:
        if checkpoint.step_name(1) in url:
            raise PermissionError(errno.EACCES, f"{url}: denied")
        remove(url, recursive)

    monkeypatch.setattr(storage, "remove", refuse_step_1)
    for step in (1, 2):
        step_url = store.step_url(step)
        storage.write_bytes_atomic(storage.join(step_url, checkpoint.META), b"{}")
        storage.write_json_atomic(storage.join(step_url, checkpoint.COMMIT_DIR, "n-00000.json"),
                                  {"rank": 0, "files": {checkpoint.META: {"bytes": 2, "sha256": "0" * 64}}})
        with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
            store._commit(StepRecord(step=step, world_size=1, zero_stage=2), "n", 1)
    assert [i.step for i in store.list()] == [1, 2]  # step 1 outlived retention, step 2 is committed
    assert any("retention: could not remove" in r.getMessage() for r in caplog.records)
    assert storage.read_bytes(storage.join(store.url, checkpoint.LATEST)) == b"step-000000002\n"


# ---- end to end -------------------------------------------------------------------------------------------------

def _direct_bytes(s3_endpoint: str, url: str) -> dict[str, bytes]:
    """Every object under `url`, read from moto itself (not through the proxy)."""
    import boto3

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_prepare_and_the_reads_of_a_training_run_come_through_s3_faults(sample_dataset, ray_cluster, s3_endpoint,
                                                                          record_property):
    """`mixer prepare` (Ray tasks) into a bucket through the faults, then a whole epoch of training batches and the
    validation batches read from it through the faults: the same files and the same batches as without faults.
    (A training run stopped, resumed and exported through the faults: tests/test_resume.py.)"""
    from pipeline import cli
    from pipeline.train import stream_config
    from tests.test_data import assert_same, take
    from tests.test_train import tiny_spec

    root = _new_bucket(s3_endpoint)
    ds = storage.join(root, "ds")
    raw = str(Path(sample_dataset).parent / "raw")
    config = stream_config(tiny_spec(sample_dataset, "unused"))

    def batches(url: str) -> tuple[list[data.Batch], list[data.Batch]]:
        info = data.check_dataset(url)
        stream = data.TrainStream(info, config, 0, 1)
        return take(stream, stream.batches_per_epoch), list(data.eval_batches(info, "val", 16, 16, 0, 1))

    train, val = batches(sample_dataset)
    plan = FaultPlan(rate=0.12, seed=3, cover_kinds=True)
    with S3FaultProxy(s3_endpoint, plan) as proxy, ray_through(proxy.endpoint, ray_cluster):
        phases = Phases(proxy)
        with phases.phase("prepare"):
            assert cli.main(["prepare", raw, ds, "--max-size", "40", "--shard-size", "20", "--val-per-class", "5",
                             "--no-progress"]) == 0
        with phases.phase("read an epoch"):
            train_s3, val_s3 = batches(ds)

    stored = _direct_bytes(s3_endpoint, ds)
    local = {p.name: p.read_bytes() for p in Path(sample_dataset).iterdir() if p.is_file()}
    differ = sorted(n for n in local if stored.get(n) != local[n])
    phases.extra["prepare"]["checked"] = f"{len(local)} files"
    phases.extra["read an epoch"]["checked"] = f"{len(train) + len(val)} batches"
    record_property("summary", f"S3 faults injected (rate {plan.rate}, seed {plan.seed}); every faulted request's "
                               f"operation survived:\n{phases.table()}")
    assert not differ and local.keys() <= stored.keys(), differ
    assert_same(train_s3, train)
    assert_same(val_s3, val)
    faults = phases.faults()
    assert sum(faults.values()) >= 10 and all(faults[k] for k in KINDS), faults
