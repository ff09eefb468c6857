"""The cascade's cost against a fixed 2048-d head, in process, where the server's noise is absent.

    python -m bench.cascade_overhead            # demo model and its thresholds, batch 8

One MRLService (the handler's pipeline: decode, preprocess, traced graph, cascade, JSON-able
answers, metrics), one batch of test images, handled alternately with the default operating point
and with ``X-MRL-Dim: 2048``; medians over the pairs. The server-level comparison in bench.run
carries the machine's ±10 % noise; this one isolates what the cascade itself adds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from bench.harness import DEMO, demo_inputs
from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.cpus import machine
from handler.engine import configure_threads
from handler.numerics import threshold_numerics
from handler.service import MRLService
from handler.thresholds import load_thresholds


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEMO / "mrl_resnet50_fp16.pt"))
    p.add_argument("--thresholds", default=str(DEMO / "thresholds.json"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pairs", type=int, default=60)
    args = p.parse_args(argv)
    configure_threads()
    model, card = load_mrl_resnet50(args.checkpoint)
    points = load_thresholds(args.thresholds, nesting=card.nesting, checkpoint_sha256=file_sha256(args.checkpoint),
                             numerics=threshold_numerics(card.numerics))
    svc = MRLService(model, card, points, graph="jit", batch_sizes=(args.batch_size,))
    bodies = demo_inputs(args.batch_size)
    items = [{"body": b} for b in bodies]
    cascade, fixed = [{}] * len(items), [{"X-MRL-Dim": "2048"}] * len(items)
    answers = {name: svc.handle(items, h) for name, h in (("cascade", cascade), ("fixed", fixed))}
    if any(status != 200 for rows in answers.values() for status, _ in rows):
        raise SystemExit("a warm-up request failed")
    times: dict[str, list[float]] = {"cascade": [], "fixed": []}
    for i in range(args.pairs):
        order = (("cascade", cascade), ("fixed", fixed)) if i % 2 else (("fixed", fixed), ("cascade", cascade))
        for name, h in order:
            t0 = time.perf_counter()
            svc.handle(items, h)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"machine": machine(), "batch_size": args.batch_size, "pairs": args.pairs,
              "operating_point": points.default, "ms_per_batch": {k: 1000 * v for k, v in med.items()},
              "mean_dims": statistics.mean(a["embedding_dim"] for _, a in answers["cascade"]),
              "overhead": med["cascade"] / med["fixed"] - 1}
    print(json.dumps(report))
    print(f"batch {args.batch_size}, {args.pairs} alternating pairs: cascade ({points.default}) "
          f"{report['ms_per_batch']['cascade']:.2f} ms vs fixed 2048-d {report['ms_per_batch']['fixed']:.2f} ms "
          f"per batch (medians): overhead {report['overhead']:+.1%}")
    return report


if __name__ == "__main__":
    main()
