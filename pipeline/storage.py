"""URLs through fsspec: open, list, and write so that a partial file is never visible.

Credentials and endpoints come from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, instance roles...), never
from specs, so that worker processes started by Ray or torchrun see the same object store as the driver.

Brief faults of an object store (5xx and SlowDown answers, reset connections, timeouts, responses cut short) are
retried here, below every caller: `retry` repeats an operation with exponential backoff and jitter within a time
budget (`run.io_retry_s`, set once per process with `set_retry_budget`), and `ResilientReader` streams an object
front to back, re-opening it at the offset reached when a read fails or comes back empty before the object's end.
What is transient is decided by `is_transient`; a missing object, a refused permission or a failed precondition is
not, and is raised at once. The helpers below (`exists`, `ls`, `read_bytes`, `get_file`, `write_bytes_atomic`,
`put_file_atomic`, `remove`, `sha256_of`) all retry; a caller that holds a filesystem itself wraps its calls in
`retry`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import posixpath
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import MixerError

log = logging.getLogger(__name__)
T = TypeVar("T")

# ---- retrying brief faults ------------------------------------------------------------------------------------------

RETRY_ENV = "MIXER_IO_RETRY_S"  # the budget travels in the environment, so loader processes and children inherit it
DEFAULT_RETRY_S = 300.0
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 20.0
MAX_ATTEMPTS = 1000  # a bound on the attempts of one operation besides its time budget

# The backoff's own generator: drawing jitter from the global `random` would shift a seeded trainer's RNG stream
# whenever a fault happens, and a faulted run would no longer repeat an unfaulted one.
_jitter = random.Random()
# S3 error codes that say "later" rather than "no"; any 5xx status counts as well.
_TRANSIENT_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                              "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                              "BandwidthLimitExceeded", "OperationAborted"})
_TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
                               errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY, errno.EREMOTEIO})
# Answers that will not change by asking again: a missing object, a refused permission, a failed precondition.
_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)
_transient_types_cache: tuple[type[BaseException], ...] | None = None


class StorageError(MixerError):
    """An object store that did not give what was asked; the message names the URL."""


class IncompleteReadError(StorageError, OSError):
    """A response that ended before the object did (a connection cut mid-body, or a body shorter than the object):
    transient, the read is repeated from where it stopped."""


def _retry_s_from_env() -> float:
    try:
        value = float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S))
    except ValueError:
        return DEFAULT_RETRY_S
    return value if value >= 0 else DEFAULT_RETRY_S


_retry_s = _retry_s_from_env()


def set_retry_budget(seconds: float) -> None:
    """How long one storage operation keeps retrying brief faults (`run.io_retry_s`), for this process and the
    processes it starts later (loader processes, subprocesses)."""
    global _retry_s
    if seconds < 0:
        raise ValueError(f"the retry budget must be >= 0 seconds, got {seconds}")
    _retry_s = float(seconds)
    os.environ[RETRY_ENV] = repr(_retry_s)


def retry_budget() -> float:
    return _retry_s


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception classes of the network stack that mean a brief fault; libraries that are not installed are left
    out."""
    global _transient_types_cache
    if _transient_types_cache is None:
        found: list[type[BaseException]] = [ConnectionError, TimeoutError, IncompleteReadError,
                                            http.client.IncompleteRead, http.client.BadStatusLine]
        for module, names in (
            ("fsspec.exceptions", ("FSTimeoutError",)),
            ("botocore.exceptions", ("HTTPClientError", "ConnectionError", "IncompleteReadError",
                                     "FlexibleChecksumError")),
            ("botocore.parsers", ("ResponseParserError",)),
            ("aiohttp", ("ClientPayloadError", "ClientConnectionError")),
            ("urllib3.exceptions", ("ProtocolError", "TimeoutError", "IncompleteRead")),
        ):
            with contextlib.suppress(ImportError):
                imported = __import__(module, fromlist=list(names))
                found += [getattr(imported, n) for n in names if hasattr(imported, n)]
        _transient_types_cache = tuple(found)
    return _transient_types_cache


