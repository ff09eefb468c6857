"""Parity of bf16 against fp32 serving numerics on the demo model, over Fashion-MNIST test.

    python -m bench.parity                      # writes docs/parity.json and prints a table

One checkpoint, the serving graph (traced + frozen), run once with fp32 and once with bf16 autocast.
Reported per nesting size: top-1 in each mode and the share of images whose bf16 prediction equals
the fp32 one; and for every operating point in the thresholds file, the cascade's top-1, expected
dims and agreement in each mode. The thresholds were fit with the card's numerics; applying them
to bf16 outputs is exactly what serving bf16 without refitting would do.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.run import DEMO, ROOT, machine
from calibration.methods import exits
from calibration.outputs import DEFAULT_CACHE, Outputs, collect
from handler.engine import bf16_supported
from handler.thresholds import SETS_SCHEMA, load_thresholds

AGREEMENT_TARGET = 0.995   # top-1 agreement with fp32 (issue 6, acceptance 2)
CASCADE_TARGET = 0.001     # cascade accuracy within 0.1 pt of fp32


def cascade(out: Outputs, thresholds: list) -> tuple[np.ndarray, dict]:
    e = exits(out, thresholds)
    rows = np.arange(len(e))
    return out.pred[rows, e], {"top1": float(out.correct[rows, e].mean()),
                               "expected_dims": float(np.asarray(out.nesting)[e].mean())}


def parity(fp32: Outputs, bf16: Outputs, points: dict[str, list]) -> dict:
    if not np.array_equal(fp32.labels, bf16.labels):
        raise ValueError("the two runs saw different data")
    sizes = [str(m) for m in fp32.nesting]
    report = {"n": int(len(fp32.labels)), "sizes": list(fp32.nesting),
              "top1": {"fp32": fp32.top1(), "bf16": bf16.top1()},
              "agreement": dict(zip(sizes, (fp32.pred == bf16.pred).mean(axis=0).tolist())),
              "cascade": {}}
    for name, t in points.items():
        p32, c32 = cascade(fp32, list(t))
        p16, c16 = cascade(bf16, list(t))
        report["cascade"][name] = {"fp32": c32, "bf16": c16, "agreement": float((p32 == p16).mean()),
                                   "top1_delta": c16["top1"] - c32["top1"]}
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str((DEMO / "mrl_resnet50_fp16.pt").relative_to(ROOT)))
    p.add_argument("--thresholds", default=str((DEMO / "thresholds.json").relative_to(ROOT)))
    p.add_argument("--data", default="fashion-mnist:test")
    p.add_argument("--no-cache", action="store_true", help="always run the forward passes")
    p.add_argument("--out", default=str(ROOT / "docs" / "parity.json"))
    args = p.parse_args(argv)
    if not bf16_supported(torch.device("cpu")):
        raise SystemExit("this CPU has no bf16 support: nothing to compare")
    cache = None if args.no_cache else DEFAULT_CACHE
    t0 = time.perf_counter()
    fp32 = collect(args.checkpoint, args.data, numerics="fp32", cache_dir=cache)
    bf16 = collect(args.checkpoint, args.data, numerics="bf16", cache_dir=cache)
    # One set applied to both modes on purpose: of a file with a set per mode, the bf16 one.
    sets = json.loads(Path(args.thresholds).read_text()).get("schema") == SETS_SCHEMA
    ops = load_thresholds(args.thresholds, nesting=fp32.nesting, checkpoint_sha256=fp32.meta["checkpoint_sha256"],
                          numerics="bf16" if sets else None)
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m bench.parity " + " ".join(argv if argv is not None else sys.argv[1:]),
              "checkpoint": args.checkpoint,
              "data": args.data, "thresholds_numerics": ops.meta.get("numerics"), "graph": fp32.meta["graph"],
              "forward_cached": {"fp32": fp32.meta["cached"], "bf16": bf16.meta["cached"]},
              **parity(fp32, bf16, ops.points)}
    full = str(fp32.nesting[-1])
    report["checks"] = {
        "agreement_2048_at_least_0.995": report["agreement"][full] >= AGREEMENT_TARGET,
        "cascade_within_0.1pt": all(abs(c["top1_delta"]) <= CASCADE_TARGET for c in report["cascade"].values())}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return report


def markdown(r: dict) -> str:
    sizes = [str(m) for m in r["sizes"]]
    lines = [f"Parity on `{r['data']}` ({r['n']} images), graph {r['graph']}, {r['machine']['cpu']}; "
             f"`{r['command']}` on {r['date']}.", "",
             "| | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes),
             "| top-1 fp32 | " + " | ".join(f"{r['top1']['fp32'][s]:.4f}" for s in sizes) + " |",
             "| top-1 bf16 | " + " | ".join(f"{r['top1']['bf16'][s]:.4f}" for s in sizes) + " |",
             "| bf16 = fp32 prediction | " + " | ".join(f"{r['agreement'][s]:.4f}" for s in sizes) + " |", "",
             f"| operating point (thresholds fit in {r['thresholds_numerics']}) | cascade top-1 fp32 | bf16 | "
             "difference (pt) | expected dims fp32 / bf16 | same answer |", "|---|---|---|---|---|---|"]
    for name, c in r["cascade"].items():
        lines.append(f"| {name} | {c['fp32']['top1']:.4f} | {c['bf16']['top1']:.4f} | {100 * c['top1_delta']:+.2f} | "
                     f"{c['fp32']['expected_dims']:.1f} / {c['bf16']['expected_dims']:.1f} | {c['agreement']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
