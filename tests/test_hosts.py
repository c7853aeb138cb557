"""Several hosts on one machine (`infra/local/cluster.sh`): a Ray head with no CPUs and worker hosts, each in
namespaces of its own (host name, /etc/hosts) with its own loopback IP and temp folder, joined as separate machines
join a real cluster. `mixer` runs against it as a user runs it, in a subprocess with `--ray-address`.

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
from pathlib import Path

import pytest

from pipeline import cli

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


def _shard_task_on(namespace: str) -> int | None:
    """The pid of a Ray worker in this UTS namespace (one host) running a shard task right now, if any."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::write_shard") and os.readlink(f"/proc/{pid}/ns/uts") == namespace:
                    return int(pid)
        except OSError:  # ended meanwhile
            continue
    return None


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "_progress"}


def test_a_prep_that_loses_a_host_redoes_its_shards_elsewhere_and_gives_the_same_bytes(hosts, ray_cluster,
                                                                                         tmp_path):
    raw, reference, spread = tmp_path / "raw", tmp_path / "one-host", tmp_path / "two-hosts"
    assert cli.main(["make-sample-data", str(raw), "--layout", "imagefolder", "--classes", "8",
                     "--per-class", "45"]) == 0
    assert cli.main(["prepare", str(raw), str(reference), *PREP]) == 0  # the session's one-machine cluster

    host_2 = hosts.uts_namespace(2)
    killed: list[int] = []

    def kill_host_2_mid_shard() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and prep.poll() is None:
            worker = _shard_task_on(host_2)
            if worker is not None:
                # The worker first, at once, so that its shard cannot finish in the time the script takes to start.
                os.kill(worker, signal.SIGKILL)
                hosts.run("kill-node", "2")
                killed.append(worker)
                return
            time.sleep(0.005)

    prep = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "prepare", str(raw), str(spread), *PREP,
                             "--ray-address", hosts.env["RAY_ADDRESS"]], env=hosts.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killer = threading.Thread(target=kill_host_2_mid_shard, daemon=True)
    killer.start()
    _, err = prep.communicate(timeout=300)
    killer.join(timeout=10)
    assert prep.returncode == 0, err[-3000:]
    assert killed, "no shard task ran on host-2, so nothing was lost"

    made_by = {p.stem: json.loads(p.read_text())["host"] for p in (spread / "_progress").glob("*-*.json")}
    assert len(made_by) == 90 and set(made_by.values()) <= {"host-1", "host-2"}
    failed = [line for line in err.splitlines() if "attempt 1 failed" in line]
    assert failed, f"the shard in flight on host-2 was not lost and retried:\n{err[-3000:]}"
    for line in failed:  # redone, and by the host that remained
        assert made_by[line.split(".tar")[0]] == "host-1", line
    assert _files(spread) == _files(reference)  # shards, dataset.json and rejected.jsonl

    hosts.run("add-node", "2")  # a replacement: the cluster has both hosts again
    alive = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(log_to_driver=False); "
         "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))"],
        env=hosts.env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert alive.strip().splitlines()[-1] == "['127.0.0.2', '127.0.0.3', '127.0.1.1']"