def _verdict(e: BaseException) -> bool | None:
    """True or False when `e` itself decides whether it is transient, None when its cause has to."""
    if isinstance(e, _PERMANENT):
        return False
    response = getattr(e, "response", None)  # botocore's ClientError: decided by the S3 code and HTTP status
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        code = response["Error"].get("Code", "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_CODES or status >= 500 or status in (408, 429)
    if isinstance(e, _transient_types()):
        return True
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(error: BaseException) -> bool:
    """Whether asking again may succeed: 5xx and throttling answers (SlowDown), reset or refused connections,
    timeouts, responses cut short or unparseable. Not: 403, 404/NoSuchKey, failed preconditions, bad requests, or
    anything that is not an I/O error. s3fs translates S3 errors into OSErrors with the original as `__cause__`, so
    the chain of causes is followed until one decides."""
    e: BaseException | None = error
    for _ in range(8):  # causes nest a few levels at most
        if e is None:
            return False
        verdict = _verdict(e)
        if verdict is not None:
            return verdict
        e = e.__cause__
    return False


class Backoff:
    """The waits between attempts of one operation: exponential with full jitter, within a time budget that starts
    at the first failure. `wait(error)` sleeps, or re-raises `error` when it is not transient or the budget (or
    MAX_ATTEMPTS) is spent."""

    def __init__(self, what: str, budget_s: float | None = None):
        self.what = what
        self.budget_s = _retry_s if budget_s is None else budget_s
        self.failures, self._deadline, self._delay = 0, None, FIRST_DELAY_S

    def wait(self, error: BaseException) -> None:
        if not is_transient(error):
            raise error
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self.budget_s
        self.failures += 1
        left = self._deadline - now
        if left <= 0 or self.failures >= MAX_ATTEMPTS:
            error.add_note(f"{self.what}: gave up after {self.failures} attempts within the retry budget of "
                           f"{self.budget_s:.0f} s (run.io_retry_s)")
            raise error
        pause = min(left, _jitter.uniform(0, self._delay))
        log.warning("%s: %s: %s; retrying in %.1f s (attempt %d, %.0f s of the retry budget left)", self.what,
                    type(error).__name__, str(error).strip()[:200], pause, self.failures + 1, left)
        time.sleep(pause)
        self._delay = min(self._delay * 2, MAX_DELAY_S)


def retry(fn: Callable[[], T], *, what: str, budget_s: float | None = None) -> T:
    """`fn()`, repeated after transient errors (see `is_transient`) with exponential backoff and jitter until it
    succeeds or `budget_s` (default: the process's `run.io_retry_s`) has passed since the first failure; then the
    last error is raised, with a note saying so. `fn` must be safe to repeat: a put of the same bytes, a read, a
    listing, a delete."""
    backoff = Backoff(what, budget_s)
    for _ in range(MAX_ATTEMPTS):
        try:
            return fn()
        except Exception as e:
            backoff.wait(e)
    raise AssertionError("unreachable: Backoff.wait raises on the last attempt")


class ResilientReader:
    """A read-only stream of the object at `url`, front to back, that outlives brief faults: after a transient error,
    or a read that comes back empty before the object's end (a response cut short), it re-opens the object at the
    offset reached and goes on, so the caller sees one unbroken stream (a tar read streams on instead of starting
    again). The retry budget counts from the first failure after the last good read. `sha256=True` hashes the bytes
    as they pass (`digest`); `offset` is the count of bytes read, `size` the object's size (None where the store
    does not say, and then an empty read is the end)."""

    def __init__(self, url: str, *, block_size: int | None = None, sha256: bool = False,
                 budget_s: float | None = None):
        self.url = url
        self.offset = 0
        self.digest = hashlib.sha256() if sha256 else None
        self._fs, self._path = filesystem(url)
        self._open_kwargs = {"block_size": block_size} if block_size else {}
        self._budget_s = budget_s
        self._f, self.size = retry(self._open_here, what=f"open {url}", budget_s=budget_s)

    def _open_here(self) -> tuple[Any, int | None]:
        f = self._fs.open(self._path, "rb", **self._open_kwargs)
        try:
            size = getattr(f, "size", None)
            if size is None:
                size = self._fs.size(self._path)
            if self.offset:
                f.seek(self.offset)
            return f, None if size is None else int(size)
        except BaseException:
            f.close()
            raise

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(8 << 20), b""))
        # A fresh budget for each read: a long stream survives any number of separate faults.
        backoff = Backoff(f"read {self.url} at byte {self.offset}", self._budget_s)
        for _ in range(MAX_ATTEMPTS):
            try:
                data = self._f.read(n) if self._f is not None else b""
                if not data and n and self.size is not None and self.offset < self.size:
                    raise IncompleteReadError(f"{self.url}: the response ended at byte {self.offset} of {self.size}")
                self.offset += len(data)
                if self.digest is not None:
                    self.digest.update(data)
                return data
            except Exception as e:
                backoff.wait(e)
                self._reopen(backoff)
        raise AssertionError("unreachable: Backoff.wait raises on the last attempt")

    def _reopen(self, backoff: Backoff) -> None:
        """Open the object again at `offset`; failures here spend the same budget as the read's."""
        self._close_file()
        for _ in range(MAX_ATTEMPTS):
            try:
                self._f, self.size = self._open_here()
                return
            except Exception as e:
                backoff.wait(e)

    def _close_file(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):  # a connection that broke may not close cleanly either
                f.close()

    def close(self) -> None:
        self._close_file()

    def __enter__(self) -> ResilientReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it. Listings are never served from a stale cache."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache()
    _guard_listings(fs)
    return fs, path


