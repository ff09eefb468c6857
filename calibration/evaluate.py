"""Per-size top-1 of a checkpoint on a data set, and optionally the cascade's.

    python calibration/evaluate.py --checkpoint CKPT --data fashion-mnist:test [--json]
    python calibration/evaluate.py --checkpoint CKPT --data fashion-mnist:test \\
        --thresholds thresholds.json [--operating-point NAME] --json

With --json it prints exactly one JSON object:
    {"n": int, "sizes": [...], "top1": {"8": float, ...}, "cascade": {...}}   (cascade with --thresholds)
Accuracies are fractions. Forward passes use the serving numerics and graph mode (see outputs.py).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from calibration.methods import exits
from calibration.outputs import DEFAULT_CACHE, Outputs, collect
from handler.numerics import threshold_numerics
from handler.thresholds import load_thresholds


def cascade_report(out: Outputs, thresholds_path: str, point: str | None) -> dict:
    # Checked as the server checks them: fit in the card's numerics or in what this CPU serves it
    # in (on a CPU without bf16 both serve a bf16 card in fp32: handler.numerics.resolve_numerics).
    points = load_thresholds(thresholds_path, nesting=out.nesting, checkpoint_sha256=out.meta["checkpoint_sha256"],
                             numerics=threshold_numerics(out.meta.get("card_numerics", out.meta["numerics"])))
    name = point or points.default
    if name not in points.points:
        raise SystemExit(f"operating point {name!r} is not in {thresholds_path}: {sorted(points.points)}")
    e = exits(out, list(points.points[name]))
    rows = np.arange(len(e))
    dims = np.asarray(out.nesting)[e]
    return {"operating_point": name, "thresholds": list(points.points[name]),
            "top1": float(out.correct[rows, e].mean()), "expected_dims": float(dims.mean()),
            "exits": {str(m): int((dims == m).sum()) for m in out.nesting},
            "agreement_with_full": float((out.pred[rows, e] == out.pred[:, -1]).mean())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="fashion-mnist:train|holdout|test or a folder")
    p.add_argument("--thresholds", help="also evaluate the cascade with these thresholds")
    p.add_argument("--operating-point", help="which operating point (default: the file's default)")
    p.add_argument("--graph", default="jit", choices=("eager", "jit", "compile"))
    p.add_argument("--no-cache", action="store_true", help="always run the forward pass")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = collect(args.checkpoint, args.data, graph=args.graph, cache_dir=None if args.no_cache else DEFAULT_CACHE)
    result = {"n": int(len(out.labels)), "sizes": list(out.nesting), "top1": out.top1()}
    if args.thresholds:
        result["cascade"] = cascade_report(out, args.thresholds, args.operating_point)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.data}: {result['n']} images, {out.meta['numerics']}, {time.perf_counter() - t0:.1f} s")
        print("size   " + "  ".join(f"{m:>6}" for m in out.nesting))
        print("top-1  " + "  ".join(f"{result['top1'][str(m)]:6.4f}" for m in out.nesting))
        if "cascade" in result:
            c = result["cascade"]
            print(f"cascade[{c['operating_point']}]: top-1 {c['top1']:.4f} at {c['expected_dims']:.1f} expected dims")
    return result


if __name__ == "__main__":
    main()
