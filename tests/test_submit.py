"""`mixer submit` and `mixer jobs` against a real Ray head with token authentication, started by infra/local/start.sh
(Ray head + S3 server on 127.0.0.1) and ended by infra/local/stop.sh. While the stack starts and runs, no process
shows the token on its command line.

`mixer submit` runs as a subprocess with a controlled environment (its own HOME, so no ~/.ray/auth_token of this
machine leaks in, and an object-store secret of its own that must not reach the cluster); `mixer jobs` runs in this
process with the token in the environment. The dataset lives on the stack's S3 server: the job reaches it with
the credentials of the cluster's environment, never with anything the submitter sent.

The transport rule (no token over plain http to another machine unless --insecure) is checked first, without a
cluster: the refusal comes before any connection, and --insecure is shown to reach the connection attempt through a
stand-in client, so no traffic leaves loopback.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import jobs, storage
from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
MIXER = [sys.executable, "-m", "pipeline.cli"]
TOKEN = uuid.uuid4().hex
# The submitter's own object-store secret: it must never reach the cluster.
CLIENT_SECRET = "client-side-secret-" + uuid.uuid4().hex[:8]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    return env


def head_processes(ray_tmp: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", "-a", "--", ray_tmp], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def command_lines_showing(secret: str) -> list[str]:
    """The command line of every process on this machine that shows `secret` in it (anyone can read these)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:  # the process ended meanwhile
            continue
        if secret.encode() in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@dataclass
class Stack:
    env: dict[str, str]  # the stack's env file
    cmdline_leaks: list[str]  # command lines that showed the token while start.sh ran or once it was up


