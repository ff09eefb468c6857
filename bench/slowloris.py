"""Slow clients: normal clients' latency with and without many connections that send a request
head one byte at a time, against TorchServe directly and through the HAProxy gateway, in one run.

    python -m bench.slowloris [--connections 1000] [--phase-s 20] [--targets direct,gateway]
                                                                           # docs/results/slowloris.json

Per target, three phases of ``--clients`` normal closed-loop clients (quiet, attacked, quiet
again: ABA, so that drift shows), while in the middle one ``--connections`` slow connections
each send one more byte of a request head every ``--byte-every-s`` seconds and never finish it.
A connection the server closes is counted and opened again, as an attacker would. Recorded: the
normal clients' answers, failures, p50/p99; how many slow connections were open at the end of
the attack and how many the server cut; the TorchServe frontend's open file descriptors.

``direct`` is one TorchServe on 127.0.0.1 (the demo archive as `make serve` builds it);
``gateway`` is one replica behind model_store/cluster.py's HAProxy, whose ``timeout
http-request 10s`` cuts a head that takes longer. Bounded in time and count, loopback only.
"""
from __future__ import annotations

import argparse
import selectors
import socket
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import DEMO, ROOT, demo_inputs, header, save_report, server
from bench.overload import percentiles
from client.http import Client, run_load
from model_store import cluster as cl
from model_store.build_archive import archive
from model_store.serve import processes

HEAD = b"POST /predictions/mrl_resnet50 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
KEY = "slowloris-" + "k" * 24


class Attack:
    """``n`` slow connections to ``port``, driven by one thread; stop() ends them all."""

    def __init__(self, port: int, n: int, byte_every_s: float) -> None:
        self.port, self.n, self.every = port, n, byte_every_s
        self.cut = self.failed_connects = 0
        self.open: dict[socket.socket, int] = {}  # socket -> bytes sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.setblocking(False)
            self.open[s] = 0
        except OSError:
            self.failed_connects += 1

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        while len(self.open) < self.n and not self._stop.is_set():
            self._connect()
        for s in self.open:
            sel.register(s, selectors.EVENT_READ)
        while not self._stop.is_set():
            t0 = time.monotonic()
            for s in list(self.open):
                sent = self.open[s]
                byte = HEAD[sent:sent + 1] or b"a"
                try:
                    s.send(byte)
                    self.open[s] = sent + 1
                except OSError:
                    self._drop(sel, s)
            # The server may answer (408, 400) and close: read what it says, count the cut.
            for key, _ in sel.select(timeout=0):
                s = key.fileobj
                try:
                    if not s.recv(4096):
                        self._drop(sel, s)
                except BlockingIOError:
                    pass
                except OSError:
                    self._drop(sel, s)
            while len(self.open) < self.n and not self._stop.is_set():  # reconnect the cut ones
                before = set(self.open)
                self._connect()
                for s in set(self.open) - before:
                    sel.register(s, selectors.EVENT_READ)
                if not set(self.open) - before:
                    break
            self._stop.wait(max(0.0, self.every - (time.monotonic() - t0)))
        for s in list(self.open):
            self._drop(sel, s, counted=False)

    def _drop(self, sel, s: socket.socket, counted: bool = True) -> None:
        self.open.pop(s, None)
        try:
            sel.unregister(s)
        except (KeyError, ValueError):
            pass
        s.close()
        self.cut += counted

    def __enter__(self) -> Attack:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def phase(client: Client, bodies: list[bytes], clients: int, seconds: float) -> dict:
    results = run_load(client, bodies, concurrency=clients, duration=seconds)
    ok = [r.seconds for r in results if r.status == 200]
    return {"requests": len(results), "failed": len(results) - len(ok), **percentiles(ok)}


def frontend_fds(env: dict) -> int | None:
    procs = processes(env)
    try:
        return procs[0].num_fds() if procs else None
    except Exception:
        return None


def measure(target: str, client: Client, port: int, env: dict, bodies: list[bytes], args) -> dict:
    run_load(client, bodies, concurrency=args.clients, duration=3)  # warm
    row = {"target": target, "port": port, "fds_before": frontend_fds(env), "quiet": phase(client, bodies, args.clients, args.phase_s)}
    with Attack(port, args.connections, args.byte_every_s) as attack:
        time.sleep(min(5.0, args.phase_s / 4))  # let the connections open
        row["attacked"] = phase(client, bodies, args.clients, args.phase_s)
        row["attack"] = {"connections": args.connections, "open_at_end": len(attack.open), "cut_by_server": attack.cut,
                         "failed_connects": attack.failed_connects, "frontend_fds_during": frontend_fds(env)}
    row["quiet_again"] = phase(client, bodies, args.clients, args.phase_s)
    base = max(row["quiet"]["p99_ms"], row["quiet_again"]["p99_ms"])
    row["p99_ratio"] = round(row["attacked"]["p99_ms"] / base, 2)
    print(f"{target}: p99 quiet {row['quiet']['p99_ms']:.1f} / attacked {row['attacked']['p99_ms']:.1f} / "
          f"quiet {row['quiet_again']['p99_ms']:.1f} ms; attack {row['attack']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--byte-every-s", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=4, help="normal closed-loop clients")
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--targets", default="direct,gateway")
    p.add_argument("--port", type=int, default=18380, help="direct: TorchServe's inference port (+1, +2 the others); "
                                                            "gateway: its port, the replica's from +100")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "slowloris.json"))
    args = p.parse_args(argv)
    if not 1 <= args.connections <= 5000:
        p.error("--connections must be in 1..5000")
    bodies = demo_inputs(200)
    report = {**header("bench.slowloris", argv), "byte_every_s": args.byte_every_s, "clients": args.clients,
              "phase_s": args.phase_s, "targets": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        store = tmp / "store"
        store.mkdir()
        archive(DEMO / "mrl_resnet50_fp16.pt", store, thresholds=DEMO / "thresholds.json")
        for target in args.targets.split(","):
            if target == "direct":
                # Its own gRPC and worker ports (worker sockets are named by port, machine-wide),
                # so that it runs beside another TorchServe.
                overrides = {"grpc_inference_port": str(args.port + 3), "grpc_management_port": str(args.port + 4),
                             "initial_worker_port": str(args.port + 300)}
                with server(tmp, store=store, timeout=240, own_tmpdir=True, port=args.port,
                            overrides=overrides) as srv:
                    report["targets"].append(measure("direct", srv.client(timeout=60), args.port, srv.env, bodies,
                                                     args))
            elif target == "gateway":
                keys = tmp / "api_keys"
                keys.write_text(KEY + "\n")
                c = cl.Cluster(home=tmp / "cluster", replicas=1, gateway_port=args.port,
                               base_port=args.port + 100, base_worker_port=args.port + 200)
                try:
                    cl.start(c, ["mrl_resnet50"], keys, model_store=store, load_models="mrl_resnet50.mar")
                    report["targets"].append(measure("gateway", Client(c.gateway, KEY, timeout=60), args.port,
                                                     c.replica(0).env, bodies, args))
                finally:
                    cl.stop(c)
            else:
                p.error(f"unknown target {target!r}: direct or gateway")
    headline = {r["target"]: {"p99_ratio": r["p99_ratio"], "failed": r["attacked"]["failed"], **r["attack"]}
                for r in report["targets"]}
    return save_report(report, args.out, headline)


if __name__ == "__main__":
    main()
