"""Retrieval quality and cost per search method, side by side in one run.

    python retrieval/evaluate.py --gallery galleries/han1000-100k \\
        --checkpoint model_store/han1000/mrl_resnet50_fp16.pt --queries han1000:test --out docs/retrieval.json

Queries come from a split that is never in the gallery (the spec must differ from the gallery's).
Per method (exact 2048-d, the single-stage rerank, the paper's funnel, FAISS HNSW):

* mAP@10 as the MRL paper's notebook computes it (RAIVNLab/MRL retrieval/compute_metrics.ipynb):
  AP@10 = (1/10) * sum of precision@i over the ranks i <= 10 that hold the query's class. Note the
  1/10: textbook AP divides by the number of relevant items retrieved (or min(10, class size)),
  which gives larger numbers; a query with no hit scores 0 either way.
* precision@10: the share of the 10 retrieved items of the query's class.
* recall@10 against exact search: the share of the exact 2048-d top 10 that the method returns
  (the notebook's recall divides hits by 1,300 ImageNet images per class instead; we do not).
* MFLOPs per query (see retrieval/search.py) and wall-clock per query: one query at a time
  (median over ``--single`` queries) and the whole query set in one batch.
Also k-NN classification top-1 (k = 10) at each prefix size. Writes JSON and a plot beside it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from bench.run import machine
from handler.checkpoint import file_sha256
from retrieval.build_index import embed
from retrieval.gallery import Gallery
from retrieval.search import METHODS, knn_labels, search

K = 10


def average_precision_at_k(retrieved_labels: np.ndarray, query_labels: np.ndarray, k: int = K) -> np.ndarray:
    """Per query, the paper's AP@k: sum over relevant ranks i <= k of precision@i, divided by k."""
    hits = retrieved_labels[:, :k] == query_labels[:, None]
    precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    return (precision_at_i * hits).sum(axis=1) / k


def precision_at_k(retrieved_labels: np.ndarray, query_labels: np.ndarray, k: int = K) -> np.ndarray:
    return (retrieved_labels[:, :k] == query_labels[:, None]).mean(axis=1)


def recall_against(index: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.array([len(set(a) & set(b)) / len(b) for a, b in zip(index.tolist(), reference.tolist())])


def evaluate(gallery: Gallery, queries: np.ndarray, labels: np.ndarray, *, single: int = 200,
             nesting=(8, 16, 32, 64, 128, 256, 512, 1024, 2048)) -> dict:
    results, reference = {}, None
    for method in METHODS:
        if method == "hnsw" and gallery.hnsw is None:
            continue
        t0 = time.perf_counter()
        r = search(gallery, queries, K, method)
        batched_s = time.perf_counter() - t0
        times = []
        for i in range(min(single, len(queries))):
            t = time.perf_counter()
            search(gallery, queries[i:i + 1], K, method)
            times.append(time.perf_counter() - t)
        if method == "exact":
            reference = r.index
        got = gallery.labels[r.index]
        results[method] = {
            "mAP@10": float(average_precision_at_k(got, labels).mean()),
            "precision@10": float(precision_at_k(got, labels).mean()),
            "recall@10_vs_exact": float(recall_against(r.index, reference).mean()),
            "mflops_per_query": r.flops / 1e6, "stages": r.stages,
            "ms_per_query_single": 1000 * statistics.median(times),
            "ms_per_query_batched": 1000 * batched_s / len(queries)}
        print(method, json.dumps({k: v for k, v in results[method].items() if k != "stages"}), flush=True)
    knn = {str(m): float((knn_labels(gallery, queries, m, K) == labels).mean()) for m in nesting}
    return {"methods": results, "knn_top1": knn}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    for method, r in report["methods"].items():
        for ax, key in zip(axes, ("mAP@10", "recall@10_vs_exact")):
            ax.plot(r["mflops_per_query"], r[key], "o", ms=8, label=method)
            ax.annotate(method, (r["mflops_per_query"], r[key]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for ax, key in zip(axes, ("mAP@10 (paper's definition)", "recall@10 against exact 2048-d")):
        ax.set_xscale("log")
        ax.set_xlabel("MFLOPs per query (log)")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{report['gallery']['n']:,}-item gallery ({report['gallery']['spec']}), "
                 f"{report['queries']['n']:,} queries ({report['queries']['spec']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gallery", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--queries", required=True, help="a data spec never in the gallery")
    p.add_argument("--limit", type=int, default=None, help="the first N query images")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    p.add_argument("--out", required=True, help="JSON report; the plot goes beside it (.png)")
    args = p.parse_args(argv)
    gallery = Gallery.open(args.gallery, checkpoint_sha256=file_sha256(args.checkpoint))
    if gallery.meta["spec"] == args.queries:
        p.error(f"the queries ({args.queries}) must come from another split than the gallery's")
    queries, labels = embed(args.checkpoint, args.queries, limit=args.limit)
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python retrieval/evaluate.py " + " ".join(argv or sys.argv[1:]),
              "gallery": {k: gallery.meta[k] for k in ("spec", "limit", "n", "checkpoint", "numerics", "hnsw")},
              "queries": {"spec": args.queries, "n": len(queries)}, "k": K,
              **evaluate(gallery, queries, labels, single=args.single)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return report


if __name__ == "__main__":
    main()
