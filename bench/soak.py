"""A soak: a real TorchServe under steady mixed traffic for N minutes, sampled every 30 s.

    python -m bench.soak --minutes 75                  # docs/results/soak.json and docs/results/soak.png
    python -m bench.soak --minutes 1 --sample-s 10 --renew-after-s 30 --out /tmp/soak.json   # CI

``--clients`` threads (default 12) send a fixed mix: valid PNGs of the demo model's test set,
and, one request in eight, an invalid one whose refusal is known (corrupt bytes -> 400, an
unknown option -> 400, dim 12 -> 400, an empty body -> 400). A response whose status is not the
one its kind expects is an unexpected error. Each sample records, for the TorchServe frontend and
its worker(s): RSS, open file descriptors and threads; and for the traffic since the last sample:
requests, p50/p99 latency of the valid ones, and errors by kind.

Keys: TorchServe's inference key expires after 60 minutes. The clients renew it the documented
way (``model_store.serve.renew_key``, what ``make token`` does) every ``--renew-after-s`` seconds
(default 50 minutes), and a request with the old key must then be refused (400) while the new one
works: the report shows each renewal. Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.harness import DEMO, ROOT, demo_inputs, header, save_report, server
from client.http import Client
from model_store.serve import processes, read_keys, renew_key

CORRUPT = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40


def request_kinds(bodies: list[bytes]) -> list[tuple[str, bytes, dict, int]]:
    """(kind, body, headers, expected status): seven valid for every invalid one, in turn."""
    bad = [("corrupt", CORRUPT, {}, 400), ("unknown_option", bodies[0], {"X-MRL-Colour": "red"}, 400),
           ("bad_dim", bodies[1], {"X-MRL-Dim": "12"}, 400), ("empty", b"", {}, 400)]
    kinds = []
    for i in range(32):
        kinds.append(bad[i // 8 % 4] if i % 8 == 7 else ("valid", bodies[i % len(bodies)], {}, 200))
    return kinds


def process_stats(env: dict) -> dict:
    procs = processes(env)
    out = {"rss_mb": 0.0, "fds": 0, "threads": 0, "processes": len(procs), "worker_rss_mb": 0.0}
    for i, p in enumerate(procs):
        try:
            rss = p.memory_info().rss / 2**20
            out["rss_mb"] += rss
            out["fds"] += p.num_fds()
            out["threads"] += p.num_threads()
            if i:
                out["worker_rss_mb"] += rss
        except Exception:  # a process that just exited
            pass
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, required=True)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--sample-s", type=float, default=30.0)
    p.add_argument("--renew-after-s", type=float, default=50 * 60)
    p.add_argument("--port", type=int, default=8080, help="inference port; management +1, metrics +2")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "soak.json"))
    args = p.parse_args(argv)
    args.inference = f"http://127.0.0.1:{args.port}"
    args.management = f"http://127.0.0.1:{args.port + 1}"
    if not 1 <= args.clients <= 64:
        p.error("--clients must be in 1..64")
    bodies = demo_inputs()
    kinds = request_kinds(bodies)
    report = {**header("bench.soak", argv), "clients": args.clients,
              "minutes": args.minutes, "sample_s": args.sample_s, "samples": [], "renewals": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        # kill (SIGTERM) ends a long soak like Ctrl-C: the server's context stops its TorchServe
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        settings = dict(thresholds=DEMO / "thresholds.json")
        with server(tmp, DEMO / "mrl_resnet50_fp16.pt", {"mrl_resnet50": settings}, timeout=240, own_tmpdir=True,
                    port=args.port) as srv:
            report.update(run(tmp, srv.env, kinds, args, report))
    out = Path(args.out)
    save_report(report, out, report["summary"])
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")
    return report


def run(tmp: Path, env: dict, kinds, args, report: dict) -> dict:
    key = [read_keys(tmp)["inference"]]
    retiring: set[str] = set()  # keys being renewed: the server may refuse them before key[0] changes
    lock = threading.Lock()
    window: list[tuple] = []  # (kind, expected, status, seconds, sent with a since-renewed key) since the last sample
    totals = {"requests": 0, "unexpected": 0, "by_kind": {}}
    stop_at = time.monotonic() + 60 * args.minutes
    done = threading.Event()

    def client_loop(c: int) -> None:
        i, client = c, None
        while not done.is_set():
            kind, body, headers, expected = kinds[i % len(kinds)]
            i += args.clients
            if client is None or client.token != key[0]:  # a renewed key: a new client, as users do
                client = Client(args.inference, key[0], timeout=60)
            try:
                r = client.predict(body, headers)
                status, seconds = r.status, r.seconds
            except OSError:
                status, seconds = 0, 60.0
            with lock:
                window.append((kind, expected, status, seconds, client.token != key[0] or client.token in retiring))

    threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(args.clients)]
    t0 = time.monotonic()
    next_renew = t0 + args.renew_after_s
    for t in threads:
        t.start()
    try:
        while time.monotonic() < stop_at:
            time.sleep(max(0.0, min(args.sample_s, stop_at - time.monotonic())))
            if time.monotonic() >= next_renew and next_renew < stop_at:  # none is due at the very end
                report["renewals"].append({"t_s": round(time.monotonic() - t0, 1), **renewal(tmp, key, retiring, lock, args)})
                next_renew += args.renew_after_s
            with lock:
                batch, window[:] = list(window), []
            report["samples"].append(sample(batch, time.monotonic() - t0, env, totals))
            s = report["samples"][-1]
            print(f"{s['t_s']:7.0f} s  {s['requests']:6d} req  p50 {s['p50_ms']:6.1f} ms  p99 {s['p99_ms']:6.1f} ms  "
                  f"unexpected {s['unexpected']}  RSS {s['rss_mb']:.0f} MB  fds {s['fds']}  threads {s['threads']}",
                  flush=True)
    finally:
        done.set()
        for t in threads:
            t.join(70)
    return {"summary": summarize(report["samples"], totals, report["renewals"])}


def renewal(tmp: Path, key: list, retiring: set, lock: threading.Lock, args) -> dict:
    """Renew the inference key the documented way; the old key must stop working, the new one work.

    The old key is marked retiring before the server is asked: from then on a request with it may
    be refused (a renewal race, counted apart) before ``key[0]`` names the new one."""
    old = key[0]
    with lock:
        retiring.add(old)
    new = renew_key("inference", root=tmp, management=args.management)
    with lock:
        key[0] = new
    probe = demo_inputs(1)[0]
    old_status = Client(args.inference, old).predict(probe).status
    new_status = Client(args.inference, new).predict(probe).status
    return {"at": time.strftime("%H:%M:%S"), "old_key_status": old_status, "new_key_status": new_status,
            "ok": old_status == 400 and new_status == 200}


def sample(batch, t_s: float, env: dict, totals: dict) -> dict:
    lat = [s * 1000 for kind, _, status, s, _ in batch if kind == "valid" and status == 200]
    # A request sent with the old key while the key was renewed is refused (400
    # InvalidKeyException): expected, and counted apart; any other wrong status is unexpected.
    races = sum(1 for k, _, s, _, stale in batch if k == "valid" and s == 400 and stale)
    unexpected = sum(1 for _, e, s, _, _ in batch if s != e) - races
    totals["requests"] += len(batch)
    totals["unexpected"] += unexpected
    totals["renewal_races"] = totals.get("renewal_races", 0) + races
    for k, _, s, _, _ in batch:
        totals["by_kind"].setdefault(k, {}).setdefault(str(s), 0)
        totals["by_kind"][k][str(s)] += 1
    return {"t_s": round(t_s, 1), "requests": len(batch), "unexpected": unexpected, "renewal_races": races,
            "p50_ms": float(np.percentile(lat, 50)) if lat else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if lat else float("nan"), **process_stats(env)}


def summarize(samples: list[dict], totals: dict, renewals: list[dict]) -> dict:
    after5 = [s for s in samples if s["t_s"] >= 300] or samples  # memory after warm-up
    first, last = after5[0], samples[-1]
    return {"requests": totals["requests"], "unexpected_errors": totals["unexpected"],
            "renewal_races": totals.get("renewal_races", 0),
            "by_kind": totals["by_kind"], "renewals_ok": all(r["ok"] for r in renewals), "renewals": len(renewals),
            "rss_mb_from": first["rss_mb"], "rss_mb_to": last["rss_mb"],
            "rss_growth": last["rss_mb"] / first["rss_mb"] - 1,
            "fds": [min(s["fds"] for s in samples), max(s["fds"] for s in samples)],
            "threads": [min(s["threads"] for s in samples), max(s["threads"] for s in samples)],
            "p99_ms_median": statistics.median(s["p99_ms"] for s in samples if s["p99_ms"] == s["p99_ms"])}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["samples"]
    t = [x["t_s"] / 60 for x in s]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), dpi=110, sharex=True)
    axes[0, 0].plot(t, [x["rss_mb"] for x in s], label="all processes")
    axes[0, 0].plot(t, [x["worker_rss_mb"] for x in s], label="worker")
    axes[0, 0].set_ylabel("RSS (MB)")
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].plot(t, [x["fds"] for x in s], label="open fds")
    axes[0, 1].plot(t, [x["threads"] for x in s], label="threads")
    axes[0, 1].legend(fontsize=8)
    axes[1, 0].plot(t, [x["p50_ms"] for x in s], label="p50")
    axes[1, 0].plot(t, [x["p99_ms"] for x in s], label="p99")
    axes[1, 0].set_ylabel("latency of valid requests (ms)")
    axes[1, 0].legend(fontsize=8)
    axes[1, 1].plot(t, [x["requests"] / report["sample_s"] for x in s], label="requests/s")
    axes[1, 1].plot(t, [x["unexpected"] for x in s], label="unexpected errors")
    axes[1, 1].legend(fontsize=8)
    for r in report["renewals"]:  # key renewals
        for ax in axes.flat:
            ax.axvline(r["t_s"] / 60, color="gray", ls=":", lw=1)
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"soak: {report['clients']} clients, {report['minutes']:g} min, {report['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
