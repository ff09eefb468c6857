"""Nearest-neighbour search over a gallery: exact, MRL funnels, and FAISS HNSW.

A funnel is a list of stages (dim, keep): the first searches the gallery's flat index at a small
prefix for ``keep`` candidates; each later stage rescores the survivors at a larger prefix and
keeps the best ``keep``; the last keeps the k asked for. Scores are cosine similarities of
separately normalised prefixes.

    exact    the whole gallery at 2048 dims (the reference)
    rerank   shortlist 200 at 32 dims, rerank at 2048: the default, chosen on holdout queries
             (docs/retrieval.md): the cheapest single-stage funnel there with recall@10 >= 0.97
    rerank16 shortlist 200 at 16 dims, rerank at 2048 (the MRL paper's adaptive retrieval)
    funnel   8 -> 16 -> 32 -> 64 -> 128 -> 2048 keeping 800, 400, 200, 50, 10 (the paper's funnel)
    hnsw     FAISS HNSW (M=32) at 2048 dims

FLOPs per query count the multiply-adds of the similarity scores (2 per dim per item scored):
2 * m * N for a flat stage, 2 * m * candidates for a rescoring stage, and 2 * 2048 * (distances
computed) for HNSW, read from FAISS's own counter.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from handler.gallery import EMBED_DIM, Gallery, normalize, prefix

FUNNELS: dict[str, tuple[tuple[int, int], ...]] = {
    "rerank": ((32, 200), (EMBED_DIM, 10)),
    "rerank16": ((16, 200), (EMBED_DIM, 10)),
    "funnel": ((8, 800), (16, 400), (32, 200), (64, 50), (128, 10), (EMBED_DIM, 10)),
}
METHODS = ("exact", *FUNNELS, "hnsw")
RESCORE_FLOATS = 1 << 20   # candidate floats a rescoring stage holds at once (4 MiB: stays in cache)


@dataclass
class Result:
    index: np.ndarray       # (Q, k) positions in the gallery, best first
    score: np.ndarray       # (Q, k) cosine similarity at the last stage's dims
    stages: list[dict]      # per stage: dim, candidates scored per query, kept
    flops: float            # per query


def funnel_stages(name_or_stages, k: int, n: int, start_dims) -> tuple[tuple[int, int], ...]:
    """Validate a funnel for a k-NN query over ``n`` items whose shortlist index exists at the
    prefix sizes ``start_dims``: named or explicit stages, the last one keeping k."""
    named = isinstance(name_or_stages, str)
    stages = FUNNELS[name_or_stages] if named else tuple(name_or_stages)
    if not stages:
        raise ValueError("a funnel needs at least one stage")
    if named:  # a named funnel serves any k: no stage keeps fewer than the k asked for
        stages = tuple((d, max(n, k)) for d, n in stages)
    stages = stages[:-1] + ((stages[-1][0], k),)
    dims = [d for d, _ in stages]
    keeps = [keep for _, keep in stages]
    if dims[0] not in start_dims:
        raise ValueError(f"a funnel starts at a prefix with an index: {sorted(start_dims)}, not {dims[0]}")
    if dims != sorted(set(dims)) or dims[-1] > EMBED_DIM:
        raise ValueError(f"funnel dims must increase up to {EMBED_DIM}, got {dims}")
    if any(b > a for a, b in zip(keeps, keeps[1:])):
        raise ValueError(f"funnel shortlists cannot grow, got {keeps} (the last is k={k})")
    clamped, most = [], n  # a small gallery: no stage keeps more than it was given
    for d, keep in stages:
        most = min(keep, most)
        clamped.append((d, most))
    return tuple(clamped)


def search(gallery: Gallery, queries: np.ndarray, k: int, method: str = "rerank", *,
           stages=None, ef_search: int = 64) -> Result:
    """The k nearest gallery items of each (Q, 2048) query embedding."""
    if not 1 <= k <= len(gallery):
        raise ValueError(f"k must be in 1..{len(gallery)} (the gallery size), got {k}")
    bad = np.flatnonzero(~np.isfinite(queries).all(axis=1))
    if len(bad):  # FAISS would answer index -1: the last item, silently
        raise ValueError(f"query {bad[0]} holds NaN or infinite values")
    q = normalize(queries)
    n = len(gallery)
    if method == "exact":   # FAISS brute force where the gallery has a 2048-d flat index in memory
        score, index = (gallery.flat[EMBED_DIM].search(q, k) if EMBED_DIM in gallery.flat
                        else exact_topk(gallery, q, k, EMBED_DIM))
        return Result(index, score, [{"dim": EMBED_DIM, "candidates": n, "kept": k}], 2.0 * EMBED_DIM * n)
    if method == "hnsw":
        import faiss
        if gallery.hnsw is None:
            raise ValueError(f"gallery {gallery.folder} has no HNSW index")
        gallery.hnsw.hnsw.efSearch = max(ef_search, k)
        faiss.cvar.hnsw_stats.reset()
        score, index = gallery.hnsw.search(q, k)
        ndis = faiss.cvar.hnsw_stats.ndis / len(q)
        return Result(index, score, [{"dim": EMBED_DIM, "candidates": ndis, "kept": k}], 2.0 * EMBED_DIM * ndis)
    if method not in FUNNELS and stages is None:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    plan = funnel_stages(stages if stages is not None else method, k, n, gallery.flat)
    d0, k0 = plan[0]
    score, index = gallery.flat[d0].search(prefix(q, d0), k0)
    info, flops = [{"dim": d0, "candidates": n, "kept": k0}], 2.0 * d0 * n
    for dim, keep in plan[1:]:
        s, qd = np.empty(index.shape, np.float32), prefix(q, dim)
        step = max(1, RESCORE_FLOATS // (index.shape[1] * dim))        # queries per slice: bounded memory
        for lo in range(0, len(q), step):
            s[lo:lo + step] = gallery.cosine(index[lo:lo + step], qd[lo:lo + step])
        order = np.argsort(-s, axis=1, kind="stable")[:, :keep]
        info.append({"dim": dim, "candidates": index.shape[1], "kept": keep})
        flops += 2.0 * dim * index.shape[1]
        index, score = np.take_along_axis(index, order, 1), np.take_along_axis(s, order, 1)
    return Result(index, score, info, flops)


def exact_topk(gallery: Gallery, q: np.ndarray, k: int, m: int, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over the whole gallery at prefix m: (scores, indices), each (Q, k)."""
    qm = torch.from_numpy(prefix(q, m))
    best_s = torch.full((len(q), 0), -np.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.int64)
    for lo in range(0, len(gallery), chunk):
        block = torch.from_numpy(np.array(gallery.vectors[lo:lo + chunk, :m])).float()  # F16C, not numpy's
        s = (qm @ block.T) / torch.linalg.vector_norm(block, dim=1).clamp_min(1e-12)
        s_all, i_all = torch.cat([best_s, s], 1), torch.cat([best_i, torch.arange(lo, lo + len(block)).expand(len(q), -1)], 1)
        top = torch.topk(s_all, min(k, s_all.shape[1]), dim=1)
        best_s, best_i = top.values, torch.gather(i_all, 1, top.indices)
    return best_s.numpy(), best_i.numpy()


def knn_labels(gallery: Gallery, queries: np.ndarray, m: int, k: int = 10) -> np.ndarray:
    """k-NN classification at prefix m: the majority label of the k nearest (exact at m), ties to
    the label of the nearer neighbour."""
    _, index = exact_topk(gallery, normalize(queries), k, m)
    labels = gallery.labels[index]                                        # (Q, k)
    out = np.empty(len(labels), dtype=np.int64)
    for i, row in enumerate(labels):
        values, counts = np.unique(row, return_counts=True)
        tied = set(values[counts == counts.max()].tolist())
        out[i] = next(v for v in row if v in tied)                       # the nearest of the tied
    return out