def run_start_watching_command_lines(state: Path, env: dict[str, str], logs: Path,
                                     timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run infra/local/start.sh, looking at every process's command line for the token ten times a second, so that
    a helper that lives for a second or more (the readiness check polls for as long as Ray takes to start) would be
    seen if it carried it. More often would take CPU from the head starting on a small machine."""
    out, err = logs / "start.out", logs / "start.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([str(REPO / "infra/local/start.sh"), str(state)], env=env, stdout=stdout,
                                stderr=stderr, text=True)
    leaks: list[str] = []
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        leaks += command_lines_showing(TOKEN)
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    returncode = proc.wait()
    return subprocess.CompletedProcess(proc.args, returncode, out.read_text(), err.read_text()), leaks


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sample_dataset):
    """The local stack of infra/local/: a Ray head (token auth) and an S3 server, with the sample dataset copied to
    its bucket."""
    state = tmp_path_factory.mktemp("local-stack")
    ray_port, dashboard, client, agent, s3 = free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "FSSPEC_"))}
    # The head keeps this machine's HOME: its workers find DeepSpeed's compiled ops in ~/.cache/torch_extensions.
    env.update(RAY_PORT=str(ray_port), RAY_DASHBOARD_PORT=str(dashboard), RAY_CLIENT_PORT=str(client),
               RAY_AGENT_PORT=str(agent), S3_PORT=str(s3), NUM_CPUS="4", RAY_AUTH_TOKEN=TOKEN)
    started, leaks = run_start_watching_command_lines(state, env, tmp_path_factory.mktemp("local-stack-logs"))
    ray_tmp = (state / "ray_tmp").read_text().strip() if (state / "ray_tmp").exists() else None
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert (state / "env").stat().st_mode & 0o777 == 0o600
        stack_env = read_env_file(state / "env")
        assert stack_env["RAY_AUTH_TOKEN"] == TOKEN
        _copy_dataset(sample_dataset, "s3://mixer/datasets/sample", stack_env)
        yield Stack(env=stack_env, cmdline_leaks=leaks + command_lines_showing(TOKEN))
    finally:
        stopped = subprocess.run([str(REPO / "infra/local/stop.sh"), str(state)], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        if ray_tmp:  # every process of this head is gone, and only this head's
            assert head_processes(ray_tmp) == []


def _copy_dataset(src: str, dest: str, stack_env: dict[str, str]) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(key=stack_env["AWS_ACCESS_KEY_ID"], secret=stack_env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": stack_env["AWS_ENDPOINT_URL"]})
    src_fs, src_path = storage.filesystem(src)
    for name in src_fs.find(src_path):
        fs.pipe_file(f"{dest}/{os.path.relpath(name, src_path)}", src_fs.cat_file(name))


def mixer(args: list[str], *, home: Path, token: str | None = TOKEN,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "FSSPEC_"))}
    env.update(HOME=str(home), AWS_ACCESS_KEY_ID="client-key", AWS_SECRET_ACCESS_KEY=CLIENT_SECRET)
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run(MIXER + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def job_id_of(output: str) -> str:
    match = re.search(r"submitted (mixer-quickstart-\S+):", output)
    assert match, output
    return match.group(1)


REMOTE = "http://10.0.0.5:8265"  # never contacted: refused before connecting, or met by a stand-in client
ACTIONS = [["jobs", "list"], ["jobs", "status", "some-job"], ["jobs", "logs", "some-job"],
           ["jobs", "logs", "some-job", "--follow"], ["jobs", "stop", "some-job"],
           ["submit", str(REPO / "jobs" / "quickstart.yaml"), "--set", "data.dataset=s3://mixer/x"]]
ACTION_IDS = ["list", "status", "logs", "logs-follow", "stop", "submit"]


class UnreachableClient:
    """Stands in for Ray's JobSubmissionClient: records what it was given, then fails the way the real one does
    when nothing answers at the address (its constructor is its first request)."""

    made: list[tuple[str, dict | None]] = []

    def __init__(self, address: str, headers: dict | None = None, **kwargs):
        UnreachableClient.made.append((address, headers))
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")


@pytest.fixture
def stand_in_client(monkeypatch):
    import ray.job_submission

    UnreachableClient.made = []
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", UnreachableClient)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    return UnreachableClient.made


@pytest.mark.parametrize("address", [
    "http://127.0.0.1:8265", "http://127.8.9.10:8265", "http://localhost:8265", "http://LocalHost:8265",
    "http://[::1]:8265", "http://[::ffff:127.0.0.1]:8265", "127.0.0.1:8265", "localhost:8265",
    "https://head.example.com:8265", "https://10.0.0.5:8265", "HTTPS://10.0.0.5",
])
def test_transport_allows_loopback_and_https(address):
    jobs.check_transport(address)


@pytest.mark.parametrize("address", [
    REMOTE, "http://head.example.com:8265", "head:8265", "10.0.0.5:8265", "http://[2001:db8::1]:8265",
    "http://localhost.example.com:8265", "http://127.0.0.1.example.com:8265", "http://0.0.0.0:8265",
    "http://127.0.0.1@10.0.0.5:8265", "HTTP://10.0.0.5:8265",
])
def test_transport_refuses_plain_http_to_another_machine(address):
    with pytest.raises(jobs.JobsError) as refused:
        jobs.check_transport(address)
    message = str(refused.value)
    assert message.startswith(f"refusing to send the cluster token to {address} over plain http")
    for remedy in ("https://", "ray dashboard infra/aws/cluster.yaml", "ssh -N -L 8265:127.0.0.1:8265",
                   "kubectl port-forward", "--address http://127.0.0.1:8265", "--insecure"):
        assert remedy in message
    jobs.check_transport(address, insecure=True)  # the user's explicit choice


def test_transport_refuses_other_schemes():
    with pytest.raises(jobs.JobsError, match="expected the head's dashboard URL"):
        jobs.check_transport("ray://10.0.0.5:10001", insecure=True)


@pytest.mark.parametrize("action", ACTIONS, ids=ACTION_IDS)
def test_every_action_refuses_before_connecting(action, stand_in_client, capsys):
    assert main(action + ["--address", REMOTE]) == 2
    assert f"refusing to send the cluster token to {REMOTE} over plain http" in capsys.readouterr().err
    assert stand_in_client == []  # no client was made: nothing was sent


@pytest.mark.parametrize("action", ACTIONS, ids=ACTION_IDS)
def test_insecure_lets_every_action_through_to_the_connection(action, stand_in_client, capsys):
    assert main(action + ["--address", REMOTE, "--insecure"]) == 2
    assert f"cannot reach the Ray dashboard at {REMOTE}" in capsys.readouterr().err
    assert stand_in_client == [(REMOTE, {"Authorization": f"Bearer {TOKEN}"})]


def test_start_puts_no_secret_on_a_command_line(stack):
    """Every process's command line is readable by every user of the machine; the token must be in none, neither
    while start.sh runs (its readiness check, `ray start`) nor in the processes of the running head."""
    assert sorted(set(stack.cmdline_leaks)) == []


def test_submit_follows_a_job_to_success(stack, tmp_path, monkeypatch, capsys):
    address = stack.env["RAY_API_SERVER_ADDRESS"]
    run = tmp_path / "run"
    result = mixer(["submit", "jobs/quickstart.yaml", "--address", address, "--follow",
                    "--set", "data.dataset=s3://mixer/datasets/sample", "--set", f"run.url={run}",
                    "--set", "schedule.total_steps=2", "--set", "schedule.warmup_steps=1",
                    "--set", "checkpoint.every_steps=0", "--set", "eval.every_steps=0", "--set", "run.log_every=1"],
                   home=tmp_path, timeout=600)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    job_id = job_id_of(out)
    assert f"job {job_id}: SUCCEEDED" in out

    # the run: its final checkpoint (committed: manifest, `latest`), metrics (train steps, final eval) and export
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000000002"
    assert (run / "checkpoints" / "step-000000002" / "manifest.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert any(r["kind"] == "eval" and r["step"] == 2 for r in records)
    assert list((run / "exports").glob("*.safetensors"))

    # `mixer jobs` in this process (the token in the environment, as a user has it)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    assert main(["jobs", "status", job_id, "--address", address]) == 0
    status = capsys.readouterr().out
    assert f"job {job_id}: SUCCEEDED" in status and '"spec": "quickstart.yaml"' in status
    assert f"workers   2 from step 0 on {socket.gethostname()}\n" in status, status
    assert main(["jobs", "logs", job_id, "--address", address]) == 0
    logs = capsys.readouterr().out
    assert "run folder:" in logs

    # what the cluster holds about the job: no credential of the submitter, no AWS variable at all
    info = jobs.job_info(address, job_id)
    held = json.dumps({"runtime_env": info.runtime_env, "metadata": info.metadata, "entrypoint": info.entrypoint})
    assert info.entrypoint == "python -m pipeline.cli train spec.yaml"
    assert CLIENT_SECRET not in held and "AWS_" not in held and "client-key" not in held
    assert CLIENT_SECRET not in logs
    assert "AWS_" not in (run / "config.yaml").read_text()


def test_stop_a_running_job(stack, tmp_path, monkeypatch, capsys):
    address = stack.env["RAY_API_SERVER_ADDRESS"]
    submitted = mixer(["submit", "jobs/quickstart.yaml", "--address", address,
                       "--set", "data.dataset=s3://mixer/datasets/sample", "--set", f"run.url={tmp_path}/run",
                       "--set", "schedule.total_steps=100000"], home=tmp_path)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_of(submitted.stdout)
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    deadline = time.monotonic() + 120
    while jobs.job_info(address, job_id).status.value == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert jobs.job_info(address, job_id).status.value == "RUNNING"
    assert command_lines_showing(TOKEN) == []  # nor in the job's driver and training workers


    assert main(["jobs", "stop", job_id, "--address", address]) == 0
    assert f"job {job_id}: STOPPED" in capsys.readouterr().out
    assert main(["jobs", "list", "--address", address]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"{re.escape(job_id)}\s+STOPPED", listed), listed
    assert main(["jobs", "status", "no-such-job", "--address", address]) == 2
    assert "no job 'no-such-job' on this cluster" in capsys.readouterr().err


def test_submit_without_the_token_says_how_to_provide_it(stack, tmp_path, monkeypatch, capsys):
    address = stack.env["RAY_API_SERVER_ADDRESS"]
    args = ["submit", "jobs/quickstart.yaml", "--address", address, "--set", "data.dataset=s3://mixer/x",
            "--set", f"run.url={tmp_path}/run"]
    missing = mixer(args, token=None, home=tmp_path)
    assert missing.returncode == 2
    assert "requires an authentication token and none was found" in missing.stderr
    assert "export RAY_AUTH_TOKEN=" in missing.stderr and "~/.ray/auth_token" in missing.stderr
    assert "ray get-auth-token" in missing.stderr
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["jobs", "list", "--address", address]) == 2
    assert "refused the token from RAY_AUTH_TOKEN" in capsys.readouterr().err
    free = free_ports(1)[0]
    assert main(["jobs", "stop", "some-job", "--address", f"http://127.0.0.1:{free}"]) == 2
    assert f"cannot reach the Ray dashboard at http://127.0.0.1:{free}" in capsys.readouterr().err
