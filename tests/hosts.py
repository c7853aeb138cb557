"""Several hosts on one machine for tests (`infra/local/cluster.sh`): a Ray head with no CPUs and worker hosts, each in
namespaces of its own (host name, /etc/hosts) with its own loopback IP and temp folder, joined as separate machines
join a real cluster. `mixer` runs against it as a user runs it, in a subprocess with `--ray-address`.

Each test file that needs hosts starts its own cluster on addresses of its own, so that two files can run at once in
the suite's processes. Making namespaces needs root (or the right to unshare them): elsewhere they are skipped,
saying why."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "infra" / "local" / "cluster.sh"


def why_not_unshare() -> str | None:
    try:
        done = subprocess.run(["unshare", "--uts", "--mount", "true"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return "no `unshare` command on this machine"
    if done.returncode:
        return f"cannot make namespaces here ({done.stderr.strip()}); the multi-host tests run as root, as in CI"
    return None


def free_port() -> int:
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

    def restore(self, host: int) -> None:
        """Start host-I again if it is down: the cluster whole for what follows."""
        pid = self.state / f"host-{host}.pid"  # `kill-node` removes it
        if not (pid.exists() and os.path.exists(f"/proc/{pid.read_text().strip()}")):
            self.run("add-node", str(host))

    def uts_namespace(self, host: int) -> str:
        return os.readlink(f"/proc/{(self.state / f'host-{host}.pid').read_text().strip()}/ns/uts")


def start(state: Path, head_ip: str, host_ips: str, hosts: int = 2) -> Iterator[Hosts]:
    """A module fixture's body: a cluster of `hosts` hosts, its head on `head_ip`, host-I on `host_ips`.(I+1)."""
    reason = why_not_unshare()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "RAY_PORT": str(free_port()), "HEAD_IP": head_ip, "HOST_IPS": host_ips}
    cluster = Hosts(state, env)
    cluster.run("up", str(hosts))
    for line in (state / "env").read_text().split():
        if "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    yield cluster
    cluster.run("down")


def process_on(namespace: str, name: bytes) -> int | None:
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


def mixer_while(hosts: Hosts, args: list[str], act: Callable[[], object | None],
                poll_s: float = 0.005) -> tuple[str, object | None]:
    """`mixer ARGS --ray-address` on the hosts, with `act()` called every `poll_s` while it runs until it returns
    something: (the command's output, stdout and stderr, and what `act` returned, None if never). The command must
    succeed."""
    acted: list[object] = []
    failed: list[BaseException] = []

    def watch() -> None:
        deadline = time.monotonic() + 300
        try:
            while time.monotonic() < deadline and command.poll() is None:
                done = act()
                if done is not None:
                    acted.append(done)
                    return
                time.sleep(poll_s)
        except BaseException as e:  # raised again in the test's thread, after the command
            failed.append(e)

    command = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args, "--ray-address",
                                hosts.env["RAY_ADDRESS"]], env=hosts.env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, _ = command.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        command.kill()
        out, _ = command.communicate()
        raise AssertionError(f"`mixer {args[0]}` did not end in 600 s:\n{out[-8000:]}") from None
    watcher.join(timeout=60)
    if failed:
        raise failed[0]
    assert command.returncode == 0, out[-5000:]
    return out, acted[0] if acted else None


def mixer_losing_host_2(hosts: Hosts, args: list[str], worker: bytes, when: Callable[[], int | None],
                        replace: bool, poll_s: float = 0.005) -> tuple[str, int]:
    """`mixer ARGS` on the hosts (`mixer_while`). Once `when()` is not None and a Ray worker titled `worker` runs on
    host-2, that worker is SIGKILLed at once (so that its work cannot finish in the time the script takes to start),
    then every process of host-2 (`kill-node`); with `replace` a new host-2 joins at once, else after the command.
    Returns the command's output and what `when()` said when host-2 was lost."""
    host_2 = hosts.uts_namespace(2)

    def lose_host_2() -> int | None:
        mark = when()
        pid = process_on(host_2, worker) if mark is not None else None
        if pid is None:
            return None
        os.kill(pid, signal.SIGKILL)
        hosts.run("kill-node", "2")
        if replace:
            hosts.run("add-node", "2")
        return mark

    try:
        out, lost = mixer_while(hosts, args, lose_host_2, poll_s)
    finally:
        hosts.restore(2)
    assert lost is not None, (f"no {worker.decode()} ran on host-2 while it could be lost, so nothing was lost:\n"
                              f"{out[-3000:]}")
    return out, lost


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parent.name != "_progress"}
