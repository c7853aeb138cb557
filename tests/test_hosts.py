"""Several hosts on one machine (`infra/local/cluster.sh`): a Ray head with no CPUs and worker hosts, each in
namespaces of its own (host name, /etc/hosts) with its own loopback IP and temp folder, joined as separate machines
join a real cluster. `mixer` runs against it as a user runs it, in a subprocess with `--ray-address`.

Training: two hosts x one worker, ZeRO-3, checkpoints on S3, against the same run on this session's one-machine
cluster: a host lost after step 10 is committed and a replacement joining give the same run to the bit; with
`cluster.elastic` and no replacement, the run ends on the worker that remains.

Making namespaces needs root (or the right to unshare them): elsewhere these tests are skipped, saying why."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load

from pipeline import cli, storage
from pipeline.checkpoint import CheckpointStore
from pipeline.metrics import read_records
from tests.test_resume import losses
from tests.test_train import assert_learned, run_training, tiny_spec

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "infra" / "local" / "cluster.sh"
PREP = ["--max-size", "40", "--shard-size", "4", "--val-per-class", "5", "--no-progress"]


def _why_not_unshare() -> str | None:
    try:
        done = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "no `unshare` command on this machine"
    if done.returncode:
        return f"cannot make namespaces here ({done.stderr.strip()}); the multi-host tests run as root, as in CI"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hosts:
    """A running cluster: its state folder and the environment that reaches it."""

    def __init__(self, state: Path, env: dict[str, str]):
        self.state, self.env = state, env

    def run(self, *args: str) -> None:
        subprocess.run([str(CLUSTER), *args, str(self.state)], env=self.env, check=True, capture_output=True,
                       timeout=180)

    def uts_namespace(self, host: int) -> str:
        return os.readlink(f"/proc/{(self.state / f'host-{host}.pid').read_text().strip()}/ns/uts")


@pytest.fixture(scope="module")
def hosts(s3_endpoint, tmp_path_factory):
    reason = _why_not_unshare()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("hosts")
    env = {**os.environ, "RAY_PORT": str(_free_port())}
    cluster = Hosts(state, env)
    cluster.run("up", "2")
    for line in (state / "env").read_text().split():
        if "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    yield cluster
    cluster.run("down")


def _process_on(namespace: str, name: bytes) -> int | None:
    """The pid of a Ray worker in this UTS namespace (one host) whose title starts with `name` right now, if any."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(name) and os.readlink(f"/proc/{pid}/ns/uts") == namespace:
                    return int(pid)
        except OSError:  # ended meanwhile
            continue
    return None


def _mixer_losing_host_2(hosts: Hosts, args: list[str], worker: bytes, when: Callable[[], int | None],
                         replace: bool, poll_s: float = 0.005) -> tuple[str, int]:
    """`mixer ARGS --ray-address` on the hosts. Once `when()` is not None and a Ray worker titled `worker` runs on
    host-2, that worker is SIGKILLed at once (so that its work cannot finish in the time the script takes to start),
    then every process of host-2 (`kill-node`); with `replace` a new host-2 joins at once, else after the command.
    Returns the command's output (stdout and stderr) and what `when()` said when host-2 was lost."""
    host_2 = hosts.uts_namespace(2)
    lost: list[int] = []

    def lose_host_2() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and command.poll() is None:
            mark = when()
            pid = _process_on(host_2, worker) if mark is not None else None
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                lost.append(mark)
                hosts.run("kill-node", "2")
                if replace:
                    hosts.run("add-node", "2")
                return
            time.sleep(poll_s)

    command = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args, "--ray-address",
                                hosts.env["RAY_ADDRESS"]], env=hosts.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    killer = threading.Thread(target=lose_host_2, daemon=True)
    killer.start()
    out, _ = command.communicate(timeout=600)
    killer.join(timeout=60)
    if not replace:
        hosts.run("add-node", "2")  # the cluster whole again for what follows
    assert command.returncode == 0, out[-5000:]
    assert lost, f"no {worker.decode()} ran on host-2 while it could be lost, so nothing was lost:\n{out[-3000:]}"
    return out, lost[0]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "_progress"}


def test_a_prep_that_loses_a_host_redoes_its_shards_elsewhere_and_gives_the_same_bytes(hosts, ray_cluster,
                                                                                         tmp_path):
    raw, reference, spread = tmp_path / "raw", tmp_path / "one-host", tmp_path / "two-hosts"
    assert cli.main(["make-sample-data", str(raw), "--layout", "imagefolder", "--classes", "8",
                     "--per-class", "45"]) == 0
    assert cli.main(["prepare", str(raw), str(reference), *PREP]) == 0  # the session's one-machine cluster

    err, _ = _mixer_losing_host_2(hosts, ["prepare", str(raw), str(spread), *PREP], b"ray::write_shard",
                                  when=lambda: 0, replace=False)

    made_by = {p.stem: json.loads(p.read_text())["host"] for p in (spread / "_progress").glob("*-*.json")}
    assert len(made_by) == 90 and set(made_by.values()) <= {"host-1", "host-2"}
    failed = [line for line in err.splitlines() if "attempt 1 failed" in line]
    assert failed, f"the shard in flight on host-2 was not lost and retried:\n{err[-3000:]}"
    for line in failed:  # redone, and by the host that remained
        assert made_by[line.split(".tar")[0]] == "host-1", line
    assert _files(spread) == _files(reference)  # shards, dataset.json and rejected.jsonl

    # a replacement joined after the prep: the cluster has both hosts again
    alive = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(log_to_driver=False); "
         "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"],
        env=hosts.env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert alive.strip().splitlines()[-1] == "['127.0.0.2', '127.0.0.3', '127.0.1.1']"


# Training: 20 steps (two epochs of the sample dataset, well past tests/test_train.py's learning claims), a
# checkpoint every 5, ZeRO-3 (each rank holds a shard of every parameter). Micro batches of 16: one a step on each of
# two workers (ZeRO-3 gathers every parameter for each micro batch, which is most of a step's time on CPU), two on
# one.
STEPS, EVERY, KILL_AFTER = 20, 5, 10


def host_spec(dataset: str, run_url: str, **kw):
    return tiny_spec(dataset, run_url, deepspeed__zero_stage=3, schedule__total_steps=STEPS, batch__micro=16,
                     checkpoint__every_steps=EVERY, checkpoint__keep_last=5, eval__every_steps=STEPS, **kw)


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

    return _mixer_losing_host_2(hosts, ["train", str(tmp_path / "spec.yaml")], b"ray::RayTrainWorker",
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
