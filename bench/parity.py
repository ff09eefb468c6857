"""Parity of bf16 against fp32 serving numerics on the demo model, over Fashion-MNIST test.

    python -m bench.parity                      # writes docs/results/parity.json and prints a table
    python -m bench.parity --mode int8 | --mode openvino-int8 [--checkpoint ... --thresholds ... --data ...]

One checkpoint, the serving graph (traced + frozen), run once with fp32 and once with bf16 autocast.
Reported per nesting size: top-1 in each mode and the share of images whose bf16 prediction equals
the fp32 one; and for every operating point in the thresholds file, the cascade's top-1, expected
dims and agreement in each mode. The thresholds were fit with the card's numerics; applying them
to bf16 outputs is exactly what serving bf16 without refitting would do.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import DEMO, ROOT, header, save_report
from calibration.methods import exits
from calibration.outputs import DEFAULT_CACHE, Outputs, collect
from handler.numerics import OPENVINO_SET, bf16_supported
from handler.thresholds import SETS_SCHEMA, load_thresholds, numerics_sets

AGREEMENT_TARGET = 0.995   # bf16: top-1 agreement with fp32 (issue 6, acceptance 2)
CASCADE_TARGET = 0.001     # bf16: cascade accuracy within 0.1 pt of fp32
INT8_AGREEMENT, INT8_CASCADE = 0.99, 0.003  # int8 (issue #18, acceptance 3)


def cascade(out: Outputs, thresholds: list) -> tuple[np.ndarray, dict]:
    e = exits(out, thresholds)
    rows = np.arange(len(e))
    return out.pred[rows, e], {"top1": float(out.correct[rows, e].mean()),
                               "expected_dims": float(np.asarray(out.nesting)[e].mean())}


def parity(fp32: Outputs, other: Outputs, points: dict[str, list], other_points: dict[str, list] | None = None,
           mode: str = "bf16") -> dict:
    """fp32 against ``mode``: per size, and per operating point with ``points`` on fp32 and
    ``other_points`` (default: the same) on the other mode."""
    if not np.array_equal(fp32.labels, other.labels):
        raise ValueError("the two runs saw different data")
    other_points = points if other_points is None else other_points
    sizes = [str(m) for m in fp32.nesting]
    report = {"n": int(len(fp32.labels)), "sizes": list(fp32.nesting),
              "top1": {"fp32": fp32.top1(), mode: other.top1()},
              "agreement": dict(zip(sizes, (fp32.pred == other.pred).mean(axis=0).tolist())),
              "cascade": {}}
    for name, t in points.items():
        if name not in other_points:
            continue
        p32, c32 = cascade(fp32, list(t))
        po, co = cascade(other, list(other_points[name]))
        report["cascade"][name] = {"fp32": c32, mode: co, "agreement": float((p32 == po).mean()),
                                   "top1_delta": co["top1"] - c32["top1"]}
    return report


def int8_parity(args, cache) -> dict:
    """int8 against fp32, each with the thresholds set fit in its own mode (issue #18's check)."""
    from calibration import int8

    doc = json.loads(Path(args.thresholds).read_text())
    sets = numerics_sets(doc)
    if "int8" not in sets or "fp32" not in sets:
        raise SystemExit(f"{args.thresholds} holds sets for {sorted(sets)}: fit the missing ones with "
                         "calibration/fit_thresholds.py --numerics int8 (and fp32) --add")
    try:
        program = int8.for_thresholds(args.checkpoint, args.thresholds)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    fp32 = collect(args.checkpoint, args.data, numerics="fp32", cache_dir=cache)
    int8 = collect(args.checkpoint, args.data, numerics="int8", int8_program=program, cache_dir=cache)
    return _against_fp32(args, fp32, int8, "int8", {
        "thresholds_numerics": "each mode its own set", "graph": "jit / compile",
        "int8_program": program.meta, "holdout_parity": sets["int8"]["meta"].get("parity"),
        "forward_cached": {"fp32": fp32.meta["cached"], "int8": int8.meta["cached"]}})


def _against_fp32(args, fp32, other, mode: str, fields: dict, other_set: str = "int8") -> dict:
    """The report of an int8 engine against fp32: each read with its thresholds set (fp32's, and
    ``other_set`` for the int8 engine), with int8's limits as checks."""
    load = lambda numerics: load_thresholds(args.thresholds, nesting=fp32.nesting,  # noqa: E731
                                            checkpoint_sha256=fp32.meta["checkpoint_sha256"], numerics=numerics)
    ops32, ops8 = load("fp32"), load(other_set)
    report = {"mode": mode, **header("bench.parity", None), "checkpoint": args.checkpoint,
              "data": args.data, **fields, **parity(fp32, other, ops32.points, ops8.points, mode=mode)}
    full, default = str(fp32.nesting[-1]), ops8.default
    report["checks"] = {
        "agreement_2048_at_least_0.99": report["agreement"][full] >= INT8_AGREEMENT,
        "default_cascade_within_0.3pt": abs(report["cascade"][default]["top1_delta"]) <= INT8_CASCADE}
    return report


def openvino_parity(args, cache) -> dict:
    """OpenVINO's int8 against fp32 (issue #36, acceptance 3), with int8's limits: the program of the
    thresholds' openvino-int8 set, read with that set, as a worker serves it; where the file has no
    such set, plain NNCF on the int8 set's calibration record, read with the int8 set."""
    from calibration import openvino_int8

    doc = json.loads(Path(args.thresholds).read_text())
    sets = numerics_sets(doc)
    fit = sets.get("int8", {}).get("meta", {}).get("int8_program")
    if not fit or "fp32" not in sets:
        raise SystemExit(f"{args.thresholds} needs an fp32 and an int8 set (the int8 record names the calibration data)")
    own = OPENVINO_SET in sets
    try:
        program = (openvino_int8.for_thresholds(args.checkpoint, args.thresholds) if own else
                   openvino_int8.build_openvino(args.checkpoint, fit["data"], images=fit["images"]))
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    fp32 = collect(args.checkpoint, args.data, numerics="fp32", cache_dir=cache)
    ov = collect(args.checkpoint, args.data, numerics="int8", int8_program=program, cache_dir=None)
    used = OPENVINO_SET if own else "int8"
    return _against_fp32(args, fp32, ov, "openvino-int8", {
        "thresholds_numerics": f"fp32's set on fp32, the {used} set on OpenVINO", "graph": "jit / openvino",
        "openvino_program": program.meta}, other_set=used)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str((DEMO / "mrl_resnet50_fp16.pt").relative_to(ROOT)))
    p.add_argument("--thresholds", default=str((DEMO / "thresholds.json").relative_to(ROOT)))
    p.add_argument("--data", default="fashion-mnist:test")
    p.add_argument("--no-cache", action="store_true", help="always run the forward passes")
    p.add_argument("--mode", choices=("bf16", "int8", "openvino-int8"), default="bf16")
    p.add_argument("--out", default=None, help="default docs/results/parity.json (bf16), docs/results/parity_int8_<model>.json")
    args = p.parse_args(argv)
    if args.mode in ("int8", "openvino-int8"):
        stem = "parity_int8" if args.mode == "int8" else "parity_openvino_int8"
        out = args.out or str(ROOT / "docs" / "results" / f"{stem}_{Path(args.checkpoint).parent.name}.json")
        check = int8_parity if args.mode == "int8" else openvino_parity
        report = check(args, None if args.no_cache else DEFAULT_CACHE)
        return save_report(report, out, markdown(report))
    args.out = args.out or str(ROOT / "docs" / "results" / "parity.json")
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
    report = {**header("bench.parity", argv), "checkpoint": args.checkpoint,
              "data": args.data, "thresholds_numerics": ops.meta.get("numerics"), "graph": fp32.meta["graph"],
              "forward_cached": {"fp32": fp32.meta["cached"], "bf16": bf16.meta["cached"]},
              **parity(fp32, bf16, ops.points)}
    full = str(fp32.nesting[-1])
    report["checks"] = {
        "agreement_2048_at_least_0.995": report["agreement"][full] >= AGREEMENT_TARGET,
        "cascade_within_0.1pt": all(abs(c["top1_delta"]) <= CASCADE_TARGET for c in report["cascade"].values())}
    return save_report(report, args.out, markdown(report) + f"\n\nboth runs: {time.perf_counter() - t0:.0f} s")


