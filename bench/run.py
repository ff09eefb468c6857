"""The benchmark: raw in-process pipeline vs TorchServe end to end vs the usual recipe, side by side.

    python -m bench.run                 # full run (38 minutes on 2 cores with three models), writes docs/results/benchmarks.json
    python -m bench.run --quick         # shorter phases, for a smoke check

Every figure comes from this one run on this machine: medians and ratios, with the CPU named.
Modes:
  baseline  the usual recipe: eager fp32 NCHW, full JPEG decode, glibc malloc and libgomp defaults;
  fp32      our path in fp32: channels_last, traced+frozen graph, JPEG draft, SERVER_ENV (malloc, libgomp spin);
  bf16      the same with bf16 autocast (what the demo card serves);
  int8      the backbone quantized (PT2E, calibration/int8.py) and compiled ahead of time, fp32 heads;
  openvino  int8 on the OpenVINO engine (runtime openvino: NNCF's program, calibration/openvino_int8.py; torch
            on one thread in the worker), with its own thresholds set where the model has one;
  peers     OpenVINO fp32/bf16/int8 on the same checkpoints beside our engine (bench/peers.py; needs
            the peers extra, else skipped with a note; --no-peers leaves it out); and, for the
            ImageNet-size model served in openvino, issue #36's gate side by side: the server's
            one-client and saturation phases alternating with OpenVINO int8's raw batches;
  auto      bundled models only: the archive built with numerics auto and runtime auto, which serves
            the fastest mode this CPU runs natively whose thresholds set passed parity, and int8 on
            OpenVINO where its set passed parity and ran faster (handler/numerics.py); the report
            names what it chose and why.
Models: "imagenet" (official layout, random weights, 1000 classes, 224x224 JPEG requests), and the
bundled checkpoints with PNG requests from their test specs: "demo" (Fashion-MNIST, 28x28,
fashion-mnist:test) and "han1000" (1000 Han characters, 32x32, han1000:test). A mode whose
numerics this CPU lacks (bf16 without AVX512-BF16 or AMX) is skipped and the report says so.
All traffic goes to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import (
    BUNDLED,
    MODES,
    ROOT,
    calibration_folder,
    demo_inputs,
    header,
    imagenet_inputs,
    int8_for,
    int8_set_runs_here,
    make_checkpoints,
    median_time,
    openvino_for,
    openvino_set_runs_here,
    save_report,
    serve_phase,
    server,
    times_of,
    write_report,
)
from handler.checkpoint import load_mrl_resnet50
from handler.cpus import cpu_budget
from handler.engine import configure_threads
from handler.numerics import OPENVINO_SET, choose_numerics, choose_runtime, resolve_numerics
from handler.service import MRLService
from handler.thresholds import OperatingPoints, numerics_sets
from model_store.build_archive import BATCH_DELAY_MS
from model_store.serve import batching

GFLOP_224 = 8.18  # ResNet50 forward, one 224x224 image
PEAK_SIZES = (1024, 2048, 3072)


def peak_gflops(dtype: torch.dtype, sizes=PEAK_SIZES, repeat: int = 10) -> float:
    """Measured matmul peak, the ceiling the backbone is compared against: the best single run
    over a few square sizes (a peak is a best case; a median would flatter the backbone's share)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        best = max(best, 2 * n ** 3 / min(times_of(lambda: a @ b, repeat)) / 1e9)
    return best


def raw_pipeline(ckpt: Path, mode: dict, bodies: list[bytes], batch_sizes, repeat: int, int8_program=None) -> dict:
    """In-process: decode + preprocess + backbone + cascade per batch, and the backbone alone; a
    batch's images decoded on every core, as a worker decodes them (handler/settings.py)."""
    model, card = load_mrl_resnet50(ckpt, numerics="fp32" if mode["numerics"] == "int8" else None)
    svc = MRLService(model, card, OperatingPoints.fixed(card.nesting), graph=mode["graph"],
                     batch_sizes=batch_sizes, channels_last=mode["channels_last"], jpeg_draft=mode["jpeg_draft"],
                     numerics=mode["numerics"], int8_program=int8_program, decode_threads=cpu_budget())
    threads = torch.get_num_threads()
    svc.engine.release_cores()  # as a worker does (handler/ts_handler.py)
    out = {}
    for b in batch_sizes:
        items = [{"body": bodies[i % len(bodies)]} for i in range(b)]
        t = median_time(lambda: svc.handle(items), repeat)
        x = svc.engine.example(b, card.preprocessing.crop)  # OpenVINO's: uint8 crops, normalized in its graph
        tb = median_time(lambda: svc.engine(x), repeat)
        gflop = GFLOP_224 * (card.preprocessing.crop / 224) ** 2 * b
        out[str(b)] = {"pipeline_img_s": b / t, "pipeline_ms_per_batch": 1000 * t,
                       "backbone_img_s": b / tb, "backbone_gflops": gflop / tb}
    torch.set_num_threads(threads)
    return out


def server_runs(tmp: Path, ckpt: Path, mode: dict, bodies: list[bytes], args, thresholds=None,
                cascade_check: bool = False, int8_data: str | None = None, peer=None) -> dict:
    """Archive ``ckpt`` in ``mode``, serve it with the mode's environment; its cold start, one
    client, every concurrency, (``cascade_check``) fixed 2048 against the cascade, and (``peer``,
    ``bench.peers.beside``) the server's phases alternating with the peer's raw batches."""
    int8 = mode["numerics"] == "int8"
    settings = dict(graph=mode["graph"], batch_size=args.batch_size, batch_delay=args.batch_delay, workers=1,
                    channels_last=mode["channels_last"], jpeg_draft=mode["jpeg_draft"], thresholds=thresholds,
                    numerics=mode.get("archive_numerics") or ("int8" if int8 else None),
                    runtime=mode.get("archive_runtime") or mode.get("runtime", "torch"),
                    int8_data=int8_data if int8 and thresholds is None else None)
    with server(tmp, ckpt, {"mrl_resnet50": settings}, timeout=180, server_env=mode["server_env"]) as srv:
        t0 = time.perf_counter()
        first = srv.client().predict(bodies[0])
        out = {"ready_s": srv.ready_s, "first_answer_s": srv.ready_s + time.perf_counter() - t0,
               "first_status": first.status}
        out["one_client"] = serve_phase(tmp, bodies, 1, args.low_s)
        for c in args.concurrency:
            out[f"c{c}"] = serve_phase(tmp, bodies, c, args.sat_s)
        if cascade_check:
            # Alternate fixed-2048 and cascade phases; compare medians over the pairs.
            c, runs = max(args.concurrency), {"fixed_2048": [], "cascade": []}
            headers = {"fixed_2048": {"X-MRL-Dim": "2048"}, "cascade": None}
            for i in range(args.cascade_pairs):  # ABBA order: a steady drift lands on both sides
                for name in (("fixed_2048", "cascade") if i % 2 == 0 else ("cascade", "fixed_2048")):
                    runs[name].append(serve_phase(tmp, bodies, c, args.sat_s / 2, headers[name]))
            for name, phases in runs.items():
                out[name] = {"concurrency": c, "img_s": statistics.median(r["img_s"] for r in phases),
                             "runs": phases}
        if peer is not None:
            out["beside_peer"] = beside_peer(tmp, bodies, peer, args)
    return out


def beside_peer(tmp: Path, bodies: list[bytes], peer, args) -> dict:
    """Issue #36's gate side by side: the peer's raw batch 1 and serving batch (in this process,
    the server idle), one client, the peer again, saturation; ``args.beside_pairs`` times. The
    figures are medians over the pairs, so that a drift of the machine lands on both sides."""
    c, bs, pairs, rounds = max(args.concurrency), args.batch_size, [], []  # rounds: the peer's, {batch: s}
    for _ in range(args.beside_pairs):
        before_one = peer(args.beside_repeat)
        one = serve_phase(tmp, bodies, 1, args.low_s)
        before_sat = peer(args.beside_repeat)
        sat = serve_phase(tmp, bodies, c, args.sat_s)
        rounds += [before_one, before_sat]
        pairs.append({"peer_s": [{str(b): t for b, t in p.items()} for p in (before_one, before_sat)],
                      "one_client": one, "saturation": sat})
    peer_b1 = 1000 * statistics.median(p[1] for p in rounds)
    peer_img_s = bs / statistics.median(p[bs] for p in rounds)
    one_p50 = statistics.median(r["one_client"]["p50_ms"] for r in pairs)
    sat_img_s = statistics.median(r["saturation"]["img_s"] for r in pairs)
    return {"pairs": pairs, "concurrency": c, "batch_size": bs, "repeat": args.beside_repeat,
            "peer_b1_ms": peer_b1, "peer_img_s": peer_img_s, "one_client_p50_ms": one_p50,
            "saturation_img_s": sat_img_s, "throughput_ratio": sat_img_s / peer_img_s,
            "latency_margin_ms": one_p50 - peer_b1}


def auto_mode(folder: Path) -> tuple[str, str]:
    """The mode of ``MODES`` that ``auto`` (numerics and runtime) serves for a bundled model on
    this CPU, and why (the worker's own rules, on the model's thresholds)."""
    card = load_mrl_resnet50(folder / "mrl_resnet50_fp16.pt")[1]
    thresholds = folder / "thresholds.json"
    sets = numerics_sets(json.loads(thresholds.read_text()))
    mode, why = choose_numerics("auto", card.numerics, sets, has_int8="int8" in sets)
    if mode == "int8":
        runtime, why_runtime = choose_runtime("auto", mode, sets, OPENVINO_SET in sets and
                                              openvino_set_runs_here(folder / "mrl_resnet50_fp16.pt", thresholds))
        return ("openvino" if runtime == "openvino" else mode), f"{why}; runtime {runtime}: {why_runtime}"
    return mode, why


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=",".join(["imagenet", *BUNDLED]))
    p.add_argument("--modes", default="baseline,fp32,bf16,int8,openvino,auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batch-delay", type=int, default=BATCH_DELAY_MS)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "benchmarks.json"))
    p.add_argument("--no-peers", action="store_true", help="leave out OpenVINO's side (bench/peers.py)")
    args = p.parse_args(argv)
    args.low_s, args.sat_s = (5, 8) if args.quick else (12, 18)
    args.concurrency = (4, 16) if args.quick else (4, 8, 16)
    repeat = 5 if args.quick else 15
    args.cascade_pairs = 2 if args.quick else 4
    # five pairs: within one run the pairs spread by 10 % (2026-12-07), wider than a change worth keeping
    args.beside_pairs, args.beside_repeat = (2, 5) if args.quick else (5, 15)
    configure_threads()
    report = {**header("bench.run", argv, busy=True),
              # bf16 emulated (no AVX512-BF16/AMX) is no peak worth timing: minutes of slow matmuls
              "peak_gflops": {"fp32": peak_gflops(torch.float32),
                              "bf16": peak_gflops(torch.bfloat16) if resolve_numerics("bf16") == "bf16" else None},
              "peak_sizes": list(PEAK_SIZES),
              "settings": {"batch_size": args.batch_size, "batch_delay_ms": args.batch_delay, "batching": batching()},
              "results": {}}
    print(json.dumps(report["machine"]), json.dumps(report["peak_gflops"]), flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ckpts = make_checkpoints(tmp)
        inputs = {"imagenet": imagenet_inputs(), **{m: demo_inputs(spec=spec) for m, (_, spec) in BUNDLED.items()}}
        for model in args.models.split(","):
            for mode_name in args.modes.split(","):
                res = {}
                if mode_name == "auto":
                    if model not in BUNDLED:  # auto needs thresholds sets with their parity records
                        report.setdefault("skipped", []).append(f"{model}/auto: no thresholds (bundled models only)")
                        continue
                    chose, why = auto_mode(BUNDLED[model][0])
                    res["auto"] = {"chose": chose, "why": why}
                    mode = {**MODES[chose], "archive_numerics": "auto", "archive_runtime": "auto"}
                    print(model, "auto chose", chose, why, flush=True)
                else:
                    mode = MODES[mode_name]
                if resolve_numerics(mode["numerics"]) != mode["numerics"]:
                    report.setdefault("skipped", []).append(f"{model}/{mode_name}: this CPU has no bf16 support")
                    print(model, mode_name, "skipped: no bf16 on this CPU", flush=True)
                    continue
                int8 = mode["numerics"] == "int8"
                shipped = BUNDLED[model][0] / "mrl_resnet50_fp16.pt" if model in BUNDLED else None
                ckpt = (shipped or ckpts[model]["fp32"]) if int8 else ckpts[model][mode["numerics"]]
                thr = None
                if mode_name == "auto":
                    ckpt = shipped  # its thresholds' sets decide
                if shipped is not None and ckpt == shipped and mode_name != "baseline":
                    thr = BUNDLED[model][0] / "thresholds.json"  # fit on this very file, with its numerics
                if int8 and thr is not None and not int8_set_runs_here(thr):
                    thr = None  # no int8 set (or an 8-bit one without VNNI): served at fixed 2048 on a
                    # backbone calibrated on its test inputs
                calib = calibration_folder(tmp, model, inputs[model]) if int8 and thr is None else None
                if mode.get("runtime") == "openvino":
                    if thr is not None and not openvino_set_runs_here(ckpt, thr):
                        thr, calib = None, calibration_folder(tmp, model, inputs[model])
                    program = openvino_for(ckpt, calib, thr)
                else:
                    program = int8_for(ckpt, calib, thr, args.batch_size) if int8 else None
                res["raw"] = raw_pipeline(ckpt, mode, inputs[model], (1, args.batch_size), repeat, program)
                print(model, mode_name, "raw", json.dumps(res["raw"]), flush=True)
                peer = None
                if mode_name == "openvino" and model not in BUNDLED and not args.no_peers:
                    from bench.peers import beside  # issue #36's gate, ImageNet size: side by side
                    peer = beside(program.path, load_mrl_resnet50(ckpt)[1], inputs[model], (1, args.batch_size),
                                  torch.get_num_threads())
                res["server"] = server_runs(tmp, ckpt, mode, inputs[model], args, thresholds=thr,
                                            cascade_check=thr is not None, int8_data=calib, peer=peer)
                print(model, mode_name, "server", json.dumps(res["server"]), flush=True)
                report["results"][f"{model}/{mode_name}"] = res
                write_report(report, args.out)  # kept if a later mode fails
        if not args.no_peers:
            from bench import peers

            report["peers"] = peers.run(args.models.split(","), ckpts, inputs, tmp, args.batch_size, args.quick)
            if "skipped" in report["peers"]:
                report.setdefault("skipped", []).append("peers: " + report["peers"]["skipped"])
    return save_report(report, args.out)  # the final one, skips included


if __name__ == "__main__":
    main()
