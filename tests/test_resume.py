"""Exact resume from checkpoints on S3 (moto's server): after a stop, on another world size, after a kill -9."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load

from pipeline import config, run, storage
from pipeline.checkpoint import CheckpointStore
from tests.test_train import read_metrics, run_training, tiny_spec

STEPS, HALF = 40, 20


def final_weights(run_url: str) -> dict[str, torch.Tensor]:
    return load(storage.read_bytes(storage.join(run_url, "exports", f"step-{STEPS:09d}.safetensors")))


def losses(run_url: str) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in read_metrics(run_url)[0]}


def spec_for(dataset: str, run_url: str, **kw):
    return tiny_spec(dataset, run_url, schedule__total_steps=STEPS, checkpoint__every_steps=10, **kw)


@pytest.fixture(scope="module")
def unbroken(sample_dataset, ray_cluster, s3_endpoint) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket="resume-runs")
    url = "s3://resume-runs/unbroken"
    run_training(spec_for(sample_dataset, url))
    return url


@pytest.fixture(scope="module")
def stopped(sample_dataset, unbroken) -> str:
    """A run stopped (as if preempted) after HALF steps, checkpointed to S3."""
    url = "s3://resume-runs/stopped"
    run_training(spec_for(sample_dataset, url, run__stop_after=HALF))
    store = CheckpointStore(storage.join(url, "checkpoints"))
    assert store.latest() == HALF
    return url


def copy_run(src: str, dst: str) -> str:
    fs, _ = storage.filesystem(src)
    fs.copy(src.removeprefix("s3://"), dst.removeprefix("s3://"), recursive=True)
    return dst


def test_stop_and_resume_equals_the_unbroken_run_bitwise(sample_dataset, unbroken, stopped):
    url = copy_run(stopped, "s3://resume-runs/resumed")
    run_training(spec_for(sample_dataset, url))  # the same command: resumes on its own
    straight, resumed = losses(unbroken), losses(url)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert resumed == straight  # identical per-step losses, before and after the stop
    a, b = final_weights(unbroken), final_weights(url)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_one_worker_matches_within_1e5(sample_dataset, unbroken, stopped):
    url = copy_run(stopped, "s3://resume-runs/one-worker")
    run_training(spec_for(sample_dataset, url, cluster__workers=1))
    straight, resumed = losses(unbroken), losses(url)
    for step in range(HALF + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmd:
            found.append(proc)
    return found


def test_a_worker_killed_mid_run_restarts_resumes_and_ends_identical(sample_dataset, unbroken):
    url = "s3://resume-runs/killed"
    spec = spec_for(sample_dataset, url, cluster__max_failures=2)
    killed: list[int] = []  # the step committed when the worker was killed

    def kill_after_first_checkpoint() -> None:
        store = CheckpointStore(storage.join(url, "checkpoints"))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            committed = store.latest() or 0
            if committed >= 10:
                workers = _train_workers()
                if workers:
                    workers[-1].kill()  # SIGKILL
                    killed.append(committed)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    run_training(spec)
    killer.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert killed[0] < STEPS, "the worker died after training had finished: nothing was resumed"
    a, b = final_weights(unbroken), final_weights(url)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(url) == losses(unbroken)


def test_no_resume_and_a_changed_spec_are_refused_before_start(sample_dataset, unbroken):
    with pytest.raises(config.SpecError, match="already holds checkpoints .* --no-resume"):
        run.preflight(spec_for(sample_dataset, unbroken), resume=False)
    with pytest.raises(config.SpecError, match="was written by a different spec"):
        run.preflight(spec_for(sample_dataset, unbroken, optim__lr=1e-3))
    run.preflight(spec_for(sample_dataset, unbroken, cluster__workers=1))  # another world size is fine


def test_the_same_trainer_under_torchrun_gives_the_same_run(sample_dataset, unbroken, tmp_path):
    import socket
    import subprocess
    import sys

    url = "s3://resume-runs/torchrun"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(spec_for(sample_dataset, url).to_yaml())
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
