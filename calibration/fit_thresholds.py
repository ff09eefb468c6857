"""Learn the cascade's thresholds on a holdout set.

    python calibration/fit_thresholds.py --checkpoint CKPT --data fashion-mnist:holdout \\
        --out thresholds.json [--method greedy|frontier|guaranteed] [--max-drop 0.001] \\
        [--epsilon 0.005 --delta 0.1 [--unlabeled]] [--eval-data fashion-mnist:test]
    python calibration/fit_thresholds.py --checkpoint CKPT --data capture:DIR --unlabeled \
        [--since-hours 6] --out thresholds.json          # refit from the server's captured traffic
    python calibration/fit_thresholds.py ... --numerics fp32 --add --out thresholds.json   # one more set

Writes the thresholds file (several named operating points, the one of --method as default, and a
meta block tying it to the checkpoint) and, beside it, a markdown report and a PNG plot of
accuracy against expected dims. The forward pass is cached, so a refit with other options takes
a moment. Rule (shared with the server): size m answers when its max softmax >= t_m.

Thresholds are fit in the numerics that serve: by default what this CPU serves the card's mode in
(fp32 for a bf16 card on a CPU without bf16 instructions). ``--numerics MODE`` fits in MODE instead,
emulated where this CPU lacks its instructions (bf16 on AVX2: same rounding, about 5x slower), and
``--add`` adds that set to the --out file instead of replacing it (one set per numerics mode;
the worker serves the set of its mode, handler/thresholds.py). The report of an added set is
``<out>_report_<mode>.md``.

Captured traffic (``capture:DIR``, see handler/capture.py) carries no labels, so it needs
``--unlabeled``: every operating point is then fit against the 2048-d head's answers, and the
guaranteed point bounds disagreement with it by epsilon (with probability >= 1 - delta).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

from calibration.methods import Point, Thresholds, exits, fit_frontier, fit_greedy, fit_guaranteed, score
from calibration.outputs import DEFAULT_CACHE, Outputs, collect, is_capture
from handler.numerics import OPENVINO_SET
from handler.thresholds import SCHEMA, add_set

DEFAULT_POINT = {"greedy": "greedy", "frontier": "balanced", "guaranteed": "guaranteed"}


def fit_all(out: Outputs, args: argparse.Namespace) -> tuple[dict, list[Point], dict]:
    """Every operating point: name -> (thresholds, method, params, holdout Point)."""
    greedy = fit_greedy(out)
    balanced, frontier = fit_frontier(out, args.max_drop, extra=[greedy])
    fast, _ = fit_frontier(out, args.fast_drop, extra=[greedy])
    guaranteed, ltt = fit_guaranteed(out, args.epsilon, args.delta, unlabeled=args.unlabeled,
                                     family_fraction=args.family_fraction, seed=args.seed)
    exact = [None] * (len(out.nesting) - 1)
    points = {
        "balanced": (list(balanced.thresholds), "frontier", {"max_drop": args.max_drop}),
        "fast": (list(fast.thresholds), "frontier", {"max_drop": args.fast_drop}),
        "greedy": (greedy, "greedy", {"grid": "100 points in [0.1, 1]", "rule": ">="}),
        "guaranteed": (guaranteed, "guaranteed", ltt),
        "exact": (exact, "fixed", {"dims": out.nesting[-1]}),
    }
    scored = {name: (t, method, params, score(out, t)) for name, (t, method, params) in points.items()}
    return scored, frontier, ltt


# int8 passes parity, and ``auto`` may serve it, when on the holdout its 2048-d answers agree with
# fp32's on at least this share and its default point's cascade top-1 (thresholds fit in int8) is
# within this of fp32's default point (thresholds fit in fp32). Issue #18's bar.
PARITY_AGREEMENT, PARITY_CASCADE = 0.99, 0.003


def parity_with_fp32(out: Outputs, fp32: Outputs, scored: dict, args: argparse.Namespace) -> dict:
    """How the outputs of another numerics mode compare with fp32's on the same images."""
    if not np.array_equal(out.labels, fp32.labels):
        raise ValueError("the two runs saw different data")
    agreement = {str(m): float(a) for m, a in zip(out.nesting, (out.pred == fp32.pred).mean(axis=0))}
    name = DEFAULT_POINT[args.method]
    ref = fit_all(fp32, args)[0][name][3]
    delta = scored[name][3].top1 - ref.top1
    full = str(out.nesting[-1])
    return {"data": args.data, "n": int(len(out.labels)), "agreement": agreement,
            "default_point": name, "cascade_top1": scored[name][3].top1, "fp32_cascade_top1": ref.top1,
            "cascade_top1_delta": round(delta, 6),
            "passed": bool(agreement[full] >= PARITY_AGREEMENT and abs(delta) <= PARITY_CASCADE),
            "rule": f"2048-d agreement >= {PARITY_AGREEMENT} and |default cascade top-1 delta| <= {PARITY_CASCADE}"}