def markdown(r: dict) -> str:
    sizes = [str(m) for m in r["sizes"]]
    m = r.get("mode", "bf16")
    lines = [f"Parity of {m} against fp32 on `{r['data']}` ({r['n']} images), graph {r['graph']}, "
             f"{r['machine']['cpu']}; `{r['command']}` on {r['date']}.", "",
             "| | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes),
             "| top-1 fp32 | " + " | ".join(f"{r['top1']['fp32'][s]:.4f}" for s in sizes) + " |",
             f"| top-1 {m} | " + " | ".join(f"{r['top1'][m][s]:.4f}" for s in sizes) + " |",
             f"| {m} = fp32 prediction | " + " | ".join(f"{r['agreement'][s]:.4f}" for s in sizes) + " |", "",
             f"| operating point (thresholds fit in {r['thresholds_numerics']}) | cascade top-1 fp32 | {m} | "
             f"difference (pt) | expected dims fp32 / {m} | same answer |", "|---|---|---|---|---|---|"]
    for name, c in r["cascade"].items():
        lines.append(f"| {name} | {c['fp32']['top1']:.4f} | {c[m]['top1']:.4f} | {100 * c['top1_delta']:+.2f} | "
                     f"{c['fp32']['expected_dims']:.1f} / {c[m]['expected_dims']:.1f} | {c['agreement']:.4f} |")
    lines += ["", "Checks: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r.get("checks", {}).items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
