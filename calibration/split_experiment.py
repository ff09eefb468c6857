"""Check the `guaranteed` method's promise empirically, by re-drawing the calibration set.

    python calibration/split_experiment.py --checkpoint CKPT --data fashion-mnist:holdout \\
        --eval-data fashion-mnist:test [--trials 200] [--epsilon 0.005 --delta 0.1] [--unlabeled]
    python calibration/split_experiment.py --checkpoint CKPT --data capture:DIR --unlabeled \
        [--cal-fraction 0.5]                 # captured traffic: split one pool

Pools the two sets' cached outputs (or takes --data alone, calibrating on --cal-fraction of it);
each trial draws a calibration set of the holdout's size at random, fits Learn-then-Test thresholds on it, and measures the accuracy drop (or disagreement)
against the 2048-d model on the remaining images. The guarantee says the drop exceeds epsilon in
at most a delta share of trials (up to the finite size of the evaluation part).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from calibration.methods import exits, fit_guaranteed, ltt_losses
from calibration.outputs import DEFAULT_CACHE, Outputs, collect, is_capture


def run(pool: Outputs, cal_size: int, trials: int, epsilon: float, delta: float, unlabeled: bool,
        seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    drops, dims, violations = [], [], 0
    for trial in range(trials):
        perm = rng.permutation(len(pool.labels))
        cal, ev = pool.subset(perm[:cal_size]), pool.subset(perm[cal_size:])
        t, _ = fit_guaranteed(cal, epsilon, delta, unlabeled=unlabeled, seed=trial)
        e = exits(ev, t)
        rows = np.arange(len(e))
        if unlabeled:
            drop = float(ltt_losses(ev, t, unlabeled=True).mean())
        else:
            drop = float(ev.correct[:, -1].mean() - ev.correct[rows, e].mean())
        drops.append(drop)
        dims.append(float(np.asarray(ev.nesting)[e].mean()))
        violations += drop > epsilon
    return {"trials": trials, "cal_size": cal_size, "eval_size": len(pool.labels) - cal_size,
            "epsilon": epsilon, "delta": delta, "unlabeled": unlabeled,
            "violation_rate": violations / trials, "mean_drop": float(np.mean(drops)),
            "max_drop": float(np.max(drops)), "mean_expected_dims": float(np.mean(dims))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--eval-data", default=None, help="pooled with --data; without it --data is split")
    p.add_argument("--cal-fraction", type=float, default=None,
                   help="without --eval-data: the share of --data each trial calibrates on (default 0.5)")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--epsilon", type=float, default=0.005)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--unlabeled", action="store_true")
    p.add_argument("--graph", default="jit", choices=("eager", "jit", "compile"))
    args = p.parse_args(argv)
    if is_capture(args.data) and not args.unlabeled:
        p.error("captured traffic has no labels: add --unlabeled")
    a = collect(args.checkpoint, args.data, graph=args.graph, cache_dir=DEFAULT_CACHE)
    if args.eval_data and args.cal_fraction is not None:
        p.error("--cal-fraction splits --data alone; with --eval-data the calibration set is --data")
    if args.eval_data:
        b = collect(args.checkpoint, args.eval_data, graph=args.graph, cache_dir=DEFAULT_CACHE)
        pool = Outputs(np.concatenate([a.conf, b.conf]), np.concatenate([a.pred, b.pred]),
                       np.concatenate([a.labels, b.labels]), a.nesting, a.meta)
        cal_size = len(a.labels)
    else:
        fraction = 0.5 if args.cal_fraction is None else args.cal_fraction
        if not 0 < fraction < 1:
            p.error(f"--cal-fraction must be in (0, 1), got {fraction}")
        pool, cal_size = a, int(round(fraction * len(a.labels)))
    result = run(pool, cal_size, args.trials, args.epsilon, args.delta, args.unlabeled)
    result["data"] = args.data if not args.eval_data else f"{args.data} + {args.eval_data}"
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
