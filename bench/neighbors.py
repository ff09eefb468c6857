"""What a neighbours request adds to a classification request: one han1000 archive serving a
gallery, asked alternately (ABBA) for the class alone and for the class plus its 10 nearest
gallery items, in one run.

    python -m bench.neighbors --gallery galleries/han-100k [--pairs 4] [--phase-s 15]   # docs/results/neighbors.json

Per phase: one client's p50/p99 (latency is the question, so one request at a time). Requests
are the first 64 han1000:test images (never in a gallery built from train or gallery renders).
The report gives medians over the phases per request kind and the difference to classification
alone, with the gallery's size and the CPU it ran on. Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.harness import BUNDLED, ROOT, demo_inputs, header, save_report, serve_phase, server
from handler.gallery import read_meta

KINDS = {"classify": None,
         "neighbors": {"X-MRL-Neighbors": "10"},
         "neighbors_exact": {"X-MRL-Neighbors": "10", "X-MRL-Funnel": "exact"}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gallery", required=True, help="a gallery of the han1000 checkpoint (retrieval/build_index.py)")
    p.add_argument("--pairs", type=int, default=4, help="ABBA pairs of phases per request kind")
    p.add_argument("--phase-s", type=float, default=15.0)
    p.add_argument("--exact", action="store_true", help="also time funnel=exact (brute force at 2048)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "neighbors.json"))
    args = p.parse_args(argv)
    if "han1000" not in BUNDLED:
        raise SystemExit("bench.neighbors serves the han1000 model: its checkpoint is model_store/han1000/mrl_resnet50_fp16.pt (docs/models.md)")
    folder, spec = BUNDLED["han1000"]
    ckpt = folder / "mrl_resnet50_fp16.pt"
    meta = read_meta(args.gallery)
    kinds = [k for k in KINDS if args.exact or k != "neighbors_exact"]
    bodies = demo_inputs(spec=spec)
    report = {**header("bench.neighbors", argv),
              "gallery": {k: meta[k] for k in ("spec", "n", "checkpoint")}, "phase_s": args.phase_s}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        settings = dict(thresholds=folder / "thresholds.json", gallery_dir=args.gallery, workers=1,
                        exact_max_items=10**9 if args.exact else None)  # --exact times the full scan
        with server(tmp, ckpt, {"han1000": settings}, timeout=300, load_models=True):
            serve_phase(tmp, bodies, 1, 3.0, headers=KINDS["neighbors"], model="han1000")  # warm: pages in
            phases = {k: [] for k in kinds}
            for i in range(args.pairs):
                for kind in (kinds if i % 2 == 0 else kinds[::-1]):
                    phases[kind].append(serve_phase(tmp, bodies, 1, args.phase_s, headers=KINDS[kind], model="han1000"))
                    print(kind, json.dumps(phases[kind][-1]), flush=True)
    summary = {k: {"p50_ms": statistics.median(r["p50_ms"] for r in ph),
                   "p99_ms": statistics.median(r["p99_ms"] for r in ph),
                   "errors": sum(r["errors"] for r in ph)} for k, ph in phases.items()}
    base = summary["classify"]["p50_ms"]
    report.update(phases=phases, summary=summary,
                  added_p50_ms={k: summary[k]["p50_ms"] - base for k in kinds if k != "classify"})
    return save_report(report, args.out, {"summary": summary, "added_p50_ms": report["added_p50_ms"]})


if __name__ == "__main__":
    main()
