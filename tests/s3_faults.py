"""A fault-injecting HTTP proxy for S3, for tests: it listens on 127.0.0.1 in front of an S3 endpoint (moto's server)
and, by a seeded schedule, answers some requests with faults instead of the store's answer:

  500    `500 InternalError`, without asking the store
  503    `503 SlowDown`, without asking the store
  reset  the connection is reset: a GET after part of its body (the headers promised all of it), any other request
         before an answer (its body read, the store not asked)
  cut    a GET's body cut short, sent with a Content-Length that matches the cut: the client sees no error at all,
         only fewer bytes (what a broken middlebox does; the reader has to notice by itself)
  stall  the answer waits a short while (`FaultPlan.stall_s`) before it is forwarded

Schedule: the n-th time a request (method, path with query, Range) arrives, a hash of (seed, request, n) decides
whether it is faulted (`rate`) and how, among the kinds that fit it; a request is never faulted more than
`max_in_a_row` times running, so every retried operation ends. The decisions do not depend on the order in which
concurrent clients arrive, except with `cover_kinds`: then, until every kind has been injected once, every request
that fits a kind not injected yet is faulted with it, whatever the draw (so a phase of a few dozen requests surely
meets every kind).
`faults` counts what was injected by kind; `requests` counts requests by method.

`clients_through` and `ray_through` point this process's S3 clients, and the Ray workers started from it, at the
proxy; `Phases` counts faults and requests per phase of a test for `fault_table`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KINDS = ("500", "503", "reset", "cut", "stall")
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL")
_BODY_KINDS = ("reset", "cut")  # faults that need a response body: GETs only
# Headers that belong to one connection, not to the request: never forwarded.
_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}
_MAX_CHUNKS = 1_000_000
_ERROR_BODY = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
               '<RequestId>fault-proxy</RequestId></Error>')
_ERRORS = {"500": (500, "InternalError", "We encountered an internal error. Please try again."),
           "503": (503, "SlowDown", "Please reduce your request rate.")}


@dataclass(frozen=True)
class FaultPlan:
    rate: float = 0.12
    seed: int = 0
    max_in_a_row: int = 3
    stall_s: tuple[float, float] = (0.05, 0.5)
    kinds: tuple[str, ...] = KINDS
    cut_fraction: float | None = None  # the share of a body a cut lets through; None: drawn, a third of them 0
    cover_kinds: bool = False


class S3FaultProxy:
    """Start with `start()` (or `with`); point clients at `endpoint`. `enabled = False` passes everything through."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.plan = plan or FaultPlan()
        self.enabled = True
        self.faults: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self._seen: Counter[tuple[str, str, str]] = Counter()
        self._running: Counter[tuple[str, str, str]] = Counter()  # faults in a row, per request
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    def start(self) -> S3FaultProxy:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        """(faults by kind, requests by method) so far."""
        with self._lock:
            return Counter(self.faults), Counter(self.requests)

    def seen(self) -> Counter[tuple[str, str, str]]:
        """How often each request (method, path with query, Range) has arrived so far."""
        with self._lock:
            return Counter(self._seen)

    def decide(self, method: str, target: str, range_header: str) -> tuple[str | None, float]:
        """The fault for this arrival of the request (None: none) and a number in [0, 1) to size it with."""
        key = (method, target, range_header)
        with self._lock:
            self.requests[method] += 1
            n = self._seen[key]
            self._seen[key] += 1
            if not self.enabled or self._running[key] >= self.plan.max_in_a_row:
                self._running[key] = 0
                return None, 0.0
        digest = hashlib.sha256(f"{self.plan.seed}|{method}|{target}|{range_header}|{n}".encode()).digest()
        draw, pick, size = (int.from_bytes(digest[i:i + 8], "big") / 2**64 for i in (0, 8, 16))
        kinds = [k for k in self.plan.kinds if method == "GET" or k not in _BODY_KINDS]
        if self.plan.cover_kinds:
            with self._lock:
                # The kinds only a GET can take first: GETs are the scarcer requests in most phases.
                missing = sorted((k for k in kinds if not self.faults[k]), key=lambda k: k not in _BODY_KINDS)
            if missing:
                return missing[0], size
        if draw >= self.plan.rate or not kinds:
            with self._lock:
                self._running[key] = 0
            return None, 0.0
        return kinds[int(pick * len(kinds))], size

    def injected(self, method: str, target: str, range_header: str, kind: str | None) -> None:
        """Record what was done to the request: a fault of `kind`, or none (a body fault that did not fit)."""
        key = (method, target, range_header)
        with self._lock:
            if kind is None:
                self._running[key] = 0
            else:
                self._running[key] += 1
                self.faults[kind] += 1

    def forward(self, method: str, target: str, headers: list[tuple[str, str]],
                body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Ask the store: (status, reason, headers, body)."""
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _HOP:
                    conn.putheader(name, value)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: S3FaultProxy

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resets: set[socket.socket] = set()
        self.resets_lock = threading.Lock()

    def shutdown_request(self, request: socket.socket) -> None:
        # A reset connection is closed without the orderly shutdown, so that linger 0 sends an RST.
        with self.resets_lock:
            reset = request in self.resets
            self.resets.discard(request)
        if reset:
            self.close_request(request)
        else:
            super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        pass  # clients that go away mid-answer are expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        range_header = self.headers.get("Range", "")
        kind, size = proxy.decide(self.command, self.path, range_header)
        if kind in _ERRORS:
            self._error(*_ERRORS[kind])
        elif kind == "reset" and self.command != "GET":
            self._reset()
        else:
            if kind == "stall":
                lo, hi = proxy.plan.stall_s
                time.sleep(lo + size * (hi - lo))
            status, reason, headers, data = proxy.forward(self.command, self.path, list(self.headers.items()), body)
            if kind in _BODY_KINDS and not (200 <= status < 300 and len(data) >= 2):
                kind = None  # nothing to cut: answered as it is
            # 0 .. len - 1 bytes get through; a third of the cuts let nothing through (an empty body)
            keep = proxy.plan.cut_fraction if proxy.plan.cut_fraction is not None else max(0.0, size * 1.5 - 0.5)
            cut = min(int(keep * len(data)), len(data) - 1)
            if kind == "cut":
                self._answer(status, reason, headers, data[:cut])
            elif kind == "reset":
                self._answer(status, reason, headers, data[:cut], length=len(data))
                self._reset()
            else:
                self._answer(status, reason, headers, data)
        proxy.injected(self.command, self.path, range_header, kind)

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _read_chunked(self) -> bytes:
        """The raw chunked body, forwarded as it came (the Transfer-Encoding header goes along)."""
        parts = []
        for _ in range(_MAX_CHUNKS):
            line = self.rfile.readline()
            parts.append(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                for _ in range(_MAX_CHUNKS):  # trailers, up to the blank line
                    trailer = self.rfile.readline()
                    parts.append(trailer)
                    if trailer in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
            parts.append(self.rfile.read(size + 2))
        raise ValueError("chunked request body without an end")

    def _answer(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes,
                length: int | None = None) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP | {"transfer-encoding", "content-length"}:
                self.send_header(name, value)
        if self.command == "HEAD":
            head_length = next((v for n, v in headers if n.lower() == "content-length"), "0")
            self.send_header("Content-Length", head_length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data) if length is None else length))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, code: str, message: str) -> None:
        data = b"" if self.command == "HEAD" else _ERROR_BODY.format(code=code, message=message).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _reset(self) -> None:
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self.server.resets_lock:
            self.server.resets.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass


def fault_table(rows: dict[str, tuple[Counter[str], Counter[str]]], extra: dict[str, dict[str, object]]) -> str:
    """A text table: per phase, requests, faults by kind, and the phase's own columns (`extra`)."""
    extra_keys = list(dict.fromkeys(k for cols in extra.values() for k in cols))
    header = ["phase", "requests", *KINDS, "faulted", *extra_keys]
    lines = [header]
    total_faults: Counter[str] = Counter()
    total_requests = 0
    for phase, (faults, requests) in rows.items():
        total_faults += faults
        total_requests += sum(requests.values())
        lines.append([phase, str(sum(requests.values())), *(str(faults[k]) for k in KINDS),
                      str(sum(faults.values())), *(str(extra.get(phase, {}).get(k, "")) for k in extra_keys)])
    lines.append(["total", str(total_requests), *(str(total_faults[k]) for k in KINDS),
                  str(sum(total_faults.values())), *("" for _ in extra_keys)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))) for row in lines)