def frontier_vs_greedy(greedy: Point, frontier: list[Point], on_eval: list[Point], ev: Outputs) -> dict:
    """Greedy against the frontier on the evaluation data, two ways: (a) the frontier point picked
    on the holdout (cheapest with holdout top-1 >= greedy's), scored on eval; (b) the cheapest path
    point whose eval top-1 reaches greedy's eval top-1 (the curve a reader sees in the plot)."""
    g_eval = score(ev, list(greedy.thresholds))
    reach = [i for i, p in enumerate(frontier) if p.top1 >= greedy.top1 - 1e-12]
    pick = min(reach, key=lambda i: frontier[i].expected_dims)
    cheapest = min((q for q in on_eval if q.top1 >= g_eval.top1 - 1e-12), key=lambda q: q.expected_dims, default=None)
    as_dict = lambda q: {"top1": q.top1, "expected_dims": q.expected_dims}  # noqa: E731
    return {"greedy": as_dict(g_eval), "at_greedy_holdout": as_dict(on_eval[pick]),
            "cheapest_on_eval": None if cheapest is None else as_dict(cheapest)}


# The live alert's line for a point without an unlabeled guarantee: this factor times its holdout
# disagreement with the 2048-d head, and never below the floor (monitoring/alerts.yml explains the
# traffic guard that goes with it).
ALERT_FACTOR = 2.0
ALERT_FLOOR = 0.005


def disagreement(out: Outputs, t: Thresholds) -> float:
    """Share of samples whose answer under ``t`` differs from the 2048-d head's (no labels)."""
    e = exits(out, t)
    return float((out.pred[np.arange(len(e)), e] != out.pred[:, -1]).mean())


def alert_line(method: str, params: dict, holdout_disagreement: float) -> float | None:
    """The disagreement ratio above which MRLDisagreementAboveEpsilon fires for a point: epsilon
    when the point guarantees disagreement (unlabeled), else ALERT_FACTOR x its holdout
    disagreement, at least ALERT_FLOOR and at most 1; None for a point that cannot disagree
    (fixed 2048)."""
    if method == "fixed":
        return None
    if method == "guaranteed" and params.get("unlabeled"):
        return float(params["epsilon"])
    return round(min(max(ALERT_FACTOR * holdout_disagreement, ALERT_FLOOR), 1.0), 6)


