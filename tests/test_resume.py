"""Exact resume from checkpoints on S3 (moto's server): after a stop, through S3 faults, and under torchrun. (A
worker killed mid-run, and resume on another world size: tests/test_hosts.py, where a host is lost;
tests/test_checkpoint.py for the store.)

The stopped run, its resumption and `mixer export` of its last step talk to S3 through tests/s3_faults.py's proxy
(server errors, resets, bodies cut short, stalls), and still end bit for bit where the unbroken run, which talks to
moto directly, ends. Every run trains on a copy of the sample dataset with a few rotten samples
(tests/test_bad_samples.py `rot`), so the same runs also show that a resumed run skips and replaces the same
samples, and logs the same skips, as the unbroken one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load

from pipeline import config, convert, run, storage
from pipeline.checkpoint import CheckpointStore
from pipeline.metrics import read_records
from tests.s3_faults import KINDS, FaultPlan, Phases, S3FaultProxy, ray_through
from tests.test_bad_samples import rot, skip_lines
from tests.test_train import assert_learned, read_metrics, run_training, tiny_spec

# 16 train shards x 20 samples, batch 32: 10 steps an epoch. Two epochs; the stop falls inside the second, between
# checkpoints, and the rotten samples are skipped on both sides of it. 20 steps also take the unbroken run well past
# tests/test_train.py's learning claims (the mean of its last 5 losses about half of ln(8), every validation image
# right).
STEPS, HALF, EVERY, FEWSHOT_EVERY = 20, 13, 5, 10


def final_weights(run_url: str) -> dict[str, torch.Tensor]:
    return load(storage.read_bytes(storage.join(run_url, "exports", f"step-{STEPS:09d}.safetensors")))


def losses(run_url: str) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in read_metrics(run_url)[0]}


def spec_for(dataset: str, run_url: str, digits: str | None = None, **kw):
    """The runs' spec; with `digits`, 10-shot linear evaluation on it every FEWSHOT_EVERY steps (l2 picked from a
    list on held-out images)."""
    if digits:
        kw["eval__fewshot"] = {"datasets": [digits], "shots": [10], "l2": [4.0, 1024.0], "every_steps": FEWSHOT_EVERY}
    return tiny_spec(dataset, run_url, schedule__total_steps=STEPS, checkpoint__every_steps=EVERY,
                     data__max_skipped_fraction=0.05, **kw)


def fewshot_records(run_url: str) -> list[dict]:
    """The run's few-shot records, less what depends on the machine's speed."""
    return [{k: v for k, v in r.items() if k not in ("time", "fewshot/seconds")} for r in read_records(run_url)
            if r["kind"] == "fewshot"]


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
def unbroken(dataset, digits_dataset, ray_cluster, s3_endpoint) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket="resume-runs")
    url = "s3://resume-runs/unbroken"
    run_training(spec_for(dataset, url, digits_dataset))
    return url


@pytest.fixture(scope="module")
def faulted(dataset, digits_dataset, unbroken, ray_cluster, s3_endpoint) -> dict:
    """The same run through S3 faults: stopped (as if preempted) after HALF steps, resumed to the end by the same
    command, its last step exported by `mixer export`. Returns its URL, the step committed at the stop, the
    export's URL and the faults met per phase."""
    from pipeline import cli

    url = "s3://resume-runs/faulted"
    export = storage.join(url, "exports", "cli.safetensors")
    plan = FaultPlan(rate=0.12, seed=3, cover_kinds=True)
    with S3FaultProxy(s3_endpoint, plan) as proxy, ray_through(proxy.endpoint, ray_cluster):
        phases = Phases(proxy)
        with phases.phase(f"train to step {HALF}"):
            run_training(spec_for(dataset, url, digits_dataset, run__stop_after=HALF))
        stopped_at = CheckpointStore(url).latest()
        phases.extra[f"train to step {HALF}"]["checked"] = f"step {stopped_at} committed"
        with phases.phase(f"resume to step {STEPS}"):
            run_training(spec_for(dataset, url, digits_dataset))
        with phases.phase("export"):
            assert cli.main(["export", url, export]) == 0
    return {"url": url, "stopped_at": stopped_at, "export": export, "phases": phases}


