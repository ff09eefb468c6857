"""Replicas behind the HAProxy gateway (model_store/cluster.py): throughput at 1 and 16 clients for
1 and N replicas side by side in one run, normal clients' latency with and without slow-loris
clients, and a kill drill (SIGKILL one whole instance under load).

    python -m bench.cluster                  # writes docs/results/scaling.json, prints the figures
    python -m bench.cluster --duration 10    # shorter phases

The bundled Fashion-MNIST model (jit graph, as `make serve` builds it), PNG requests from
fashion-mnist:test, all traffic on 127.0.0.1. Throughput is answered requests over the phase;
latencies are the phase's p50 and p99.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import DEMO, ROOT, demo_inputs, header, save_report
from client.http import Client, run_load
from model_store import cluster as cl
from model_store.build_archive import archive
from model_store.serve import processes

KEY = "bench-" + "b" * 26


def throughput(results, duration: float) -> dict:
    ok = [r for r in results if r.status == 200]
    lat = sorted(r.seconds * 1000 for r in ok)
    return {"requests": len(results), "failed": len(results) - len(ok), "img_s": round(len(ok) / duration, 1),
            "p50_ms": round(statistics.median(lat), 1), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 1)}


def rss_mib(c: cl.Cluster) -> list[dict]:
    """Resident memory of each replica: the Java frontend and its Python workers."""
    out = []
    for r in c.members:
        frontend, *workers = processes(r.env)
        out.append({"frontend": round(frontend.memory_info().rss / 2**20),
                    "workers": round(sum(w.memory_info().rss for w in workers) / 2**20)})
    return out


def drill(c: cl.Cluster, store: Path, images: list[bytes], duration: float) -> dict:
    victim = c.replica(1)
    client = Client(c.gateway, KEY, timeout=30)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(results=run_load(client, images, concurrency=16,
                                                                    duration=duration)))
    t.start()
    time.sleep(duration / 3)
    in_flight = int(cl.gateway_stats(c)[victim.name]["scur"])
    killed = time.monotonic()
    cl.kill_replica(victim)
    down = cl.wait_status(c, victim.name, "DOWN")
    t.join()
    failed = [r for r in out["results"] if r.status != 200]
    restart = time.monotonic()
    cl.start_replica(c, victim, store, ["mrl_resnet50"], timeout=300, load_models="mrl_resnet50.mar")
    ready = time.monotonic()
    up = cl.wait_status(c, victim.name, "UP")
    return {"in_flight_at_kill": in_flight, "requests": len(out["results"]), "failed": len(failed),
            "failed_after_marked_down": sum(r.finished > down for r in failed),
            "marked_down_after_s": round(down - killed, 2), "restart_to_ready_s": round(ready - restart, 1),
            "ready_to_up_in_gateway_s": round(up - ready, 2)}


def slow_loris(c: cl.Cluster, images: list[bytes], duration: float, attackers: int = 64) -> dict:
    """Normal clients' latency through the gateway with and without slow clients that hold
    connections open by sending a request head one byte a second (HAProxy cuts them at 10 s)."""
    import socket

    client = Client(c.gateway, KEY, timeout=30)
    quiet = throughput(run_load(client, images, concurrency=4, duration=duration), duration)
    stop = threading.Event()
    cut = [0]

    def attacker() -> None:
        head = b"POST /predictions/mrl_resnet50 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", c.gateway_port), timeout=30) as s:
                    for byte in head + b"a" * 10_000:
                        if stop.is_set():
                            return
                        s.sendall(bytes([byte]))
                        time.sleep(1.0)
            except OSError:
                cut[0] += 1  # the gateway closed it: reconnect, as an attacker would

    threads = [threading.Thread(target=attacker, daemon=True) for _ in range(attackers)]
    for t in threads:
        t.start()
    time.sleep(2)
    attacked = throughput(run_load(client, images, concurrency=4, duration=duration), duration)
    stop.set()
    return {"attackers": attackers, "connections_cut": cut[0], "without": quiet, "with": attacked,
            "p99_ratio": round(attacked["p99_ms"] / quiet["p99_ms"], 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load phase")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "scaling.json")
    args = p.parse_args(argv)
    images = demo_inputs(200)
    report: dict = {**header("bench.cluster", argv), "model": "fashion_mnist (jit)", "throughput": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = tmp / "model_store"
        store.mkdir()
        archive(DEMO / "mrl_resnet50_fp16.pt", store, thresholds=DEMO / "thresholds.json", workers=1)
        keys = tmp / "api_keys"
        keys.write_text(KEY + "\n")
        for n in (1, args.replicas):
            c = cl.Cluster(home=tmp / f"cluster{n}", replicas=n)
            try:
                took = cl.start(c, ["mrl_resnet50"], keys, model_store=store, load_models="mrl_resnet50.mar")
                client = Client(c.gateway, KEY)
                run_load(client, images, concurrency=16, duration=3)  # warm-up
                row = {"start_s": round(took, 1)}
                for conc in (1, 16):
                    row[f"c{conc}"] = throughput(run_load(client, images, concurrency=conc, duration=args.duration),
                                                 args.duration)
                row["rss_mib_per_replica_after_load"] = rss_mib(c)
                report["throughput"][f"{n}_replicas"] = row
                print(f"{n} replica(s): {json.dumps(row)}", flush=True)
                if n == args.replicas and n > 1:
                    report["slow_loris"] = slow_loris(c, images, args.duration)
                    print(f"slow loris: {json.dumps(report['slow_loris'])}", flush=True)
                    report["kill_drill"] = drill(c, store, images, 1.5 * args.duration)
                    print(f"kill drill: {json.dumps(report['kill_drill'])}", flush=True)
            finally:
                cl.stop(c)
    save_report(report, args.out)


if __name__ == "__main__":
    main()
