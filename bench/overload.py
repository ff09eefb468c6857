"""Overload: open-loop arrivals at 1x, 2x and 4x the measured saturation rate, in one run.

    python -m bench.overload [--model imagenet|demo] [--multiples 1,2,4] [--phase-s 60] [--queue-wait-s 0.5]
                                                                               # docs/results/overload.json

The server first runs closed-loop (8 clients, ``--sat-s``) to measure its saturation rate R. The
archive is then rebuilt with a job queue sized to ``--queue-wait-s`` x R requests (jobQueueSize),
so that a request either starts within about that long or is refused at once with 503, and each
phase sends requests at a fixed multiple of R, evenly spaced, whatever the server does (open loop:
a slow server does not slow the arrivals). Per phase: answered (200), refused (503, with the
body TorchServe sends), other statuses and client-side failures, p50/p99 of each, the slowest
answer against the response timeout, how late the client sent (its own lag: a client that cannot
keep up would flatter the server), and the worker's RSS before and after.

The ImageNet-size model (a randomly initialised official-format MRL ResNet50, 224x224) is the
default: it saturates at a rate a Python client on the same 2 cores can exceed 4x. Traffic goes
to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.harness import DEMO, ROOT, demo_inputs, header, imagenet_inputs, make_checkpoints, save_report, server
from client.http import Client, Result, run_load
from model_store.serve import processes

TIMEOUT_S = 30  # the archives' responseTimeout


def open_loop(client: Client, bodies: list[bytes], rate: float, duration: float,
              max_in_flight: int = 400) -> tuple[list[Result], dict]:
    """Send ``rate`` requests a second, evenly spaced, for ``duration`` seconds; each from its own
    thread of a bounded pool. Arrivals that find every thread busy are counted, not sent late."""
    n = int(rate * duration)
    results: list[Result] = []
    lags: list[float] = []
    lock = threading.Lock()
    free = threading.BoundedSemaphore(max_in_flight)
    not_sent = 0

    def send(i: int) -> None:
        try:
            try:
                r = client.predict(bodies[i % len(bodies)])
            except OSError as exc:  # a refused or reset connection is a result too
                r = Result(0, {"error": type(exc).__name__}, client.timeout, i, time.monotonic())
            with lock:
                results.append(r)
        finally:
            free.release()

    with ThreadPoolExecutor(max_in_flight) as pool:
        t0 = time.monotonic()
        for i in range(n):
            target = t0 + i / rate
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not free.acquire(blocking=False):
                not_sent += 1
                continue
            lags.append(time.monotonic() - target)
            pool.submit(send, i)
    return results, {"scheduled": n, "not_sent_pool_full": not_sent,
                     "client_lag_p99_ms": 1000 * float(np.percentile(lags, 99)) if lags else None}


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0}
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def worker_rss_mb(env: dict) -> float:
    procs = processes(env)
    return sum(p.memory_info().rss for p in procs[1:]) / 2**20 if len(procs) > 1 else float("nan")


def phase_report(results: list[Result], sent: dict, rate: float, duration: float, rss: tuple) -> dict:
    ok = [r.seconds for r in results if r.status == 200]
    refused = [r for r in results if r.status == 503]
    other = [r for r in results if r.status not in (200, 503)]
    bodies = sorted({json.dumps(r.body)[:240] for r in refused})[:3]
    return {"rate_per_s": rate, "duration_s": duration, **sent, "answered": len(ok), "refused_503": len(refused),
            "other": {str(s): sum(1 for r in other if r.status == s) for s in sorted({r.status for r in other})},
            "answered_latency": percentiles(ok), "refused_latency": percentiles([r.seconds for r in refused]),
            "answered_per_s": len(ok) / duration, "past_response_timeout": sum(1 for s in ok if s > TIMEOUT_S),
            "refusal_bodies": bodies, "worker_rss_mb_before": rss[0], "worker_rss_mb_after": rss[1]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="imagenet", choices=("imagenet", "demo"))
    p.add_argument("--multiples", default="1,2,4")
    p.add_argument("--phase-s", type=float, default=60.0)
    p.add_argument("--sat-s", type=float, default=20.0, help="closed-loop phase that measures saturation")
    p.add_argument("--queue-wait-s", type=float, default=0.5,
                   help="the job queue holds this many seconds of work at the saturation rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "overload.json"))
    args = p.parse_args(argv)
    multiples = [float(m) for m in args.multiples.split(",")]
    report = {**header("bench.overload", argv), "model": args.model,
              "response_timeout_s": TIMEOUT_S, "phases": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.model == "imagenet":
            ckpt, bodies = make_checkpoints(tmp)["imagenet"]["fp32"], imagenet_inputs()
        else:
            ckpt, bodies = DEMO / "mrl_resnet50_fp16.pt", demo_inputs()
        settings = dict(batch_size=args.batch_size, timeout=TIMEOUT_S, workers=1)
        with server(tmp, ckpt, {"mrl_resnet50": settings}, own_tmpdir=True) as srv:
            client = srv.client(timeout=2 * TIMEOUT_S)
            run_load(client, bodies, concurrency=8, duration=5)  # warm
            t0 = time.perf_counter()
            sat = run_load(client, bodies, concurrency=8, duration=args.sat_s)
            rate = sum(r.status == 200 for r in sat) / (time.perf_counter() - t0)
            queue = max(1, round(args.queue_wait_s * rate))
            report.update(saturation_per_s=rate, queue_size=queue,
                          saturation_latency=percentiles([r.seconds for r in sat if r.status == 200]))
            print(f"saturation {rate:.1f}/s closed-loop (8 clients); job queue {queue}", flush=True)
        # The same archive again, its job queue sized to the rate just measured.
        with server(tmp, ckpt, {"mrl_resnet50": {**settings, "queue_size": queue}}, own_tmpdir=True) as srv:
            client = srv.client(timeout=2 * TIMEOUT_S)
            run_load(client, bodies, concurrency=8, duration=5)  # warm the new worker
            for m in multiples:
                before = worker_rss_mb(srv.env)
                results, sent = open_loop(client, bodies, m * rate, args.phase_s)
                row = {"multiple": m, **phase_report(results, sent, m * rate, args.phase_s,
                                                     (before, worker_rss_mb(srv.env)))}
                report["phases"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "refusal_bodies"}), flush=True)
                time.sleep(5)  # let the queue drain between phases
    return save_report(report, args.out)


if __name__ == "__main__":
    main()
