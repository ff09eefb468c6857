"""Recovery from a killed worker, and 1 worker against 2, in one run.

    python -m bench.recovery [--model demo|imagenet] [--workers 1,2] [--kills 3] [--clients 8]
                                                                              # docs/results/recovery.json

For each worker count: one archive, one TorchServe on 127.0.0.1. Closed-loop throughput from
``--clients`` clients first, then ``--kills`` times: the same load runs, one worker gets SIGKILL
3 s in, and the load goes on until ``--load-s``. From the clients' own answers:

- recovery_s: from the kill to the first correct answer to a request *sent after* the kill (an
  answer already on its way when the worker died does not count);
- longest_gap_s: the longest time, from the kill on, with no correct answer at all;
- failed: the answers that were not 200, with their statuses and when each came (only requests
  in flight on the killed worker should fail, at once: at most one batch).

From TorchServe's logs: when the frontend saw the worker die and when it started the new one
(its back-off), and the new worker's own ``mrl worker start`` line: the interpreter and imports
(process age at initialize), and initialize itself (checkpoint, graph, warm-up per batch size).
An answer is correct when its label and embedding size equal those given to the same image
before the first kill.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.harness import DEMO, ROOT, demo_inputs, header, imagenet_inputs, make_checkpoints, save_report, server
from bench.overload import percentiles
from client.http import Client, run_load
from model_store.serve import MANAGEMENT, describe

START_LINE = re.compile(r"mrl worker start: process_age_s=([\d.]+) initialize_s=([\d.]+) "
                        r"graph_s=([\d.]+) warm_up_s=([\d.]+) graph_cached=(\w+)")
RETRY_LINE = re.compile(r"Retry worker: (\S+) in (\d+) seconds")


def worker_pids(model: str, token: str, management: str = MANAGEMENT) -> dict[int, str]:
    return {int(w["pid"]): w["status"] for w in describe(model, token, management)["workers"] if w.get("pid")}


def new_log(path: Path, offset: int) -> tuple[str, int]:
    if not path.exists():
        return "", offset
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return text, offset + len(text.encode())


def one_kill(client: Client, token: str, bodies: list[bytes], expected: list[tuple], clients: int,
             load_s: float, logs: Path, offsets: dict[str, int], management: str = MANAGEMENT) -> dict:
    """Load from ``clients`` clients for ``load_s`` seconds, SIGKILL one worker 3 s in; what the
    clients saw, when a new worker was READY, and where the new worker's start went."""
    before = worker_pids(client.model, token, management)
    victim = min(before)
    ready_at: list[float] = []

    def watch(t_kill: float) -> None:  # the management API: when a new worker is READY
        while time.monotonic() - t_kill < 120:
            try:
                now = worker_pids(client.model, token, management)
                if any(pid not in before and s == "READY" for pid, s in now.items()):
                    ready_at.append(time.monotonic() - t_kill)
                    return
            except OSError:
                pass
            time.sleep(0.05)

    with ThreadPoolExecutor(2) as pool:
        load = pool.submit(run_load, client, bodies, concurrency=clients, duration=load_s)
        time.sleep(3)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        watcher = pool.submit(watch, t_kill)
        results = load.result()
        watcher.result()
    after = [r for r in results if r.finished > t_kill]
    ok = sorted(r.finished for r in after
                if r.status == 200 and (r.body["label"], r.body["embedding_dim"]) == expected[r.index % len(bodies)])
    wrong = [r for r in after if r.status == 200
             and (r.body["label"], r.body["embedding_dim"]) != expected[r.index % len(bodies)]]
    sent_after = [r.finished for r in after if r.status == 200 and r.finished - r.seconds > t_kill
                  and (r.body["label"], r.body["embedding_dim"]) == expected[r.index % len(bodies)]]
    edges = [t_kill] + ok + [t_kill + (load_s - 3)]
    failed = [r for r in results if r.status != 200]
    row = {"victim_pid": victim, "recovery_s": min(sent_after) - t_kill if sent_after else None,
           "longest_gap_s": max(b - a for a, b in zip(edges, edges[1:])),
           "new_worker_ready_s": ready_at[0] if ready_at else None,
           "requests": len(results), "failed": len(failed),
           "failed_statuses": {str(s): sum(r.status == s for r in failed) for s in sorted({r.status for r in failed})},
           "failed_finished_after_kill_s": [round(r.finished - t_kill, 3) for r in failed],
           "wrong_answers": len(wrong), "slowest_s": max(r.seconds for r in results),
           "latency_after_kill": percentiles([r.seconds for r in after if r.status == 200])}
    model_log, offsets["model"] = new_log(logs / "model_log.log", offsets["model"])
    ts_log, offsets["ts"] = new_log(logs / "ts_log.log", offsets["ts"])
    starts = START_LINE.findall(model_log)
    if starts:
        age, init, graph, warm = (float(v) for v in starts[-1][:4])
        row["new_worker"] = {"process_age_at_initialize_s": age - init, "initialize_s": init,
                             "graph_s": graph, "warm_up_s": warm, "load_and_rest_s": init - graph - warm,
                             "graph_cached": starts[-1][4] == "True"}
    row["torchserve_retry"] = [f"{w} in {s} s" for w, s in RETRY_LINE.findall(ts_log)]
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", choices=("demo", "imagenet"))
    p.add_argument("--workers", default="1,2")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--sat-s", type=float, default=15.0, help="closed-loop throughput phase per worker count")
    p.add_argument("--load-s", type=float, default=20.0, help="each kill's load phase (the kill is 3 s in)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-graph-cache", action="store_true", help="every restarted worker traces its graph again")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "recovery.json"))
    args = p.parse_args(argv)
    report = {**header("bench.recovery", argv), "model": args.model, "clients": args.clients,
              "batch_size": args.batch_size, "runs": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.model == "imagenet":
            ckpt, bodies, thresholds = make_checkpoints(tmp)["imagenet"]["fp32"], imagenet_inputs(), None
        else:  # the bundled demo model as `make serve` serves it
            ckpt, bodies, thresholds = DEMO / "mrl_resnet50_fp16.pt", demo_inputs(), DEMO / "thresholds.json"
        for workers in [int(w) for w in args.workers.split(",")]:
            settings = dict(thresholds=thresholds, batch_size=args.batch_size, workers=workers,
                            graph_cache=not args.no_graph_cache)
            with server(tmp, ckpt, {"mrl_resnet50": settings}, store=tmp / f"store-{workers}",
                        own_tmpdir=True) as srv:
                keys = srv.keys()
                while sum(s == "READY" for s in worker_pids("mrl_resnet50", keys["management"]).values()) < workers:
                    time.sleep(0.1)
                cold_start = time.perf_counter() - srv.started
                client = srv.client(timeout=60)
                expected = [(b["label"], b["embedding_dim"]) for b in (client.predict(x).body for x in bodies)]
                run_load(client, bodies, concurrency=args.clients, duration=5)  # warm
                t = time.perf_counter()
                sat = run_load(client, bodies, concurrency=args.clients, duration=args.sat_s)
                rate = sum(r.status == 200 for r in sat) / (time.perf_counter() - t)
                offsets = {"model": (tmp / "logs" / "model_log.log").stat().st_size,
                           "ts": (tmp / "logs" / "ts_log.log").stat().st_size}
                kills = []
                for k in range(args.kills):
                    row = one_kill(client, keys["management"], bodies, expected, args.clients, args.load_s,
                                   tmp / "logs", offsets)
                    kills.append(row)
                    print(f"workers {workers} kill {k + 1}: " + ", ".join(
                        f"{key} {row[key]}" for key in ("recovery_s", "longest_gap_s", "new_worker_ready_s",
                                                       "failed", "wrong_answers")) + f" {row.get('new_worker')}",
                          flush=True)
                    time.sleep(3)
                med = {key: statistics.median(r[key] for r in kills if r[key] is not None)
                       for key in ("recovery_s", "longest_gap_s", "new_worker_ready_s")
                       if any(r[key] is not None for r in kills)}
                report["runs"].append({"workers": workers, "cold_start_s": cold_start, "throughput_per_s": rate,
                                       "latency": percentiles([r.seconds for r in sat if r.status == 200]),
                                       "median": med, "kills": kills})
                print(f"workers {workers}: {rate:.1f} img/s; medians {med}", flush=True)
    headline = {f"workers_{r['workers']}": {"img_per_s": round(r["throughput_per_s"], 1),
                                            **{k: round(v, 2) for k, v in r["median"].items()},
                                            "failed": [k["failed"] for k in r["kills"]]} for r in report["runs"]}
    return save_report(report, args.out, headline)


if __name__ == "__main__":
    main()
