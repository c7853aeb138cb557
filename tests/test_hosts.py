"""Training on two hosts (`tests/hosts.py`) x one worker, ZeRO-3, checkpoints on S3, against the same run on this
session's one-machine cluster: a host lost after step 20 is committed and a replacement joining give the same run to
the bit; with `cluster.elastic` and no replacement, the run ends on the worker that remains; an elastic run that
started on one host grows to two at a commit once the other has room."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load

from pipeline import storage
from pipeline.checkpoint import CheckpointStore
from pipeline.metrics import read_records
from tests.hosts import Hosts, mixer_losing_host_2, mixer_while, start
from tests.test_resume import losses
from tests.test_train import assert_learned, run_training, tiny_spec


@pytest.fixture(scope="module")
def hosts(s3_endpoint, tmp_path_factory):
    yield from start(tmp_path_factory.mktemp("hosts"), head_ip="127.0.1.1", host_ips="127.0.0")


# Training: 40 steps (four epochs of the sample dataset), a checkpoint every 10, ZeRO-3 (each rank holds a shard of
# every parameter). Micro batches of 16: one a step on each of two workers (ZeRO-3 gathers every parameter for each
# micro batch, which is most of a step's time on CPU), two on one.
STEPS, EVERY, KILL_AFTER = 40, 10, 20


def host_spec(dataset: str, run_url: str, **kw):
    return tiny_spec(dataset, run_url, **{"deepspeed__zero_stage": 3, "schedule__total_steps": STEPS,
                                          "batch__micro": 16, "checkpoint__every_steps": EVERY,
                                          "checkpoint__keep_last": 5, "eval__every_steps": STEPS, **kw})


@pytest.fixture(scope="module")
def one_host(sample_dataset, ray_cluster, s3_endpoint) -> str:
    """The unbroken run, two workers on this session's one-machine cluster."""
    import boto3

    boto3.client("s3").create_bucket(Bucket="host-runs")
    url = "s3://host-runs/one-host"
    run_training(host_spec(sample_dataset, url))
    return url


def test_the_unbroken_run_learns_with_zero_stage_3(one_host):
    """tests/test_train.py's learning checks, for ZeRO-3 (fp32), on the unbroken run these tests compare with."""
    assert_learned(one_host, STEPS, stage=3, bf16=False)


def _train_losing_host_2(hosts: Hosts, spec, tmp_path: Path, replace: bool) -> tuple[str, int]:
    """`mixer train` on the hosts, host-2 lost once step KILL_AFTER is committed: (output, the step committed then)."""
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    store = CheckpointStore(storage.join(spec.run.url, "checkpoints"))

    def committed() -> int | None:
        step = store.latest() or 0
        return step if step >= KILL_AFTER else None

    return mixer_losing_host_2(hosts, ["train", str(tmp_path / "spec.yaml")], b"ray::RayTrainWorker",
                               when=committed, replace=replace, poll_s=0.02)


def _starts(run_url: str) -> list[tuple[int, int, list[str]]]:
    return [(r["step"], r["workers"], r["hosts"]) for r in read_records(run_url) if r["kind"] == "start"]


def test_a_host_lost_mid_run_and_replaced_gives_the_unbroken_run_bit_for_bit(hosts, one_host, sample_dataset,
                                                                              tmp_path):
    url = "s3://host-runs/replaced"
    _, lost_at = _train_losing_host_2(hosts, host_spec(sample_dataset, url, cluster__max_failures=2), tmp_path,
                                      replace=True)
    assert lost_at >= KILL_AFTER
    assert _starts(url) == [(0, 2, ["host-1", "host-2"]), (lost_at, 2, ["host-1", "host-2"])]
    assert losses(url) == losses(one_host) and sorted(losses(url)) == list(range(1, STEPS + 1))
    export = f"exports/step-{STEPS:09d}.safetensors"
    weights, reference = (load(storage.read_bytes(storage.join(u, export))) for u in (url, one_host))
    assert weights.keys() == reference.keys() and all(weights[k].equal(reference[k]) for k in reference)


def test_an_elastic_run_that_loses_a_host_ends_on_the_worker_that_remains(hosts, one_host, sample_dataset,
                                                                          tmp_path):
    url = "s3://host-runs/elastic"
    spec = host_spec(sample_dataset, url, cluster__max_failures=2, cluster__elastic=True, cluster__min_workers=1)
    out, lost_at = _train_losing_host_2(hosts, spec, tmp_path, replace=False)
    assert _starts(url) == [(0, 2, ["host-1", "host-2"]), (lost_at, 1, ["host-1"])]
    assert f"world size 2 -> 1 at step {lost_at}: the cluster holds 1 worker now (cluster.elastic: 1 to 2)" in out
    straight, resumed = losses(one_host), losses(url)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_an_elastic_run_grows_right_after_a_commit_once_a_host_joins(hosts, one_host, sample_dataset, tmp_path):
    """Host-2 lost before the run starts, so it starts on host-1 alone; host-2 joins once the run has begun, and
    the run grows to both hosts at a commit, redoing no step. Micro batches of 1 (32 a step on one worker) give the
    run time enough to start a host while it trains (a host starts in about 7 s, as long as 20 such steps take
    here); the losses stay within 1e-5 of the unbroken run's."""
    url = "s3://host-runs/grown"
    spec = host_spec(sample_dataset, url, cluster__max_failures=2, cluster__elastic=True, cluster__min_workers=1,
                     cluster__resize_check_s=0, batch__micro=1)
    (tmp_path / "spec.yaml").write_text(spec.to_yaml())
    hosts.run("kill-node", "2")

    def host_2_joins() -> int | None:
        if not storage.exists(storage.join(url, "lease.json")):  # taken by the first worker group, once it runs
            return None
        committed = CheckpointStore(storage.join(url, "checkpoints")).latest() or 0  # its room looked for: none
        hosts.run("add-node", "2")
        return committed

    try:
        out, joined_after = mixer_while(hosts, ["train", str(tmp_path / "spec.yaml")], host_2_joins, poll_s=0.1)
    finally:
        hosts.restore(2)
    starts = _starts(url)
    assert len(starts) == 2 and starts[0] == (0, 1, ["host-1"]), starts
    grown_at = starts[1][0]
    assert starts[1] == (grown_at, 2, ["host-1", "host-2"]) and grown_at % EVERY == 0
    assert joined_after < grown_at < STEPS
    assert (f"the cluster has room for 2 workers again (now 1): stopping once the checkpoint of step {grown_at} is "
            "committed, to go on with them from there (cluster.elastic)") in out
    assert f"world size 1 -> 2 at step {grown_at}: the cluster holds 2 workers now (cluster.elastic: 1 to 2)" in out
    assert "could not refresh Ray's view of the nodes" not in out
    straight, grown = losses(one_host), losses(url)
    assert sorted(grown) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert grown[step] == pytest.approx(straight[step], rel=1e-5), step
