"""Submitting and following training jobs on a Ray cluster through the Ray Jobs API (the head's dashboard port).

A submission carries this package's source and the resolved spec as the job's working_dir and runs
`python -m pipeline.cli train spec.yaml` on the cluster, where RAY_ADDRESS is set by Ray so the trainer joins that
cluster. Credentials never travel with a job: the spec holds none, and the runtime environment copies no AWS_*
variable; the cluster's own environment or instance role provides them.

Ray 2.60 protects the Jobs API with a token. It is read, as Ray's own clients do, from RAY_AUTH_TOKEN, then the file
named by RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token, and sent as a bearer header. A bearer header is only as private
as the connection that carries it, so plain http:// is refused unless the dashboard is on this machine (loopback, which
is also where an SSH tunnel or `kubectl port-forward` ends) or the user passes --insecure (`check_transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from pipeline import run
from pipeline.config import Spec
from pipeline.errors import MixerError

REPO_ROOT = Path(__file__).resolve().parent.parent
# What a job needs of this repository; everything else (.venv, out/, tests/, benchmarks) stays behind.
SOURCE_PACKAGES = ("pipeline", "data_prep")
SPEC_NAME = "spec.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(MixerError):
    """A submission or job request that failed; the message says what to do."""


def auth_token() -> tuple[str | None, str]:
    """The cluster token and where it came from, looked up where Ray's clients look (first found wins)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
            if token:
                return token, str(path)
    return None, ""


def token_message(address: str) -> str:
    token, source = auth_token()
    problem = (f"refused the token from {source}" if token else
               "requires an authentication token and none was found (RAY_AUTH_TOKEN, ~/.ray/auth_token)")
    return (
        f"the Ray cluster at {address} {problem}. Provide the cluster's token with\n"
        "  export RAY_AUTH_TOKEN=<token>        or save it to ~/.ray/auth_token (chmod 600)\n"
        "Read it on the head node with `ray get-auth-token` (or `cat ~/.ray/auth_token` there); for the local stack "
        "of infra/local/start.sh it is in its env file; on KubeRay, in the mixer-ray-auth Secret (infra/kuberay)."
    )


