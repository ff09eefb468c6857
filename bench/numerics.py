"""Serving numerics side by side: one bundled model archived once per numerics (fp32, bf16 where the
CPU has it, int8, auto), served by one TorchServe, measured in alternating phases in one run; then
each archive's cold start, from `torchserve --start` to the first answer, with a warm cache.

    python -m bench.numerics [--model demo] [--pairs 3] [--phase-s 12]   # docs/results/numerics_<model>.json
    python -m bench.numerics --graphs [--model demo]   # in process, per graph mode: docs/results/graph_modes_<model>.json

Per phase: saturation throughput with 8 clients and one client's p50. The report gives medians over
the phases, each mode's ratio to fp32, what ``auto`` chose on this CPU (its worker's log line), and
the CPU's ISA flags. int8 needs the thresholds' int8 set (fit_thresholds.py --numerics int8 --add).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import BUNDLED, ROOT, demo_inputs, header, save_report, serve_phase, server
from handler.cpus import cpu_isa, isa_name
from handler.numerics import bf16_supported
from handler.quantize import Program


def cold_start(tmp: Path, store: Path, name: str, body: bytes) -> float:
    """Seconds from `torchserve --start` (this archive alone) to its first answer."""
    with server(tmp, models=[name], store=store, load_models=True, timeout=600,
                config_name=f"cold-{name}.properties") as srv:
        status = srv.client(name).predict(body).status
        if status != 200:
            raise RuntimeError(f"{name}: first answer {status}")
        return time.perf_counter() - srv.started


def graph_modes(ckpt: Path, thresholds: Path, rounds: int = 5, calls: int = 20) -> dict:
    """In process, the backbone and heads alone: each numerics in each graph mode at the serving
    batch sizes 1 and 8, in alternating rounds; medians of img/s. int8: its torch.compile graph
    against its AOTInductor package (the same program)."""
    import torch

    from calibration import int8
    from handler.checkpoint import load_mrl_resnet50
    from handler.engine import Engine, configure_threads

    configure_threads()
    model, card = load_mrl_resnet50(ckpt, numerics="fp32")
    program = int8.for_thresholds(ckpt, thresholds)
    if program is None:
        raise SystemExit(f"{thresholds} has no int8 set: fit_thresholds.py --numerics int8 --add")
    packaged = int8.compile_package(program)
    size, sizes = card.preprocessing.crop, (1, 8)
    engines, start_s = {}, {}
    for name, kw in (("fp32/jit", dict(numerics="fp32", graph="jit")),
                     ("fp32/compile", dict(numerics="fp32", graph="compile")),
                     ("int8/compile", dict(numerics="int8", int8_program=Program(program.path, program.meta))),
                     ("int8/aoti", dict(numerics="int8", int8_program=packaged))):
        t0 = time.perf_counter()
        engines[name] = Engine(model, input_size=size, batch_sizes=sizes, **kw)
        start_s[name] = time.perf_counter() - t0
    out = {"start_s": start_s, "img_s": {}}
    for b in sizes:
        x = torch.randn(b, 3, size, size)
        runs = {name: [] for name in engines}
        for _ in range(rounds):
            for name, engine in engines.items():
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    engine(x)
                    times.append(time.perf_counter() - t0)
                runs[name].append(b / statistics.median(times))
        out["img_s"][str(b)] = {name: statistics.median(v) for name, v in runs.items()}
        print("batch", b, json.dumps(out["img_s"][str(b)]), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", choices=tuple(BUNDLED))
    p.add_argument("--pairs", type=int, default=3, help="ABBA rounds of phases per mode")
    p.add_argument("--phase-s", type=float, default=12.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--graphs", action="store_true",
                   help="instead: each numerics in each graph mode, in process (docs/results/graph_modes_<model>.json)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    folder, spec = BUNDLED[args.model]
    ckpt, thresholds = folder / "mrl_resnet50_fp16.pt", folder / "thresholds.json"
    if args.graphs:
        isa = cpu_isa()
        report = {**header("bench.numerics", argv, isa=isa_name(isa)), "model": args.model,
                  **graph_modes(ckpt, thresholds)}
        return save_report(report, args.out or str(ROOT / "docs" / "results" / f"graph_modes_{args.model}.json"), report)
    modes = ["fp32", *(["bf16"] if bf16_supported(__import__("torch").device("cpu")) else []), "int8", "auto"]
    bodies = demo_inputs(spec=spec)
    isa = cpu_isa()
    report = {**header("bench.numerics", argv, isa=isa_name(isa), flags=isa), "model": args.model,
              "phase_s": args.phase_s, "concurrency": args.concurrency, "modes": modes}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        archives = {m: dict(thresholds=thresholds, numerics=m, workers=1) for m in modes}
        with server(tmp, ckpt, archives, timeout=600, load_models=True):
            log = (tmp / "logs" / "model_log.log").read_text(errors="replace")
            chosen = {m: re.findall(rf"numerics (\w+), requested {m}: (.*)$", log, flags=re.M) for m in modes}
            phases = {m: {"saturation": [], "one_client": []} for m in modes}
            for i in range(args.pairs):
                for mode in (modes if i % 2 == 0 else modes[::-1]):
                    phases[mode]["saturation"].append(
                        serve_phase(tmp, bodies, args.concurrency, args.phase_s, model=mode))
                    phases[mode]["one_client"].append(serve_phase(tmp, bodies, 1, args.phase_s / 2, model=mode))
                    print(mode, json.dumps({k: v[-1] for k, v in phases[mode].items()}), flush=True)
        cold = {}
        for mode in modes:  # the second start of each finds the caches the first one filled
            cold[mode] = [cold_start(tmp, tmp / "store", mode, bodies[0]) for _ in range(2)]
            print(mode, "cold start s", cold[mode], flush=True)
    summary = {m: {"saturation_img_s": statistics.median(r["img_s"] for r in ph["saturation"]),
                   "one_client_p50_ms": statistics.median(r["p50_ms"] for r in ph["one_client"]),
                   "errors": sum(r["errors"] for k in ph for r in ph[k]),
                   "cold_start_s": {"first": cold[m][0], "warm_cache": cold[m][1]},
                   "served": chosen[m][0][0] if chosen[m] else None,
                   "why": chosen[m][0][1] if chosen[m] else None} for m, ph in phases.items()}
    base = summary["fp32"]["saturation_img_s"]
    ratios = {m: s["saturation_img_s"] / base for m, s in summary.items()}
    report.update(phases=phases, summary=summary, ratios_to_fp32=ratios)
    out = args.out or str(ROOT / "docs" / "results" / f"numerics_{args.model}.json")
    return save_report(report, out, {"machine": report["machine"]["cpu"], "isa": report["machine"]["isa"],
                                     "summary": summary, "ratios_to_fp32": ratios})


if __name__ == "__main__":
    main()
