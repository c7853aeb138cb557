"""One writer per run URL: a lease object `RUN/lease.json`, taken with a conditional create, renewed while the run
trains, released at its end.

The lease names its holder: the launch (one `mixer train`, one torchrun launch), host, pid, since and until when.
Another launch is refused while the lease is live; workers that Ray Train (or torchrun) restarts within the SAME
launch re-take it, since the launch id is what the holder is known by; a lease that has expired (its holder died
without releasing it) is taken over, with a warning naming the previous holder.

Every change is a compare-and-swap against the object's current version, so that two launches racing for a free or
expired lease never both win:
- S3: `PutObject` with `If-None-Match: *` (create) or `If-Match: <etag>` (renew, take over), `DeleteObject` with
  `If-Match` (release); the store answers 412 when the condition fails.
- local files: create with `os.link` of a complete temporary file (fails if the name exists, like O_CREAT|O_EXCL,
  and never shows a half-written lease); renew, take over and release under an exclusive `flock` of the run folder.
- any other fsspec file system: the same steps without an atomic condition (logged once): best effort only.
Expiry compares wall clocks of different hosts: keep them in sync (NTP) and the TTL well above their skew.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from pipeline import storage
from pipeline.errors import MixerError

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
# Set by `pipeline.launch.run` for its workers: every worker of one `mixer train`, restarted or not, shares it.
LAUNCH_ENV = "MIXER_LAUNCH_ID"
DEFAULT_TTL_S = 300.0
TAKE_ATTEMPTS = 5
# A process started by no launcher we know of is a launch of its own.
_PROCESS_LAUNCH = f"process-{uuid.uuid4().hex[:12]}"


class LeaseError(MixerError):
    """The run's lease cannot be taken or has been lost; the message names the holder and what to do."""


def launch_id() -> str:
    """The id of the launch this process belongs to: `MIXER_LAUNCH_ID` (set by `mixer train` for its Ray Train
    workers), else torchrun's rendezvous id, else (torchrun without --rdzv-id, whose id is "none") the host and
    elastic agent that restart this worker, else this process alone."""
    if os.environ.get(LAUNCH_ENV):
        return os.environ[LAUNCH_ENV]
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if run_id:
        return f"torchrun-{socket.gethostname()}-{os.getppid()}"
    return _PROCESS_LAUNCH


def lease_url(run_url: str) -> str:
    return storage.join(run_url, LEASE_NAME)


def describe(record: dict[str, Any]) -> str:
    """The holder of a lease, for messages: launch, host, pid, since and until when."""
    return (f"launch {record.get('launch_id')} on host {record.get('host')}, pid {record.get('pid')}, "
            f"since {record.get('since')}, until {record.get('expires')}")


def expired(record: dict[str, Any], now: float | None = None) -> bool:
    return float(record.get("expires_at", 0)) <= (time.time() if now is None else now)


def read(run_url: str) -> dict[str, Any] | None:
    """The run's current lease record (live or expired), or None when there is none."""
    current = _backend(lease_url(run_url)).read()
    return current[0] if current else None


def live_holder(run_url: str, launch: str | None = None) -> dict[str, Any] | None:
    """The record of a live lease held by another launch than `launch` (default: this process's), else None."""
    record = read(run_url)
    if record is None or expired(record) or record.get("launch_id") == (launch or launch_id()):
        return None
    return record


def release_if_held(run_url: str, launch: str) -> bool:
    """Drop the run's lease if `launch` holds it (a launcher cleaning up after its workers ended or failed)."""
    backend = _backend(lease_url(run_url))
    current = backend.read()
    if current is None or current[0].get("launch_id") != launch:
        return False
    return backend.delete(current[1])


