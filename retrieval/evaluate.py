"""Retrieval quality and cost per search method, side by side in one run.

    python retrieval/evaluate.py --gallery galleries/han-100k \\
        --checkpoint model_store/han1000/mrl_resnet50_fp16.pt --queries han1000:test --out docs/results/retrieval.json
    ... --queries han1000:holdout --limit 2000 --sweep --out F   # single-stage funnels over a grid
    ... --sizes 10000,100000,1000000 --out F                     # cost curve over the first N items

Queries come from a split that is never in the gallery (the spec must differ from the gallery's).
Per method (exact 2048-d on a FAISS flat index, each named funnel of handler/search.py, FAISS
HNSW at several efSearch values, and HNSW at the smallest efSearch reaching the default's recall):

* mAP@10 as the MRL paper's notebook computes it (RAIVNLab/MRL retrieval/compute_metrics.ipynb):
  AP@10 = (1/10) * sum of precision@i over the ranks i <= 10 that hold the query's class. Note the
  1/10: textbook AP divides by the number of relevant items retrieved (or min(10, class size)),
  which gives larger numbers; a query with no hit scores 0 either way.
* precision@10: the share of the 10 retrieved items of the query's class.
* recall@10 against exact search: the share of the exact 2048-d top 10 that the method returns
  (the notebook's recall divides hits by 1,300 ImageNet images per class instead; we do not).
* MFLOPs per query (see handler/search.py) and wall-clock per query: one query at a time
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

from handler.checkpoint import file_sha256
from handler.cpus import machine
from handler.gallery import EMBED_DIM, Gallery
from handler.search import FUNNELS, knn_labels, search
from retrieval.build_index import embed

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


DEFAULT = "rerank"                       # the funnel a neighbours request uses unless it names one
HNSW_EF = (16, 32, 64, 128, 256, 512)    # efSearch values swept to meet the funnel's recall


def timed(gallery: Gallery, queries: np.ndarray, single: int, method: str, **kw):
    """(result for all queries, batched seconds per query, median seconds of one query alone)."""
    t0 = time.perf_counter()
    r = search(gallery, queries, K, method, **kw)
    batched = (time.perf_counter() - t0) / len(queries)
    times = []
    for i in range(min(single, len(queries))):
        t = time.perf_counter()
        search(gallery, queries[i:i + 1], K, method, **kw)
        times.append(time.perf_counter() - t)
    return r, batched, statistics.median(times)


def scores(r, gallery: Gallery, labels: np.ndarray, reference: np.ndarray, batched: float, single: float) -> dict:
    got = gallery.labels[r.index]
    return {"mAP@10": float(average_precision_at_k(got, labels).mean()),
            "precision@10": float(precision_at_k(got, labels).mean()),
            "recall@10_vs_exact": float(recall_against(r.index, reference).mean()),
            "mflops_per_query": r.flops / 1e6, "stages": r.stages,
            "ms_per_query_single": 1000 * single, "ms_per_query_batched": 1000 * batched}


def exact_and_funnels(gallery: Gallery, queries: np.ndarray, labels: np.ndarray, single: int):
    """Exact search (on a FAISS flat index at 2048) and every named funnel, timed side by side:
    ({method: scores}, the exact neighbours every recall is measured against)."""
    gallery.add_exact_index()
    r, b, s1 = timed(gallery, queries, single, "exact")
    reference = r.index
    results = {"exact": scores(r, gallery, labels, reference, b, s1)}
    for method in FUNNELS:
        r, b, s1 = timed(gallery, queries, single, method)
        results[method] = scores(r, gallery, labels, reference, b, s1)
    return results, reference


def evaluate(gallery: Gallery, queries: np.ndarray, labels: np.ndarray, *, single: int = 200,
             nesting=(8, 16, 32, 64, 128, 256, 512, 1024, 2048), knn: bool = True) -> dict:
    """Every method on one gallery, side by side; exact search runs on a FAISS flat index."""
    results, reference = exact_and_funnels(gallery, queries, labels, single)
    hnsw = []
    if gallery.hnsw is not None:
        for ef in HNSW_EF:
            r, b, s1 = timed(gallery, queries, single, "hnsw", ef_search=ef)
            hnsw.append({"efSearch": ef, **scores(r, gallery, labels, reference, b, s1)})
    for name, row in [*results.items(), *((f"hnsw ef={h['efSearch']}", h) for h in hnsw)]:
        print(name, json.dumps({k: round(v, 4) for k, v in row.items() if isinstance(v, float)}), flush=True)
    out = {"methods": results, "hnsw_sweep": hnsw, "default": DEFAULT}
    d, e = results[DEFAULT], results["exact"]
    out["default_vs_exact"] = {
        "mAP@10_gap_pt": 100 * (e["mAP@10"] - d["mAP@10"]), "recall@10": d["recall@10_vs_exact"],
        "flops_ratio": e["mflops_per_query"] / d["mflops_per_query"],
        "speedup_single": e["ms_per_query_single"] / d["ms_per_query_single"],
        "speedup_batched": e["ms_per_query_batched"] / d["ms_per_query_batched"]}
    matched = next((h for h in hnsw if h["recall@10_vs_exact"] >= d["recall@10_vs_exact"]), None)
    if matched:   # HNSW at the smallest efSearch that reaches the default funnel's recall
        out["hnsw_at_equal_recall"] = {
            "efSearch": matched["efSearch"], "recall@10": matched["recall@10_vs_exact"],
            "mAP@10": matched["mAP@10"], "ms_per_query_single": matched["ms_per_query_single"],
            "default_speedup_single": matched["ms_per_query_single"] / d["ms_per_query_single"],
            "flops_ratio": matched["mflops_per_query"] / d["mflops_per_query"]}
    if knn:
        out["knn_top1"] = {str(m): float((knn_labels(gallery, queries, m, K) == labels).mean()) for m in nesting}
    return out


SWEEP = [(m, c) for m in (8, 16, 32, 64) for c in (100, 200, 400, 800)]


def sweep(gallery: Gallery, queries: np.ndarray, labels: np.ndarray, grid=SWEEP) -> list[dict]:
    """Single-stage funnels (shortlist c at m dims, rerank at 2048) over a grid, batched: how
    recall and mAP trade against FLOPs, to choose the default on queries that are not the test's."""
    gallery.add_exact_index()
    reference = search(gallery, queries, K, "exact").index
    rows = []
    for m, c in grid:
        t0 = time.perf_counter()
        r = search(gallery, queries, K, "custom", stages=((m, c), (EMBED_DIM, K)))
        row = {"dim": m, "shortlist": c, **scores(r, gallery, labels, reference, (time.perf_counter() - t0) / len(queries), float("nan"))}
        del row["ms_per_query_single"], row["stages"]
        print(f"sweep {m}->{c}", json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)
        rows.append(row)
    return rows


