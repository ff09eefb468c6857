"""Server settings side by side: one model's archive served under each variant of the server's
settings, started in alternating order (ABAB...), each measured at saturation. Where the server
loses against its raw pipeline shows in the worker's own stage times (``mrl_stage_seconds``:
decode, forward, cascade per batch), its mean batch and busy share, the frontend's own time per
request (``frontend_ms``), and each process's CPU share (the Java frontend, the Python worker,
this client).

    python -m bench.server_tuning [--model imagenet|demo|han1000] [--numerics int8|openvino] [--rounds 2]
                                  [--variants config,jvm_tiered] [--concurrency 1,16]
                                  # docs/results/server_tuning_<model>.json

Variants (``VARIANTS``): ``config`` is config.properties as committed; the others change one
thing against it. A setting stays in config.properties only if this benchmark shows it.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.harness import (
    BUNDLED,
    MODES,
    ROOT,
    calibration_folder,
    demo_inputs,
    header,
    imagenet_inputs,
    int8_for,
    make_checkpoints,
    openvino_for,
    save_report,
    serve_phase,
    server,
)
from handler.engine import configure_threads
from model_store.build_archive import archive
from model_store.serve import GREEDY, INLINE_SEND, config_vmargs

VARIANTS = {
    "config": {},
    # TorchServe's own batching: a partial batch waits maxBatchDelay (the archive's 1 ms) for company
    "torchserve_batching": {"overrides": {"vmargs": config_vmargs(drop=(GREEDY,))}},
    # TorchServe's runAsync: each batch's write to the worker on a thread of its own (InlineSend.java)
    "torchserve_send": {"overrides": {"vmargs": config_vmargs(drop=(INLINE_SEND,))}},
    "jvm_default": {"overrides": {"vmargs": ""}},  # the JVM's own defaults: tiered C2, G1 (and no agent)
    # C2 as well as C1 (the JVM's tiered default), the rest of the committed vmargs kept
    "jvm_tiered": {"overrides": {"vmargs": config_vmargs(drop=("-XX:TieredStopAtLevel=1",))}},
    "netty1": {"overrides": {"number_of_netty_threads": "1", "netty_client_threads": "1"}},
    "omp_passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}},  # worker threads sleep, not spin, when idle
    # libgomp's idle threads spin 300,000 rounds before they sleep where neither OMP_WAIT_POLICY nor
    # GOMP_SPINCOUNT says (its default); SERVER_ENV has them spin 10,000 (model_store/serve.py).
    "gomp_spin300k": {"env": {"GOMP_SPINCOUNT": "300000"}},
    "gomp_spin10k": {"env": {"GOMP_SPINCOUNT": "10000"}},
    "batch16": {"batch_size": 16},
    "delay1": {"batch_delay": 1},
    "delay5": {"batch_delay": 5},
    "ts_logging": {"start": {"log_config": None}},  # the log4j2 configuration inside TorchServe's jar
    "workers2": {"workers": 2},  # build_archive.py's default: two workers, the cores split between them
}
CLK = os.sysconf("SC_CLK_TCK")
# the worker's stage and batch counters, and the frontend's queue time of the requests it answered
STAGE = re.compile(r'^(mrl_stage_seconds_sum|mrl_stage_seconds_count|mrl_batches_total|mrl_batch_items_total'
                   r'|ts_queue_latency_microseconds|ts_inference_latency_microseconds|ts_inference_requests_total)\{([^}]*)\} ([0-9.eE+-]+)$')


def worker_counters(port: int = 8082) -> dict[str, float]:
    """The worker's batch and stage counters, and the frontend's queue time, from TorchServe's
    Prometheus endpoint."""
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode().splitlines():
        m = STAGE.match(line)
        if m:
            stage = re.search(r'stage="(\w+)"', m.group(2))
            key = m.group(1) + (":" + stage.group(1) if stage else "")
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def process_cpu() -> dict[str, float]:
    """CPU seconds so far of the frontend (java), the workers and this process, from /proc."""
    out = {"frontend": 0.0, "worker": 0.0, "client": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        who = ("client" if int(pid) == os.getpid() else "frontend" if "org.pytorch.serve.ModelServer" in cmd
               else "worker" if "model_service_worker" in cmd else None)
        if who:
            out[who] += (int(fields[11]) + int(fields[12])) / CLK
    return out


def phase(tmp: Path, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    c0, p0, t0 = worker_counters(), process_cpu(), time.perf_counter()
    r = serve_phase(tmp, bodies, concurrency, seconds)
    wall = time.perf_counter() - t0
    c1, p1 = worker_counters(), process_cpu()
    d = {k: v - c0.get(k, 0.0) for k, v in c1.items()}
    stages = sorted(k.split(":")[1] for k in d if k.startswith("mrl_stage_seconds_sum:"))
    busy = sum(d[f"mrl_stage_seconds_sum:{s}"] for s in stages)
    requests = max(d.get("ts_inference_requests_total", 0), 1)
    return {**r, "batch_mean": d.get("mrl_batch_items_total", 0) / max(d.get("mrl_batches_total", 0), 1),
            # how long a request waited for a worker: at one client, the batch delay it paid
            "queue_ms": d.get("ts_queue_latency_microseconds", 0) / 1000 / requests,
            # the frontend's own time for a request, from its arrival to its answer leaving (the
            # client's latency less this is HTTP and the client; this less the worker's stages is
            # the queue, the hops to the worker and back, and TorchServe's Python around our handler)
            "frontend_ms": d.get("ts_inference_latency_microseconds", 0) / 1000 / requests,
            "worker_busy": busy / wall,
            "ms_per_batch": {s: 1000 * d[f"mrl_stage_seconds_sum:{s}"] / max(d[f"mrl_stage_seconds_count:{s}"], 1)
                             for s in stages},
            "cpu_share": {k: (p1[k] - p0[k]) / wall for k in p1}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="imagenet", choices=("imagenet", *BUNDLED))
    p.add_argument("--numerics", default="int8", choices=("fp32", "int8", "openvino"),
                   help="openvino: int8 on the OpenVINO engine (runtime openvino)")
    p.add_argument("--variants", default="config,jvm_default")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--phases", type=int, default=2, help="saturation phases per start")
    p.add_argument("--phase-s", type=float, default=18)
    p.add_argument("--concurrency", default="16", help="comma-separated: phases at each, per start")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    names = args.variants.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    configure_threads()
    mode = MODES[args.numerics]
    report = {**header("bench.server_tuning", argv, busy=True),
              "model": args.model, "numerics": args.numerics, "variants": {n: VARIANTS[n] for n in names},
              "rounds": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if args.model == "imagenet":
            ckpt, thresholds, bodies = make_checkpoints(tmp)["imagenet"]["fp32"], None, imagenet_inputs()
        else:
            folder, spec = BUNDLED[args.model]
            ckpt, thresholds, bodies = folder / "mrl_resnet50_fp16.pt", folder / "thresholds.json", demo_inputs(spec=spec)
        int8 = args.numerics in ("int8", "openvino")
        calib = calibration_folder(tmp, args.model, bodies) if thresholds is None and int8 else None
        if args.numerics == "int8":
            int8_for(ckpt, calib, thresholds)  # built (or found) once, before any timing
        elif int8:
            openvino_for(ckpt, calib, thresholds)
        stores = {}
        for n in names:
            v = VARIANTS[n]
            stores[n] = tmp / f"store-{n}"
            stores[n].mkdir()
            # batch size and delay: build_archive.py's defaults unless the variant says
            archive(ckpt, stores[n], graph=mode["graph"], batch_size=v.get("batch_size"),
                    batch_delay=v.get("batch_delay"), workers=v.get("workers", 1), thresholds=thresholds,
                    numerics="int8" if int8 else None, runtime=mode.get("runtime"), int8_data=calib)
        for rnd in range(args.rounds):
            for n in (names if rnd % 2 == 0 else names[::-1]):  # ABBA: a drift lands on both sides
                v = VARIANTS[n]
                with server(tmp, store=stores[n], env=v.get("env"), overrides=v.get("overrides"),
                            **v.get("start", {})):
                    serve_phase(tmp, bodies, 4, 4)  # the first requests
                    for i in range(args.phases):
                        for c in levels:
                            r = phase(tmp, bodies, c, args.phase_s)
                            report["rounds"].append({"variant": n, "round": rnd, "phase": i, **r})
                            print(n, rnd, i, f"c={c}: {r['img_s']:.1f} img/s, p50 {r['p50_ms']:.1f} ms, "
                                  f"worker busy {r['worker_busy']:.0%}, "
                                  f"batch {r['batch_mean']:.1f}, queue {r['queue_ms']:.2f} ms, ms/batch {r['ms_per_batch']}, cpu {r['cpu_share']}",
                                  flush=True)
    summary = {}
    for c in levels:
        for n in names:
            runs = [r for r in report["rounds"] if r["variant"] == n and r["concurrency"] == c]
            summary[f"{n}/c{c}"] = {
                "img_s": statistics.median(r["img_s"] for r in runs),
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "queue_ms": statistics.median(r["queue_ms"] for r in runs),
                "frontend_ms": statistics.median(r["frontend_ms"] for r in runs),
                "worker_busy": statistics.median(r["worker_busy"] for r in runs),
                "worker_ms_per_batch": statistics.median(sum(r["ms_per_batch"].values()) for r in runs),
                "forward_ms": statistics.median(r["ms_per_batch"].get("forward", 0) for r in runs),
                "frontend_cpu": statistics.median(r["cpu_share"]["frontend"] for r in runs),
                "phases": len(runs)}
        for n in names:
            summary[f"{n}/c{c}"]["vs_first"] = summary[f"{n}/c{c}"]["img_s"] / summary[f"{names[0]}/c{c}"]["img_s"]
    report["summary"] = summary
    out = args.out or ROOT / "docs" / "results" / f"server_tuning_{args.model}.json"
    return save_report(report, out, {"machine": report["machine"], "summary": summary})


if __name__ == "__main__":
    main()
