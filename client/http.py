"""A small threaded HTTP client for TorchServe predictions.

Used by the folder classifier (``client.classify``), the benchmark and the tests.

Each worker thread keeps one keep-alive connection. Loops are bounded by a request count and a
deadline, and the target must be a loopback address.

The client speaks HTTP/1.1 over a plain socket rather than through ``http.client``: the load it
sends shares the machine with the server it measures, and ``http.client`` parses each answer's
headers with the email package: a 15 kB request and its answer cost 113 µs of the client's CPU
through it and 80 µs here, the kernel's loopback work included (AMD EPYC, one thread, against a
server that answers at once; a probe, docs/benchmarks.md "Server tuning"). It reads answers sized
by Content-Length, chunked, or ended by the server closing the connection.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Result:
    status: int
    body: dict | None
    seconds: float
    index: int = -1
    finished: float = 0.0  # time.monotonic() when the answer (or the failure) came


@dataclass
class Client:
    base: str            # e.g. http://127.0.0.1:8080
    token: str | None
    model: str = "mrl_resnet50"
    timeout: float = 60.0
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        host = urlsplit(self.base).hostname or ""
        if not (host == "localhost" or host.startswith("127.") or host == "::1"):
            raise ValueError(f"load is only ever sent to loopback addresses, not {host!r}")

    def _conn(self) -> _Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            u = urlsplit(self.base)
            conn = self._local.conn = _Connection(u.hostname, u.port or 80, self.timeout)
        return conn

    def predict(self, body: bytes, headers: dict | None = None, path: str | None = None) -> Result:
        """POST ``body`` to /predictions/{model}, or to ``path`` (e.g. /models/{m}/invoke?top_k=2)."""
        hdrs = {"Content-Type": "application/octet-stream", **(headers or {})}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        t0 = time.perf_counter()
        for attempt in (0, 1):  # one retry on a connection the server closed while idle
            conn = self._conn()
            try:
                status, raw = conn.post(path or f"/predictions/{self.model}", body, hdrs)
                break
            except _Stale:
                conn.close()
                self._local.conn = None
                if attempt:
                    raise ConnectionResetError("the server closed the connection before it answered") from None
            except OSError:
                conn.close()
                self._local.conn = None
                raise
        seconds = time.perf_counter() - t0
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = {"raw": raw[:200].decode("utf-8", "replace")}
        return Result(status, parsed, seconds, finished=time.monotonic())


class _Stale(Exception):
    """A kept-alive connection the server had closed: nothing of an answer came back."""


class _Truncated(ConnectionResetError):
    """The server closed the connection part-way through an answer: not retried."""


class _Connection:
    """One HTTP/1.1 keep-alive connection: a request written in one send, its answer read whole."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.address, self.timeout = (host, port), timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""

    def post(self, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        fresh = self.sock is None
        if fresh:
            self.sock = socket.create_connection(self.address, timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host = f"{self.address[0]}:{self.address[1]}"
        head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        try:
            self.sock.sendall(head.encode("latin-1") + body)
            return self._answer()
        except _Truncated:
            raise
        except (BrokenPipeError, ConnectionResetError, _Stale):
            if fresh:
                raise ConnectionResetError("the server closed a new connection before it answered") from None
            raise _Stale() from None

    def _fill(self) -> bool:
        data = self.sock.recv(262144)
        self.buf += data
        return bool(data)

    def _answer(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                if self.buf:
                    raise _Truncated("the server closed the connection inside an answer's headers")
                raise _Stale()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "chunked" in fields.get("transfer-encoding", "").lower():
            body = self._chunked()
        elif "content-length" in fields:
            body = self._exactly(int(fields["content-length"]))
        else:  # the answer ends where the server closes the connection
            while self._fill():
                pass
            body, self.buf = self.buf, b""
            fields["connection"] = "close"
        if fields.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0"):
            self.close()
        return status, body

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise _Truncated("the server closed the connection inside an answer's body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise _Truncated("the server closed the connection inside a chunked answer")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self._line().split(b";", 1)[0], 16)
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            self._exactly(2)  # the chunk's CRLF


def run_load(client: Client, bodies: Sequence[bytes], *, concurrency: int, count: int | None = None,
             duration: float | None = None, headers: dict | None = None) -> list[Result]:
    """Send ``bodies`` round-robin from ``concurrency`` threads until ``count`` requests are done
    or ``duration`` seconds have passed (at least one bound is required)."""
    if count is None and duration is None:
        raise ValueError("give count or duration: load loops are always bounded")
    results: list[Result] = []
    lock = threading.Lock()
    next_index = [0]
    deadline = time.monotonic() + duration if duration else float("inf")

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next_index[0]
                if count is not None and i >= count:
                    return
                next_index[0] += 1
            try:
                r = client.predict(bodies[i % len(bodies)], headers)
            except OSError as exc:  # timeouts and refused connections are results too
                r = Result(0, {"error": type(exc).__name__}, client.timeout, finished=time.monotonic())
            r.index = i
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r.index)