class Lease:
    """The lease of one run, as held (or wanted) by this process on behalf of its launch."""

    def __init__(self, run_url: str, ttl_s: float = DEFAULT_TTL_S, launch: str | None = None):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.url = lease_url(run_url)
        self.ttl_s = float(ttl_s)
        self.launch = launch or launch_id()
        self._backend = _backend(self.url)
        self._version: str | None = None
        self._since = ""
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        host, pid = socket.gethostname(), os.getpid()
        return {"holder": f"{self.launch}/{host}/{pid}", "launch_id": self.launch, "host": host, "pid": pid,
                "since": self._since or _iso(now), "renewed": _iso(now), "expires": _iso(now + self.ttl_s),
                "expires_at": now + self.ttl_s, "ttl_s": self.ttl_s}

    def take(self) -> None:
        """Take the lease: create it, re-take it from this same launch, or take over an expired one. Raises
        LeaseError naming the holder when another launch holds it."""
        self._since = ""
        for _ in range(TAKE_ATTEMPTS):
            current = self._backend.read()
            body = self._record()
            if current is None:
                self._version = self._backend.create(body)
            else:
                record, version = current
                if record.get("launch_id") != self.launch and not expired(record):
                    raise LeaseError(f"{self.url}: the run is in use by {describe(record)}; wait for that run to end "
                                     "(or, if it died, for its lease to expire), or use another run.url")
                if record.get("launch_id") == self.launch:
                    log.info("%s: re-taking the lease of this launch (was %s)", self.url, describe(record))
                else:
                    log.warning("%s: taking over the expired lease of %s", self.url, describe(record))
                self._version = self._backend.replace(body, version)
            if self._version is not None:
                self._lost, self._since = None, body["since"]
                log.info("%s: lease taken by %s for %.0f s", self.url, body["holder"], self.ttl_s)
                return
        raise LeaseError(f"{self.url}: the lease kept changing under {TAKE_ATTEMPTS} attempts to take it; another "
                         "launch is starting on this run.url: stop one of them")

    def renew(self) -> bool:
        """Extend the lease by its TTL. False (and `problem()` says why) when another launch has taken it."""
        if self._version is None:
            raise LeaseError(f"{self.url}: renew() before take()")
        version = self._backend.replace(self._record(), self._version)
        if version is not None:
            self._version = version
            return True
        current = self._backend.read()
        holder = describe(current[0]) if current else "nobody (the lease was deleted)"
        self._lost = f"{self.url}: lease lost; it is now held by {holder}"
        log.error("%s", self._lost)
        return False

    def start_renewing(self) -> None:
        """Renew every TTL/3 in a daemon thread (it dies with the process, and the lease then expires)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except Exception as e:  # a store hiccup: the next tick tries again, well before expiry
                log.warning("%s: lease renewal failed (%s: %s); retrying", self.url, type(e).__name__, e)

    def problem(self) -> str | None:
        """Why this process no longer holds the lease, or None while it does."""
        return self._lost

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._version is not None and self._lost is None:
            if not self._backend.delete(self._version):
                log.warning("%s: lease changed before release; left as it is", self.url)
        self._version = None


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _decode(data: bytes, url: str) -> dict[str, Any]:
    return storage.json_object(data, f"{url}: unreadable lease (if no run is using this run.url, delete it)",
                               LeaseError)


# ---- compare-and-swap on one object: (record, version) reads, and writes that name the version they replace ----

def _backend(url: str) -> Any:
    fs, path = storage.filesystem(url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return _LocalFile(path)
    if "s3" in protocols or "s3a" in protocols:
        return _S3Object(fs, path, url)
    return _AnyFile(fs, path, url)


class _LocalFile:
    def __init__(self, path: str):
        self.path = path
        self.folder = os.path.dirname(path)

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return _decode(data, self.path), hashlib.sha256(data).hexdigest()

    def _complete_temp(self, body: bytes) -> str:
        os.makedirs(self.folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".lease-")
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        return tmp

    def create(self, record: dict[str, Any]) -> str | None:
        body = _encode(record)
        tmp = self._complete_temp(body)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return hashlib.sha256(body).hexdigest()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The run folder itself is the lock: no lock file to leave behind or to race on.
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def replace(self, record: dict[str, Any], version: str) -> str | None:
        body = _encode(record)
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return None
            tmp = self._complete_temp(body)
            os.replace(tmp, self.path)
        return hashlib.sha256(body).hexdigest()

    def delete(self, version: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return False
            os.remove(self.path)
        return True


def _precondition_failed(e: OSError) -> bool:
    """s3fs turns the store's 412 (and 409, a concurrent conditional write) into OSErrors; the cause keeps the code."""
    response = getattr(e.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class _S3Object:
    def __init__(self, fs: Any, path: str, url: str):
        self.fs, self.url = fs, url
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs: Any) -> Any:
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=self.key, **kwargs)

    def read(self) -> tuple[dict[str, Any], str] | None:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            data, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return _decode(data, self.url), etag

    def _put(self, record: dict[str, Any], **condition: str) -> str | None:
        try:
            return self._call("put_object", Body=_encode(record), ContentType="application/json", **condition)["ETag"]
        except OSError as e:
            if isinstance(e, FileExistsError) or _precondition_failed(e):
                return None
            raise

    def create(self, record: dict[str, Any]) -> str | None:
        return self._put(record, IfNoneMatch="*")

    def replace(self, record: dict[str, Any], version: str) -> str | None:
        return self._put(record, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            self._call("delete_object", IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True


class _AnyFile:
    _warned: set[str] = set()

    def __init__(self, fs: Any, path: str, url: str):
        self.fs, self.path, self.url = fs, path, url
        protocol = str(fs.protocol)
        if protocol not in self._warned:
            self._warned.add(protocol)
            log.warning("%s: this file system offers no conditional create; the one-writer lease is best effort", url)

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return _decode(data, self.url), hashlib.sha256(data).hexdigest()

    def create(self, record: dict[str, Any]) -> str | None:
        if self.read() is not None:
            return None
        body = _encode(record)
        self.fs.pipe_file(self.path, body)
        return hashlib.sha256(body).hexdigest()

    def replace(self, record: dict[str, Any], version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        body = _encode(record)
        self.fs.pipe_file(self.path, body)
        return hashlib.sha256(body).hexdigest()

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm_file(self.path)
        return True