def is_loopback(host: str | None) -> bool:
    """Whether `host` names this machine without a network in between: `localhost`, 127.0.0.0/8 or ::1. No name is
    resolved: a host name that happens to resolve to loopback still counts as remote, the safe side."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone (%eth0) is not part of the address
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback written as IPv6
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def insecure_transport_message(address: str, host: str | None) -> str:
    return (
        f"refusing to send the cluster token to {address} over plain http: {host or 'that host'} is not this "
        "machine, and without TLS anyone on the network path can read the token (which lets whoever holds it run "
        "code on the cluster) and change what is sent. Reach the dashboard one of these ways:\n"
        "  https://HEAD:8265                         the dashboard behind TLS (a proxy that terminates https)\n"
        "  ray dashboard infra/aws/cluster.yaml &    an SSH tunnel to the head, then --address http://127.0.0.1:8265\n"
        "  ssh -N -L 8265:127.0.0.1:8265 HEAD &      the same tunnel by hand, then --address http://127.0.0.1:8265\n"
        "  kubectl port-forward svc/mixer-pretrain-head-svc 8265:8265 &   (KubeRay), then "
        "--address http://127.0.0.1:8265\n"
        "or, only on a network you trust end to end, pass --insecure to send it anyway."
    )


def check_transport(address: str, insecure: bool = False) -> None:
    """Refuse a Jobs API address that would carry the token in the clear to another machine.

    Checked for every plain-http address, with or without a token found here: Ray's client attaches a token of its
    own finding, and without TLS the uploaded job (code the cluster runs with its cloud role) can be altered on the
    way as well. Runs before any connection is made, so nothing has been sent when it refuses."""
    try:
        # Ray reads an address without a scheme as http://.
        parts = urlsplit(address if "://" in address else f"http://{address}")
        scheme, host = parts.scheme.lower(), parts.hostname
    except ValueError as e:
        raise JobsError(f"--address {address}: not a URL ({e}); expected http(s)://HEAD:8265") from e
    if scheme not in ("http", "https"):
        raise JobsError(f"--address {address}: expected the head's dashboard URL, http(s)://HEAD:8265 (a ray:// "
                        "address is Ray Client's, which mixer does not use)")
    if scheme == "http" and not insecure and not is_loopback(host):
        raise JobsError(insecure_transport_message(address, host))


@contextlib.contextmanager
def _translate_errors(address: str) -> Iterator[None]:
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise JobsError(token_message(address)) from e
    except ConnectionError as e:
        raise JobsError(f"cannot reach the Ray dashboard at {address} ({e}); check --address (the head's "
                        "dashboard: http://127.0.0.1:8265 through `ray dashboard` or `kubectl port-forward`, or "
                        "https://HEAD:8265) and that the head, and the tunnel if any, are running") from e


def client_for(address: str, insecure: bool = False) -> Any:
    """A JobSubmissionClient for the dashboard at `address` (http://HEAD:8265), authenticated with the token.
    `insecure` allows plain http to another machine (see check_transport)."""
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise JobsError("no cluster address: pass --address (http://127.0.0.1:8265 through a tunnel to the head, "
                        "or https://HEAD:8265) or set RAY_API_SERVER_ADDRESS")
    # Before the client exists: its constructor already sends the token (it asks the head for its version).
    check_transport(address, insecure)
    token, _ = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given; the explicit one must win.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        with _translate_errors(address):
            return JobSubmissionClient(address, headers=headers)
    finally:
        os.environ.update(hidden)


def default_address() -> str | None:
    """The dashboard address from the environment: RAY_API_SERVER_ADDRESS, or RAY_ADDRESS when it is an http URL."""
    address = os.environ.get("RAY_API_SERVER_ADDRESS")
    if address:
        return address
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else None


def package_working_dir(spec: Spec, dest: str) -> str:
    """Copy the job's source packages and the resolved spec into `dest` (the job's working_dir)."""
    for name in SOURCE_PACKAGES:
        src = REPO_ROOT / name
        if not src.is_dir():
            raise JobsError(f"{src} is missing: submit from a checkout of this repository")
        shutil.copytree(src, os.path.join(dest, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    Path(dest, SPEC_NAME).write_text(spec.to_yaml())
    return dest


def job_request(spec: Spec, spec_path: str, working_dir: str) -> dict[str, Any]:
    """The submit_job arguments: entrypoint, runtime environment and metadata. No credentials in any of them."""
    stem = Path(spec_path).stem.replace("_", "-")
    return {
        "submission_id": f"mixer-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
        "entrypoint": f"python -m pipeline.cli train {SPEC_NAME}",
        "runtime_env": {"working_dir": working_dir, "env_vars": {"PYTHONUNBUFFERED": "1"}},
        "metadata": {"spec": os.path.basename(spec_path), "spec_hash": spec.hash(), "run_url": spec.run.url,
                     "variant": spec.model.variant, "workers": str(spec.cluster.workers)},
    }


def submit(spec_path: str, address: str, overrides: list[str] | None = None, workers: int | None = None,
           out: TextIO = sys.stdout, insecure: bool = False) -> str:
    """Validate the spec here, then submit it as a Ray job; returns the job's submission id. The cluster side runs
    `mixer train`, which resolves the spec for the run (pipeline/run.py) before any worker starts."""
    spec, changed = run.absolute_paths(run.load_spec(spec_path, overrides, workers))
    if changed:
        print(f"note: {', '.join(changed)} made absolute; local paths only work on a cluster that shares this "
              "filesystem (use s3:// URLs on a real cluster)", file=out)
    client = client_for(address, insecure)
    with tempfile.TemporaryDirectory(prefix="mixer-job-") as tmp:
        request = job_request(spec, spec_path, package_working_dir(spec, tmp))
        with _translate_errors(address):
            try:
                job_id = client.submit_job(**request)
            except RuntimeError as e:
                raise JobsError(f"the cluster at {address} refused the job: {e}") from e
    print(f"submitted {job_id}: Mixer-{spec.model.variant} on {spec.cluster.workers} workers, run {spec.run.url}",
          file=out)
    return job_id


def follow(address: str, job_id: str, out: TextIO = sys.stdout, insecure: bool = False) -> str:
    """Stream the job's logs until it ends; returns its final status (SUCCEEDED, FAILED or STOPPED)."""
    client = client_for(address, insecure)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with _translate_errors(address):
        asyncio.run(tail())
        # The log stream can close a moment before the status is final.
        deadline = time.monotonic() + 30
        status = str(client.get_job_status(job_id).value)
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            status = str(client.get_job_status(job_id).value)
    return status


def list_jobs(address: str, insecure: bool = False) -> list[Any]:
    client = client_for(address, insecure)
    with _translate_errors(address):
        return sorted(client.list_jobs(), key=lambda j: j.start_time or 0)


def job_info(address: str, job_id: str, insecure: bool = False) -> Any:
    client = client_for(address, insecure)
    with _translate_errors(address), _unknown_job(job_id):
        return client.get_job_info(job_id)


def job_logs(address: str, job_id: str, insecure: bool = False) -> str:
    client = client_for(address, insecure)
    with _translate_errors(address), _unknown_job(job_id):
        return client.get_job_logs(job_id)


def stop(address: str, job_id: str, wait_s: float = 60.0, insecure: bool = False) -> str:
    """Ask the job to stop and wait until it has; returns its final status."""
    client = client_for(address, insecure)
    with _translate_errors(address), _unknown_job(job_id):
        client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        status = str(client.get_job_status(job_id).value)
        while status not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            status = str(client.get_job_status(job_id).value)
    return status


@contextlib.contextmanager
def _unknown_job(job_id: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise JobsError(f"no job {job_id!r} on this cluster; `mixer jobs list` shows the job ids") from e
        raise