_guard_lock = threading.Lock()
_s3fs_retries_cuts = False


def _check_listing(parsed: Any = None, **kwargs: Any) -> None:
    # A ListObjectsV2 body cut short fails to parse, except one cut to nothing: that parses as an answer with no
    # field at all (not even the bucket's Name), which s3fs would take for an empty folder: a run without
    # checkpoints, a dataset without shards.
    if isinstance(parsed, dict) and not parsed.keys() - {"ResponseMetadata"}:
        raise IncompleteReadError("an S3 listing came back with an empty body: the response was cut short")


def _guard_listings(fs: fsspec.AbstractFileSystem) -> None:
    """On s3fs, make a listing whose body was cut to nothing an error (transient, so retried) instead of an empty
    folder: a hook on the botocore client in use and on its session, for the clients it creates later.
    Marked on the instance, not looked up by it: fsspec instances compare equal by their options."""
    if type(fs).__name__ != "S3FileSystem":
        return
    client = getattr(fs, "_s3", None)
    if client is not None and getattr(fs, "_mixer_listing_guard", None) is client:
        return
    with _guard_lock:
        global _s3fs_retries_cuts
        if not _s3fs_retries_cuts:
            # s3fs then repeats the listing call itself (each page of it), also where a caller uses fs.ls directly.
            import s3fs.core

            s3fs.core.add_retryable_error(IncompleteReadError)
            _s3fs_retries_cuts = True
        fs.connect()  # creates the client once; a no-op after
        client = fs._s3
        for events in (fs.session, client.meta.events):
            events.register("after-call.s3.ListObjectsV2", _check_listing, unique_id="mixer-listing-guard")
        fs._mixer_listing_guard = client


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)

    def attempt() -> bool:
        fs.invalidate_cache(path)
        return fs.exists(path)

    return retry(attempt, what=f"exists {url}")


def ls(url: str, detail: bool = False) -> list[Any]:
    """The entries of the folder `url` (paths without the protocol, or info dicts with `detail`), listed afresh;
    FileNotFoundError when there is no such folder."""
    fs, path = filesystem(url)

    def attempt() -> list[Any]:
        fs.invalidate_cache(path)
        return fs.ls(path, detail=detail)

    return retry(attempt, what=f"list {url}")


