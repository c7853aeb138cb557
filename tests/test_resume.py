"""Exact resume from checkpoints on S3 (moto's server): after a stop, after a kill -9, under torchrun. (Resume on
another world size: tests/test_checkpoint.py for the store, tests/test_hosts.py's elastic run for the trainer.)

Every run trains on a copy of the sample dataset with a few rotten samples (tests/test_bad_samples.py `rot`), so the
same runs also show that a resumed run skips and replaces the same samples, and logs the same skips, as the unbroken
one. The run resumed after the stop also has a worker killed once it has committed a step of its own: it has to come
back from both and still end identical to the unbroken run."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load

from pipeline import config, run, storage
from pipeline.checkpoint import CheckpointStore
from tests.test_bad_samples import rot, skip_lines
from tests.test_train import assert_learned, read_metrics, run_training, tiny_spec

# 16 train shards x 20 samples, batch 32: 10 steps an epoch. Two epochs; the stop falls inside the second, between
# checkpoints, and the rotten samples are skipped on both sides of it. 20 steps also take the unbroken run well past
# tests/test_train.py's learning claims (the mean of its last 5 losses about half of ln(8), every validation image
# right).
STEPS, HALF, EVERY = 20, 13, 5


def final_weights(run_url: str) -> dict[str, torch.Tensor]:
    return load(storage.read_bytes(storage.join(run_url, "exports", f"step-{STEPS:09d}.safetensors")))


def losses(run_url: str) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in read_metrics(run_url)[0]}


def spec_for(dataset: str, run_url: str, **kw):
    return tiny_spec(dataset, run_url, schedule__total_steps=STEPS, checkpoint__every_steps=EVERY,
                     data__max_skipped_fraction=0.05, **kw)


@pytest.fixture(scope="module")
def rotten(sample_dataset, tmp_path_factory) -> tuple[str, set[str]]:
    """(URL, rotten keys) of a copy of the sample dataset in which 3 train images are garbage."""
    tmp = tmp_path_factory.mktemp("rotten")
    ds = str(tmp / "ds")
    keys = rot(sample_dataset, ds, str(tmp), 0.01, seed=2)
    assert len(keys) == 3
    return ds, keys


@pytest.fixture(scope="module")
def dataset(rotten) -> str:
    return rotten[0]


@pytest.fixture(scope="module")
def unbroken(dataset, ray_cluster, s3_endpoint) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket="resume-runs")
    url = "s3://resume-runs/unbroken"
    run_training(spec_for(dataset, url))
    return url


@pytest.fixture(scope="module")
def stopped(dataset, unbroken) -> str:
    """A run stopped (as if preempted) after HALF steps, checkpointed to S3."""
    url = "s3://resume-runs/stopped"
    run_training(spec_for(dataset, url, run__stop_after=HALF))
    store = CheckpointStore(storage.join(url, "checkpoints"))
    assert store.latest() == HALF
    assert max(losses(url)) == HALF
    return url


def copy_run(src: str, dst: str) -> str:
    fs, _ = storage.filesystem(src)
    fs.copy(src.removeprefix("s3://"), dst.removeprefix("s3://"), recursive=True)
    return dst


def _train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this session's cluster (its raylets are this process's children): never those of
    another Ray cluster on the machine."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:  # ended meanwhile
            continue
        if "RayTrainWorker" in cmd:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def resumed(dataset, stopped) -> tuple[str, list[int]]:
    """A copy of the stopped run, resumed to the end by the same command; once it has committed a step of its own
    (HALF < step < STEPS), one of its workers is killed with SIGKILL, and Ray Train's restart of the worker group
    resumes it once more. Returns its URL and the step committed when the worker was killed."""
    url = copy_run(stopped, "s3://resume-runs/resumed")
    killed: list[int] = []

    def kill_after_a_checkpoint_of_its_own() -> None:
        store = CheckpointStore(storage.join(url, "checkpoints"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            committed = store.latest() or 0
            if committed > HALF:
                workers = _train_workers()
                if workers:
                    workers[-1].kill()  # SIGKILL
                    killed.append(committed)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_a_checkpoint_of_its_own, daemon=True)
    killer.start()
    # The same command (cluster.max_failures is not part of the run's identity): resumes on its own.
    run_training(spec_for(dataset, url, cluster__max_failures=2))
    killer.join(timeout=5)
    return url, killed


def test_stop_and_resume_equals_the_unbroken_run_bitwise(unbroken, resumed):
    url, _ = resumed
    straight, again = losses(unbroken), losses(url)
    assert sorted(again) == list(range(1, STEPS + 1))
    assert again == straight  # identical per-step losses, before and after the stop
    a, b = final_weights(unbroken), final_weights(url)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_killed_mid_run_restarts_resumes_and_ends_identical(unbroken, resumed):
    url, killed = resumed
    assert killed, "no training worker was found to kill"
    assert HALF < killed[0] < STEPS, "the worker died after training had finished: nothing was resumed"
    a, b = final_weights(unbroken), final_weights(url)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(url) == losses(unbroken)
    assert skip_lines(url) == skip_lines(unbroken)


def test_rotten_samples_are_skipped_and_a_resumed_run_skips_the_same(rotten, unbroken, resumed):
    _, rotten_keys = rotten
    train, _ = read_metrics(unbroken)
    lines = skip_lines(unbroken)
    assert [x["step"] for x in train] == list(range(1, STEPS + 1))
    assert train[-1]["skipped_samples"] == len(lines) == 2 * len(rotten_keys), "2 epochs, each sample once in each"
    assert {x["key"] for x in lines} == rotten_keys and all("not a JPEG or PNG" in x["reason"] for x in lines)
    for x in train:  # cumulative over the ranks, as of each step
        assert x["skipped_samples"] == sum(line["step"] <= x["step"] for line in lines)
    assert min(x["step"] for x in lines) <= HALF < max(x["step"] for x in lines), "skips on both sides of the stop"
    url, _ = resumed
    assert skip_lines(url) == lines
    assert read_metrics(url)[0][-1]["skipped_samples"] == len(lines)


def test_the_unbroken_run_learns_with_zero_stage_2(unbroken):
    """tests/test_train.py's learning checks for ZeRO-2 (fp32), made on the unbroken run (two workers) rather than
    on a run of its own: the rotten samples are replaced by good ones, so it learns as on the clean dataset."""
    assert_learned(unbroken, STEPS, stage=2, bf16=False)


def test_no_resume_and_a_changed_spec_are_refused_before_start(dataset, unbroken):
    with pytest.raises(config.SpecError, match="already holds checkpoints .* --no-resume"):
        run.preflight(spec_for(dataset, unbroken), resume=False)
    with pytest.raises(config.SpecError, match="was written by a different spec"):
        run.preflight(spec_for(dataset, unbroken, optim__lr=1e-3))
    run.preflight(spec_for(dataset, unbroken, cluster__workers=1))  # another world size is fine


def test_the_same_trainer_under_torchrun_gives_the_same_run(dataset, unbroken, tmp_path):
    import socket
    import subprocess
    import sys

    url = "s3://resume-runs/torchrun"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(spec_for(dataset, url).to_yaml())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "pipeline.train", str(spec_path)],
        check=True, timeout=600,
    )
    assert losses(url) == losses(unbroken)
    a, b = final_weights(unbroken), final_weights(url)
    assert all(torch.equal(a[k], b[k]) for k in a)
