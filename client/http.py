"""A small threaded HTTP client for TorchServe predictions.

Used by the folder classifier (``client.classify``), the benchmark and the tests.

Each worker thread keeps one keep-alive connection. Loops are bounded by a request count and a
deadline, and the target must be a loopback address.
"""
from __future__ import annotations

import http.client
import json
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

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            u = urlsplit(self.base)
            conn = self._local.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=self.timeout)
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
                conn.request("POST", path or f"/predictions/{self.model}", body=body, headers=hdrs)
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        seconds = time.perf_counter() - t0
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = {"raw": raw[:200].decode("utf-8", "replace")}
        return Result(resp.status, parsed, seconds, finished=time.monotonic())


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