def read_bytes(url: str) -> bytes:
    """The whole object at `url`. From an object store the length is checked against the object's size, since a
    response cut short can arrive without any error."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return fs.cat_file(path)

    def attempt() -> bytes:
        fs.invalidate_cache(path)
        size = fs.size(path)  # None where the store does not say (some HTTP servers): nothing to check then
        data = fs.cat_file(path)
        if size is not None and len(data) != size:
            raise IncompleteReadError(f"{url}: got {len(data)} bytes of {size}")
        return data

    return retry(attempt, what=f"read {url}")


def get_file(url: str, local_path: str) -> None:
    """Download the object at `url` to `local_path` (overwritten), checking the length as `read_bytes` does."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        fs.get_file(path, local_path)
        return

    def attempt() -> None:
        fs.invalidate_cache(path)
        size = fs.size(path)
        fs.get_file(path, local_path)
        if size is not None and os.path.getsize(local_path) != size:
            raise IncompleteReadError(f"{url}: got {os.path.getsize(local_path)} bytes of {size}")

    retry(attempt, what=f"download {url}")


def remove(url: str, recursive: bool = False) -> None:
    """Delete the object (or with `recursive` the folder) at `url`; one already gone is no error, since an attempt
    that failed on the way back may have deleted it."""
    fs, path = filesystem(url)

    def attempt() -> None:
        fs.invalidate_cache(path)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=recursive)

    retry(attempt, what=f"remove {url}")


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def json_object(text: str | bytes, where: str, error: type[Exception]) -> dict[str, Any]:
    """`text` parsed as one JSON object; anything else raises `error`, naming `where`."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise error(f"{where}: not a JSON object ({e})") from e
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def json_lines(text: str, where: str, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of JSON Lines `text`, blank lines skipped; a line that is not a JSON
    object raises `error`, naming `where` and the line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield number, json_object(line, f"{where}, line {number}", error)


def _publish(tmp: str, path: str) -> None:
    """Give a finished temporary file the permissions of a normally created one, then rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


IDENTITY_KEYS = ("ETag", "etag", "md5Hash", "generation")


def identity(info: dict[str, Any]) -> dict[str, Any]:
    """What tells one version of a file or object from another, from a listing's or a HEAD's info: its size and the
    store's own version tag (an S3 ETag, a GCS hash) or, on a local disk, its modification time."""
    key = next((k for k in IDENTITY_KEYS if info.get(k)), None)
    tag = {"tag": str(info[key]).strip('"')} if key else {"mtime": float(info.get("mtime") or 0.0)}
    return {"size": int(info.get("size") or 0), **tag}


def object_identity(url: str) -> dict[str, Any]:
    fs, path = filesystem(url)

    def attempt() -> dict[str, Any]:
        fs.invalidate_cache(path)
        return identity(fs.info(path))

    return retry(attempt, what=f"stat {url}")


def sha256_of(url: str, chunk_size: int = 8 << 20) -> tuple[int, str]:
    """(size, sha256) of the file or object at `url`, streamed."""
    with ResilientReader(url, block_size=chunk_size, sha256=True) as f:
        while f.read(chunk_size):
            pass
        return f.offset, f.digest.hexdigest()


@contextlib.contextmanager
def _staged(path: str) -> Iterator[str]:
    """A temporary local name next to `path` for the block to write; renamed onto `path` once the block is done
    and the bytes are on disk, removed if it fails."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Make `data` visible at `url` all at once. Local files go through a temporary name in the same folder and a
    rename; an object store publishes an object only when its upload completes, so a plain put is already atomic."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        with _staged(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    else:
        retry(lambda: fs.pipe_file(path, data), what=f"write {url}")


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def put_file_atomic(local_path: str, url: str) -> None:
    """Copy a local file to `url`, visible only once complete."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        with _staged(path) as tmp:
            fs.put_file(local_path, tmp)
    else:
        retry(lambda: fs.put_file(local_path, path), what=f"upload {url}")
