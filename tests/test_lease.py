"""One writer per run URL: the lease on local files and on S3 (moto's server), and two launches on one run URL."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import config, lease, storage
from pipeline.lease import Lease, LeaseError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def run_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{request.getfixturevalue('bucket')}/run"


def test_take_refuse_naming_the_holder_and_release(run_url):
    first = Lease(run_url, ttl_s=60, launch="launch-a")
    first.take()
    record = lease.read(run_url)
    assert record["launch_id"] == "launch-a" and record["host"] == socket.gethostname()
    assert record["pid"] == os.getpid() and record["expires_at"] > time.time() + 50
    with pytest.raises(LeaseError) as refused:
        Lease(run_url, ttl_s=60, launch="launch-b").take()
    message = str(refused.value)
    assert f"{run_url}/lease.json: the run is in use by launch launch-a on host {socket.gethostname()}" in message
    assert f"pid {os.getpid()}" in message and record["since"] in message and record["expires"] in message
    assert lease.live_holder(run_url, "launch-b") == record and lease.live_holder(run_url, "launch-a") is None
    first.release()
    assert lease.read(run_url) is None
    second = Lease(run_url, ttl_s=60, launch="launch-b")
    second.take()  # free again
    assert lease.release_if_held(run_url, "launch-a") is False and lease.read(run_url)["launch_id"] == "launch-b"
    assert lease.release_if_held(run_url, "launch-b") is True and lease.read(run_url) is None


def test_renewal_keeps_a_short_lease_alive(run_url):
    held = Lease(run_url, ttl_s=0.9, launch="launch-a")
    held.take()
    since = lease.read(run_url)["since"]
    held.start_renewing()
    time.sleep(1.5)  # past the first expiry: only renewals (every 0.3 s) keep it
    with pytest.raises(LeaseError, match="in use by launch launch-a"):
        Lease(run_url, ttl_s=0.9, launch="launch-b").take()
    record = lease.read(run_url)
    assert record["expires_at"] > time.time() and record["since"] == since and held.problem() is None
    held.release()
    assert lease.read(run_url) is None


def test_expired_lease_is_taken_over_with_a_warning_and_the_old_holder_knows(run_url, caplog):
    stale = Lease(run_url, ttl_s=0.2, launch="launch-dead")
    stale.take()
    time.sleep(0.3)
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        Lease(run_url, ttl_s=60, launch="launch-new").take()
    assert any("taking over the expired lease of launch launch-dead" in r.getMessage() for r in caplog.records)
    assert stale.renew() is False and "now held by launch launch-new" in stale.problem()
    stale.release()  # a lost lease is not deleted by its old holder
    assert lease.read(run_url)["launch_id"] == "launch-new"


def test_the_same_launch_re_takes_its_own_live_lease(run_url):
    Lease(run_url, ttl_s=60, launch="launch-a").take()  # a worker that died without releasing it
    restarted = Lease(run_url, ttl_s=60, launch="launch-a")
    restarted.take()
    assert lease.read(run_url)["launch_id"] == "launch-a"
    restarted.release()
    assert lease.read(run_url) is None


def test_racing_launches_on_an_expired_lease_one_wins(run_url):
    Lease(run_url, ttl_s=0.1, launch="launch-dead").take()
    time.sleep(0.2)
    won, refused = [], []

    def contend(i: int) -> None:
        try:
            Lease(run_url, ttl_s=60, launch=f"launch-{i}").take()
            won.append(i)
        except LeaseError:
            refused.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert lease.read(run_url)["launch_id"] == f"launch-{won[0]}"


def test_launch_id_comes_from_the_launcher(monkeypatch):
    monkeypatch.delenv(lease.LAUNCH_ENV, raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    alone = lease.launch_id()
    assert alone == lease.launch_id() and alone.startswith("process-")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert lease.launch_id() == "torchrun-job-7"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun without --rdzv-id: the agent that restarts us
    assert lease.launch_id() == f"torchrun-{socket.gethostname()}-{os.getppid()}"
    monkeypatch.setenv(lease.LAUNCH_ENV, "mixer-train-1")
    assert lease.launch_id() == "mixer-train-1"


def test_a_store_whose_lease_was_lost_refuses_the_next_save(tmp_path):
    from pipeline.checkpoint import CheckpointError, CheckpointStore, StepRecord
    from tests.test_checkpoint_security import FakeEngine

    lost = "s3://b/run/lease.json: lease lost; it is now held by launch other"
    store = CheckpointStore(str(tmp_path / "run"), staging_dir=str(tmp_path / "staging"),
                            lease=type("Lost", (), {"problem": lambda self: lost})())
    with pytest.raises(CheckpointError) as refused:
        store.save(FakeEngine(), StepRecord(step=1, world_size=1, zero_stage=2))
    assert str(refused.value) == (f"{lost}; this run stops writing checkpoints to {store.url}, which another run "
                                  "now owns")
    assert not os.path.exists(store.url)


# ---------------------------------------------------------------------------------------------------------------
# two launches on one run URL


def _torchrun(spec_path: Path, log_path: Path) -> subprocess.Popen:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "pipeline.train", str(spec_path)],
        cwd=ROOT, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_a_second_launch_is_refused_until_the_first_dies_and_its_lease_expires(sample_dataset, ray_cluster,
                                                                                 tmp_path):
    import psutil

    from tests.test_train import read_metrics, run_training, tiny_spec

    url = str(tmp_path / "run")
    spec = tiny_spec(sample_dataset, url, cluster__workers=1, schedule__total_steps=6, checkpoint__every_steps=3,
                     run__lease_ttl_s=5)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(spec.to_yaml())
    first = _torchrun(spec_path, tmp_path / "first.log")
    processes = [psutil.Process(first.pid)]
    try:
        deadline = time.monotonic() + 300
        while (holder := lease.read(url)) is None:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the first launch never took the lease"
            time.sleep(0.2)
        processes += processes[0].children(recursive=True)
        assert holder["pid"] in {p.pid for p in processes} and holder["launch_id"].startswith("torchrun-")
        named = (f"is in use by launch {holder['launch_id']} on host {socket.gethostname()}, pid {holder['pid']}, "
                 f"since {holder['since']}, until ")
        with pytest.raises(config.SpecError, match="run.url: ") as refused:
            run_training(spec)  # what `mixer train` does: refused in preflight, before any worker starts
        assert named in str(refused.value)
        with pytest.raises(LeaseError, match="the run is in use by launch torchrun-"):
            Lease(url, ttl_s=5, launch="second-launch").take()  # the trainer's own take, as its rank 0 would
    finally:
        for p in processes:
            p.kill()  # SIGKILL: no finish(), no release
        first.wait()
    record = lease.read(url)
    assert record is not None and record["launch_id"] == holder["launch_id"], "a killed launch releases nothing"
    while not lease.expired(lease.read(url)):
        time.sleep(0.2)
    run_training(spec)  # takes the expired lease over and trains to the end
    assert storage.exists(storage.join(url, "exports", "step-000000006.safetensors"))
    assert lease.read(url) is None, "released at the end of the run"
    assert read_metrics(url)[0][-1]["step"] == 6