def test_stop_and_resume_through_s3_faults_equals_the_unbroken_run_bitwise(unbroken, faulted, record_property):
    phases = faulted["phases"]
    plan = phases.proxy.plan
    record_property("summary", f"S3 faults injected (rate {plan.rate}, seed {plan.seed}); every faulted request's "
                               f"operation survived:\n{phases.table()}")
    faults = phases.faults()
    assert sum(faults.values()) >= 20 and all(faults[k] for k in KINDS), faults
    assert faulted["stopped_at"] == HALF
    url = faulted["url"]
    starts = [r["step"] for r in read_records(url) if r["kind"] == "start"]
    assert starts == [0, HALF], "one start from scratch, one resume from the stop"
    straight, again = losses(unbroken), losses(url)
    assert sorted(again) == list(range(1, STEPS + 1))
    assert again == straight  # identical per-step losses, before and after the stop
    a, b = final_weights(unbroken), final_weights(url)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert fewshot_records(url) == fewshot_records(unbroken)  # one before the stop, one after


def test_mixer_export_through_s3_faults_gives_the_trainers_export(unbroken, faulted):
    def exported(url: str) -> tuple[dict, dict]:
        """(tensors, metadata but the checkpoint it came from) of a safetensors file."""
        blob = storage.read_bytes(url)
        meta = convert._safetensors_metadata(blob)
        meta.pop("checkpoint", None)
        return load(blob), meta

    weights, meta = exported(faulted["export"])
    reference, reference_meta = exported(storage.join(unbroken, "exports", f"step-{STEPS:09d}.safetensors"))
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)
    assert meta == reference_meta


def test_rotten_samples_are_skipped_and_a_resumed_run_skips_the_same(rotten, unbroken, faulted):
    _, rotten_keys = rotten
    train, _ = read_metrics(unbroken)
    lines = skip_lines(unbroken)
    assert [x["step"] for x in train] == list(range(1, STEPS + 1))
    assert train[-1]["skipped_samples"] == len(lines) == 2 * len(rotten_keys), "2 epochs, each sample once in each"
    assert {x["key"] for x in lines} == rotten_keys and all("not a JPEG or PNG" in x["reason"] for x in lines)
    for x in train:  # cumulative over the ranks, as of each step
        assert x["skipped_samples"] == sum(line["step"] <= x["step"] for line in lines)
    assert min(x["step"] for x in lines) <= HALF < max(x["step"] for x in lines), "skips on both sides of the stop"
    url = faulted["url"]
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


def test_the_same_trainer_under_torchrun_gives_the_same_run(dataset, digits_dataset, unbroken, tmp_path):
    import socket
    import subprocess
    import sys

    url = "s3://resume-runs/torchrun"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(spec_for(dataset, url, digits_dataset).to_yaml())
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
    assert fewshot_records(url) == fewshot_records(unbroken)


def test_the_run_logs_fewshot_above_a_random_model_and_one_process_gets_the_same(dataset, digits_dataset, unbroken,
                                                                                 tmp_path, capsys, record_property):
    """10-shot digits, logged at steps 10 and 20 by the two-worker run, above what the run's initial (random) model
    scores; `mixer eval --fewshot` on the export, one process, gives the run's numbers to the bit."""
    from pipeline import cli, fewshot
    from pipeline.train import build_model, seed_everything

    records = fewshot_records(unbroken)
    assert [r["step"] for r in records] == [FEWSHOT_EVERY, STEPS]
    assert set(records[-1]) == {"kind", "step", "fewshot/digits/10shot", "fewshot/digits/10shot/l2"}

    spec = spec_for(dataset, unbroken, digits_dataset)
    seed_everything(spec.seed, 0, 0)  # as the trainer starts: rank 0's seed at step 0, then the model
    initial = build_model(spec, 8)
    f = spec.eval.fewshot
    baseline = fewshot.evaluate(initial, f, fewshot.prepare(f, 32, None, 64, 0, 1, spec.seed), 32, None, 64, 0, 1,
                                torch.device("cpu"), torch.float32)["fewshot/digits/10shot"]
    record_property("summary", "10-shot digits (mean of 3 draws): " + ", ".join(
        f"step {r['step']} {r['fewshot/digits/10shot']:.3f}" for r in records) + f"; the initial model {baseline:.3f}")
    assert records[-1]["fewshot/digits/10shot"] > baseline, (records, baseline)  # on this machine: 0.718 > 0.682

    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    export = storage.join(unbroken, "exports", f"step-{STEPS:09d}.safetensors")
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "spec.yaml"), "--checkpoint", export, "--fewshot"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in alone.items() if k != "fewshot/seconds"} == {
        k: v for k, v in records[-1].items() if k.startswith("fewshot/")}