def thresholds_doc(out: Outputs, scored: dict, frontier: list[Point], args: argparse.Namespace) -> dict:
    keys = [str(m) for m in out.nesting[:-1]]
    ops = {}
    for name, (t, method, params, pt) in scored.items():
        d = disagreement(out, t)
        ops[name] = {"thresholds": dict(zip(keys, t)), "method": method, "params": params,
                     "holdout": {"top1": pt.top1, "expected_dims": pt.expected_dims, "disagreement": d}}
        line = alert_line(method, params, d)
        if line is not None:
            ops[name]["alert_disagreement"] = line
    return {
        "schema": SCHEMA,
        "default": DEFAULT_POINT[args.method],
        "operating_points": ops,
        "meta": {
            "nesting": list(out.nesting),
            "checkpoint": Path(args.checkpoint).name,
            "checkpoint_sha256": out.meta["checkpoint_sha256"],
            "numerics": out.meta["numerics"],
            **({"emulated": "this CPU had no instructions for it: same rounding, computed slower"}
               if out.meta.get("emulated") else {}),
            "graph": out.meta["graph"],
            "data": {"spec": args.data, "n": int(len(out.labels)),
                     **({"labels": "none: fit against the 2048-d head's answers",
                         "capture": out.meta["capture"]} if not out.labeled else {})},
            "rule": "size m answers when its max softmax >= t_m; null skips the size; the last size always answers",
            "holdout_top1": out.top1(),
            "frontier": [[round(p.expected_dims, 4), round(p.top1, 6)] for p in frontier],
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    }


def write_report(path: Path, out: Outputs, scored: dict, frontier: list[Point], evals: dict,
                 args: argparse.Namespace, fit_seconds: float) -> None:
    """Markdown table and a PNG plot of accuracy against expected dims."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = out.top1()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    ax.plot([p.expected_dims for p in frontier], [100 * p.top1 for p in frontier], "-", color="tab:blue",
            lw=1.5, label="frontier (holdout)")
    ax.plot(out.nesting, [100 * fixed[str(m)] for m in out.nesting], "s--", color="gray", ms=5,
            label="fixed sizes (holdout)")
    if evals:
        ax.plot([d for d, _ in evals["frontier"]], [100 * a for _, a in evals["frontier"]], ":",
                color="tab:blue", lw=1.5, label=f"frontier ({args.eval_data})")
        ax.plot(out.nesting, [100 * evals["top1"][str(m)] for m in out.nesting], "s:", color="black",
                mfc="none", ms=5, label=f"fixed sizes ({args.eval_data})")
    styles = {"greedy": ("o", "tab:orange"), "balanced": ("*", "tab:blue"), "fast": ("^", "tab:cyan"),
              "guaranteed": ("D", "tab:green")}
    for name, (marker, color) in styles.items():
        pt = scored[name][3]
        ax.plot(pt.expected_dims, 100 * pt.top1, marker, color=color, ms=10, label=f"{name} (holdout)")
        if name in evals.get("points", {}):
            e = evals["points"][name]
            ax.plot(e["expected_dims"], 100 * e["top1"], marker, mfc="none", color=color, ms=10,
                    label=f"{name} ({args.eval_data})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(out.nesting, [str(m) for m in out.nesting])
    ax.set_xlabel("expected embedding dims (log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    lo = min(100 * fixed[str(m)] for m in out.nesting)
    if evals:
        lo = min(lo, min(100 * evals["top1"][str(m)] for m in out.nesting))
    hi = max(100 * p.top1 for p in frontier)
    if evals:
        hi = max(hi, max(100 * a for _, a in evals["frontier"]))
    lo = max(lo, hi - 25.0)  # a model with a weak 8-d head: keep the interesting end readable
    ax.set_ylim(lo - 1.0, hi + 0.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{Path(args.checkpoint).name}: cascade accuracy vs expected dims")
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png)
    plt.close(fig)

    lines = [f"# Calibration report: {Path(args.checkpoint).name}", "",
             f"Holdout `{args.data}` ({len(out.labels)} images), numerics {out.meta['numerics']}"
             f"{' (emulated: this CPU has no bf16 instructions)' if out.meta.get('emulated') else ''}, graph "
             f"{out.meta['graph']}; fit in {fit_seconds:.2f} s from cached outputs. Rule: size m answers when "
             "its max softmax >= t_m.", "",
             *([f"Unlabeled data (captured traffic, {out.meta['capture']['files']} files): \"top-1\" on it "
                "is agreement with the 2048-d head, and the guaranteed point bounds disagreement.", ""]
               if not out.labeled else []),
             f"![accuracy vs expected dims]({png.name})", "",
             "| operating point | method | holdout top-1 | holdout dims |"
             + (f" {args.eval_data} top-1 | {args.eval_data} dims |" if evals else ""),
             "|---|---|---|---|" + ("---|---|" if evals else "")]
    for name, (_t, method, _params, pt) in scored.items():
        row = f"| {name} | {method} | {pt.top1:.4f} | {pt.expected_dims:.1f} |"
        if evals:
            e = evals["points"][name]
            row += f" {e['top1']:.4f} | {e['expected_dims']:.1f} |"
        lines.append(row)
    g = scored["greedy"][3]
    match = min((p for p in frontier if p.top1 >= g.top1), key=lambda p: p.expected_dims, default=None)
    if match is not None:
        lines += ["", f"Frontier vs greedy on the holdout: greedy reaches {g.top1:.4f} at {g.expected_dims:.2f} dims; "
                  f"the frontier reaches {match.top1:.4f} at {match.expected_dims:.2f} dims."]
    if evals:
        cmp = evals["frontier_vs_greedy"]
        lines += ["", f"Frontier vs greedy on {args.eval_data}: greedy {cmp['greedy']['top1']:.4f} at "
                  f"{cmp['greedy']['expected_dims']:.2f} dims. The frontier point chosen on the holdout as the "
                  f"cheapest reaching greedy's holdout top-1 scores {cmp['at_greedy_holdout']['top1']:.4f} at "
                  f"{cmp['at_greedy_holdout']['expected_dims']:.2f} dims there ("
                  f"{cmp['at_greedy_holdout']['expected_dims'] / cmp['greedy']['expected_dims']:.2f}x greedy's dims)."
                  + ("" if cmp["cheapest_on_eval"] is None else
                     f" Along the whole frontier path (each point fit on the holdout), the cheapest reaching greedy's "
                     f"{args.eval_data} top-1 there uses {cmp['cheapest_on_eval']['expected_dims']:.2f} dims "
                     f"({cmp['cheapest_on_eval']['expected_dims'] / cmp['greedy']['expected_dims']:.2f}x).")]
    lines += ["", "Fixed sizes (top-1):", "",
              "| data | " + " | ".join(str(m) for m in out.nesting) + " |",
              "|---|" + "---|" * len(out.nesting),
              f"| {args.data} | " + " | ".join(f"{fixed[str(m)]:.4f}" for m in out.nesting) + " |"]
    if evals:
        lines.append(f"| {args.eval_data} | " + " | ".join(f"{evals['top1'][str(m)]:.4f}" for m in out.nesting) + " |")
    lines += ["", "Live disagreement with the 2048-d head (no labels), and the line at which "
              "MRLDisagreementAboveEpsilon fires (epsilon for an unlabeled guarantee, else "
              f"{ALERT_FACTOR:g}x the holdout disagreement, at least {ALERT_FLOOR:g}):", "",
              "| operating point | holdout disagreement | alert line |", "|---|---|---|"]
    for name, (t, method, params, _pt) in scored.items():
        d = disagreement(out, t)
        line = alert_line(method, params, d)
        lines.append(f"| {name} | {d:.4f} | {'-' if line is None else f'{line:.4f}'} |")
    lines += ["", "Thresholds (null = size skipped):", "", "| operating point | " +
              " | ".join(str(m) for m in out.nesting[:-1]) + " |", "|---|" + "---|" * (len(out.nesting) - 1)]
    for name, (t, *_rest) in scored.items():
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in t) + " |")
    path.write_text("\n".join(lines) + "\n")


def openvino_programs(args: argparse.Namespace):
    """(OpenVINO's int8 program, our int8 program with its AOTInductor package) for an
    ``openvino-int8`` set: both calibrated on the int8 set's record in --out where there is one
    (the images our int8 was calibrated on), else on --int8-data or --data."""
    from calibration import int8, openvino_int8
    from handler.quantize import package_batches

    dest = Path(args.out)
    ours = int8.for_thresholds(args.checkpoint, dest) if dest.exists() else None
    if ours is None:
        ours = int8.build(args.checkpoint, args.int8_data or args.data)
    accuracy = (openvino_int8.accuracy_control(args.openvino_validation, max_drop=args.openvino_max_drop)
                if args.openvino_validation else None)
    program = openvino_int8.build_openvino(args.checkpoint, ours.meta["data"], images=ours.meta["images"],
                                           accuracy=accuracy)
    return program, int8.compile_package(ours, package_batches(8))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="holdout: fashion-mnist:holdout or a folder")
    p.add_argument("--out", required=True, help="thresholds JSON; the report and plot go beside it")
    p.add_argument("--method", choices=tuple(DEFAULT_POINT), default="frontier",
                   help="which method's operating point is the default")
    p.add_argument("--max-drop", type=float, default=0.001, help="frontier: allowed holdout top-1 drop ('balanced')")
    p.add_argument("--fast-drop", type=float, default=0.01, help="frontier: allowed drop for 'fast'")
    p.add_argument("--epsilon", type=float, default=0.005, help="guaranteed: allowed drop on new data")
    p.add_argument("--delta", type=float, default=0.1, help="guaranteed: allowed failure probability")
    p.add_argument("--unlabeled", action="store_true", help="guaranteed: bound disagreement with 2048-d instead")
    p.add_argument("--family-fraction", type=float, default=0.3, help="guaranteed: holdout share that orders candidates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-data", help="also score every operating point on this data (report only)")
    p.add_argument("--graph", default="jit", choices=("eager", "jit", "compile"))
    p.add_argument("--since-hours", type=float, default=None,
                   help="capture data: only the records of the last N hours")
    p.add_argument("--numerics", choices=("fp32", "bf16", "int8", OPENVINO_SET),
                   help="fit in this mode (default: what this CPU serves the card's in); bf16 is emulated if "
                        "the CPU lacks it; int8 quantizes the backbone (calibration/int8.py) and records parity; "
                        f"{OPENVINO_SET}: OpenVINO's int8 program (calibration/openvino_int8.py), calibrated on the "
                        "int8 set's record in --out, with parity and its speed against our int8 on this CPU")
    p.add_argument("--int8-data", help="int8: the images that calibrate the quantizer (default: --data)")
    p.add_argument("--openvino-validation", metavar="SPEC",
                   help=f"{OPENVINO_SET}: NNCF's accuracy control on this data (not --data: e.g. the model's "
                        "training split): quantized ops go back to float until the 2048-d agreement with fp32 "
                        "there is within --openvino-max-drop, for a model whose plain int8 fails parity")
    p.add_argument("--openvino-max-drop", type=float, default=0.004,
                   help="accuracy control's allowed drop of that agreement (default 0.004)")
    p.add_argument("--add", action="store_true",
                   help="add this numerics mode's set to the --out file (replacing a set of the same mode)")
    p.add_argument("--no-cache", action="store_true")
    args = p.parse_args(argv)
    if args.numerics and is_capture(args.data):
        p.error("captured traffic was served in one numerics mode, which it records: drop --numerics")
    if args.openvino_validation and args.numerics != OPENVINO_SET:
        p.error(f"--openvino-validation applies to --numerics {OPENVINO_SET} only")
    if args.openvino_validation == args.data:
        p.error("--openvino-validation must not be --data: the holdout that measures parity would choose "
                "which layers stay in float")
    cache = None if args.no_cache else DEFAULT_CACHE
    if is_capture(args.data) and not args.unlabeled:
        p.error("captured traffic has no labels: add --unlabeled (every point is then fit against the "
                "2048-d head's answers, and 'guaranteed' bounds disagreement with it)")
    if args.since_hours is not None and not is_capture(args.data):
        p.error("--since-hours applies to capture:DIR data only")
    since = None if args.since_hours is None else time.time() - 3600 * args.since_hours

    program, ours = None, None
    if args.numerics == "int8":
        from calibration import int8

        program = int8.build(args.checkpoint, args.int8_data or args.data)
    elif args.numerics == OPENVINO_SET:
        program, ours = openvino_programs(args)
    numerics = "int8" if args.numerics == OPENVINO_SET else args.numerics  # what the Engine runs
    out = collect(args.checkpoint, args.data, graph=args.graph, cache_dir=cache, since=since,
                  numerics=numerics, emulate=bool(args.numerics), int8_program=program)
    if out.meta.get("emulated"):
        print(f"note: this CPU has no {out.meta['numerics']} instructions: {out.meta['numerics']} is emulated "
              "(same rounding, slower)", file=sys.stderr)
    t0 = time.perf_counter()
    scored, frontier, _ = fit_all(out, args)
    fit_seconds = time.perf_counter() - t0
    doc = thresholds_doc(out, scored, frontier, args)
    if "int8_program" in out.meta:  # the quantized backbone these outputs came from (int8)
        doc["meta"]["int8_program"] = out.meta["int8_program"]
    if args.numerics == OPENVINO_SET:  # a set of its own, beside our int8's
        doc["meta"]["numerics"] = OPENVINO_SET
        doc["meta"]["int8_program"]["runtime"] = "openvino"
        if "accuracy_control" in program.meta:  # how to rebuild it (openvino_int8.for_thresholds)
            doc["meta"]["int8_program"]["accuracy_control"] = program.meta["accuracy_control"]
    if program is not None:
        fp32 = collect(args.checkpoint, args.data, graph=args.graph, cache_dir=cache, numerics="fp32")
        doc["meta"]["parity"] = parity_with_fp32(out, fp32, scored, args)
        print(f"{doc['meta']['numerics']} parity on {args.data}: {json.dumps(doc['meta']['parity'])}", file=sys.stderr)
    if ours is not None:  # what auto reads: measured here, each engine in its own process
        from calibration import openvino_int8

        doc["meta"]["speed"] = openvino_int8.speed_against_torch(args.checkpoint, ours, program)
        print(f"{OPENVINO_SET} speed: {json.dumps({k: v['per_batch'] for k, v in doc['meta']['speed'].items()})} "
              "(OpenVINO over our int8, per batch size)", file=sys.stderr)
    evals = {}
    if args.eval_data:
        ev = collect(args.checkpoint, args.eval_data, graph=args.graph, cache_dir=cache,
                     numerics=numerics, emulate=bool(args.numerics), int8_program=program)
        evals = {"top1": ev.top1(), "points": {n: score(ev, t).__dict__ for n, (t, *_r) in scored.items()}}
        on_eval = [score(ev, list(p.thresholds)) for p in frontier]
        evals["frontier"] = [[round(q.expected_dims, 4), round(q.top1, 6)] for q in on_eval]
        evals["frontier_vs_greedy"] = frontier_vs_greedy(scored["greedy"][3], frontier, on_eval, ev)
        doc["meta"]["eval"] = {"data": args.eval_data, "n": int(len(ev.labels)), **evals}
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(dest.read_text()) if args.add and dest.exists() else None
    dest.write_text(json.dumps(add_set(existing, doc), indent=2) + "\n")
    report = dest.with_name(f"{dest.stem}_report" + (f"_{doc['meta']['numerics']}" if args.add else "") + ".md")
    write_report(report, out, scored, frontier, evals, args, fit_seconds)
    d = scored[doc["default"]][3]
    print(f"wrote {dest} ({doc['meta']['numerics']} set; default {doc['default']}: holdout top-1 {d.top1:.4f} at "
          f"{d.expected_dims:.1f} dims; fit {fit_seconds:.2f} s) and {report.stem}.md/.png")
    return doc


if __name__ == "__main__":
    main()