@contextlib.contextmanager
def clients_through(endpoint: str, **env: str):
    """Point this process's S3 clients at `endpoint` (with extra botocore settings in `env`), restored after."""
    import fsspec
    import s3fs

    changed = {**{k: endpoint for k in ENDPOINT_ENV}, **env}
    saved = {k: os.environ.get(k) for k in changed}
    conf = fsspec.config.conf.get("s3", {})
    saved_conf = conf.get("endpoint_url")
    os.environ.update(changed)
    if "endpoint_url" in conf:
        conf["endpoint_url"] = endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved_conf is not None:
            conf["endpoint_url"] = saved_conf
        s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def ray_through(endpoint: str, ray_cluster: Any):
    """This process and every Ray worker started from here on talk to S3 at `endpoint`: the job's runtime env
    carries it to prepare tasks and Ray Train workers (whose inherited environment names moto directly)."""
    import ray

    env = {k: endpoint for k in ENDPOINT_ENV}
    with clients_through(endpoint):
        ray.shutdown()
        ray.init(address=ray_cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        try:
            yield
        finally:
            ray.shutdown()
            ray.init(address=ray_cluster.address, log_to_driver=False)


class Phases:
    """Per phase of a test: the proxy's counts and the time taken; `extra` takes what the phase checked."""

    def __init__(self, proxy: S3FaultProxy):
        self.proxy = proxy
        self.rows: dict[str, tuple[Counter[str], Counter[str]]] = {}
        self.extra: dict[str, dict[str, object]] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        before_f, before_r = self.proxy.snapshot()
        started = time.monotonic()
        self.extra[name] = {"seconds": ""}
        try:
            yield
        finally:
            faults, requests = self.proxy.snapshot()
            self.rows[name] = (faults - before_f, requests - before_r)
            self.extra[name]["seconds"] = f"{time.monotonic() - started:.0f}"

    def faults(self) -> Counter[str]:
        return sum((f for f, _ in self.rows.values()), Counter())

    def table(self) -> str:
        return fault_table(self.rows, self.extra)