def cost_curve(gallery: Gallery, queries: np.ndarray, labels: np.ndarray, sizes, single: int) -> list[dict]:
    """Exact search and the funnels at the gallery's first N items for each N: how cost grows."""
    rows = []
    for n in sizes:
        sub = gallery.subset(n)
        row = {"n": len(sub), **exact_and_funnels(sub, queries, labels, single)[0]}
        print(f"n={len(sub)}", json.dumps({m: {k: round(row[m][k], 4) for k in ("mAP@10", "recall@10_vs_exact",
              "ms_per_query_single", "ms_per_query_batched")} for m in ("exact", *FUNNELS)}), flush=True)
        rows.append(row)
        del sub
    return rows


def isa(m: dict) -> str:
    """The machine line every figure carries: CPU, cores and the vector ISA that matters here."""
    flags = [f for f in ("amx", "avx512_bf16", "vnni", "avx512f", "avx2") if m.get(f)]
    return f"{m['cpu']}, {m['cores']} cores, {'+'.join(flags) or 'no AVX2'}"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report.get("cost_curve")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    if curve:
        for method in ("exact", *FUNNELS):
            for ax, key in zip(axes, ("ms_per_query_single", "ms_per_query_batched")):
                ax.plot([row["n"] for row in curve], [row[method][key] for row in curve], "o-", label=method)
        for ax, what in zip(axes, ("one query at a time (median)", "all queries in one batch")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("gallery items (log)")
            ax.set_ylabel(f"ms per query, {what}")
            ax.grid(True, alpha=0.3, which="both")
            ax.legend(fontsize=8)
    else:
        points = [(m, r) for m, r in report["methods"].items()]
        sweep = report.get("hnsw_sweep") or []
        for ax, (xkey, ykey, xlabel, ylabel) in zip(axes, (
                ("ms_per_query_single", "recall@10_vs_exact", "ms per query, one at a time (log)",
                 "recall@10 against exact 2048-d"),
                ("mflops_per_query", "mAP@10", "MFLOPs per query (log)", "mAP@10 (the paper's definition)"))):
            for method, r in points:
                ax.plot(r[xkey], r[ykey], "o", ms=8)
                ax.annotate(method, (r[xkey], r[ykey]), textcoords="offset points", xytext=(6, 4), fontsize=8)
            if sweep:
                ax.plot([h[xkey] for h in sweep], [h[ykey] for h in sweep], "s--", ms=5, color="grey",
                        label="FAISS HNSW-32 at 2048, efSearch " + "/".join(str(h["efSearch"]) for h in sweep))
                ax.legend(fontsize=8, loc="center right")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
    fig.suptitle(f"{report['gallery']['n']:,}-item gallery ({report['gallery']['spec']}), "
                 f"{report['queries']['n']:,} queries ({report['queries']['spec']}); {isa(report['machine'])}",
                 fontsize=9)
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
    p.add_argument("--sizes", default=None,
                   help="comma-separated gallery sizes: a cost curve over the gallery's first N items instead")
    p.add_argument("--sweep", action="store_true",
                   help="single-stage funnels over a grid of prefix sizes and shortlists instead (batched)")
    p.add_argument("--out", required=True, help="JSON report; the plot goes beside it (.png)")
    args = p.parse_args(argv)
    gallery = Gallery.open(args.gallery, checkpoint_sha256=file_sha256(args.checkpoint), hnsw=not args.sizes)
    if gallery.meta["spec"] == args.queries:
        p.error(f"the queries ({args.queries}) must come from another split than the gallery's")
    queries, labels = embed(args.checkpoint, args.queries, limit=args.limit)
    import faiss
    report = {"machine": machine(), "faiss": {"version": faiss.__version__, "threads": faiss.omp_get_max_threads()},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python retrieval/evaluate.py " + " ".join(argv or sys.argv[1:]),
              "gallery": {k: gallery.meta[k] for k in ("spec", "limit", "n", "checkpoint", "numerics", "hnsw")},
              "queries": {"spec": args.queries, "n": len(queries)}, "k": K}
    if args.sweep:
        report["sweep"] = sweep(gallery, queries, labels)
    elif args.sizes:
        report["cost_curve"] = cost_curve(gallery, queries, labels, [int(n) for n in args.sizes.split(",")],
                                          args.single)
    else:
        report.update(evaluate(gallery, queries, labels, single=args.single))
        print("default vs exact", json.dumps(report["default_vs_exact"]),
              "HNSW at equal recall", json.dumps(report.get("hnsw_at_equal_recall")), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.sweep:
        plot(report, out.with_suffix(".png"))
    print(f"wrote {out}" + ("" if args.sweep else f" and {out.with_suffix('.png').name}"))
    return report


if __name__ == "__main__":
    main()
