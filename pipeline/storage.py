"""URLs through fsspec: open, list, and write so that a partial file is never visible.

Credentials and endpoints come from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, instance roles...), never
from specs, so that worker processes started by Ray or torchrun see the same object store as the driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path inside it. Listings are never served from a stale cache."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache()
    return fs, path


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def json_lines(text: str, where: str, error: type[Exception]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each line of JSON Lines `text`, blank lines skipped; a line that is not a JSON
    object raises `error`, naming `where` and the line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise error(f"{where}, line {number}: not a JSON object ({e})") from e
        if not isinstance(obj, dict):
            raise error(f"{where}, line {number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _publish(tmp: str, path: str) -> None:
    """Give a finished temporary file the permissions of a normally created one, then rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def sha256_of(url: str, chunk_size: int = 8 << 20) -> tuple[int, str]:
    """(size, sha256) of the file or object at `url`, streamed."""
    fs, path = filesystem(url)
    h, size = hashlib.sha256(), 0
    with fs.open(path, "rb", block_size=chunk_size) as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


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
        fs.pipe_file(path, data)


def write_json_atomic(url: str, obj: Any) -> None:
    write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def put_file_atomic(local_path: str, url: str) -> None:
    """Copy a local file to `url`, visible only once complete."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        with _staged(path) as tmp:
            fs.put_file(local_path, tmp)
    else:
        fs.put_file(local_path, path)
