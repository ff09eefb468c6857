"""Build a retrieval gallery from a checkpoint and a data spec, embedding through the serving Engine.

    python retrieval/build_index.py --checkpoint model_store/han1000/mrl_resnet50_fp16.pt \\
        --data han1000:train --limit 100000 --out galleries/han1000-100k

Images go through the server's preprocessing and Engine with the numerics a worker serves on this
CPU, so gallery and query embeddings come from the same numbers. The gallery records the
checkpoint's sha256 and the spec; the server refuses a gallery built from another checkpoint.
``--out`` may be the folder a server is serving: the new build lands in a version folder of its
own and replaces the old one atomically, and the workers serve it from their next batch
(retrieval/gallery.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibration.outputs import forward_spec
from handler.checkpoint import file_sha256, read_checkpoint
from handler.numerics import resolve_numerics
from retrieval.gallery import SHORTLIST_DIMS, build


def embed(checkpoint: str | Path, spec: str, *, limit: int | None = None, graph: str = "jit",
          progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2048) float32 embeddings and (N,) labels of a spec's first ``limit`` images, written
    into one array as they come (a list of batches and a concatenation would hold them twice:
    16 GB at a million items, which the OOM killer ended on this 23 GB machine)."""
    out, done, data = None, 0, None
    for _probs, emb, data in forward_spec(checkpoint, spec, graph=graph, limit=limit, progress=progress):
        if out is None:
            out = np.empty((len(data), emb.shape[1]), dtype=np.float32)
        out[done:done + len(emb)] = emb.float().numpy()
        done += len(emb)
    return out[:done], np.asarray(data.labels, dtype=np.int64)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="the gallery's images: a data spec or a folder")
    p.add_argument("--limit", type=int, default=None, help="the spec's first N images")
    p.add_argument("--out", required=True)
    p.add_argument("--shortlist-dims", default=",".join(map(str, SHORTLIST_DIMS)),
                   help="prefix sizes that get a flat index (where funnels may start)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node; 0: no HNSW index")
    p.add_argument("--graph", default="jit", choices=("eager", "jit", "compile"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    emb, labels = embed(args.checkpoint, args.data, limit=args.limit, graph=args.graph)
    t1 = time.perf_counter()
    card, _ = read_checkpoint(args.checkpoint)
    meta = {"checkpoint": Path(args.checkpoint).name, "checkpoint_sha256": file_sha256(args.checkpoint),
            "spec": args.data, "limit": args.limit, "numerics": resolve_numerics(card.numerics),
            "graph": args.graph, "classes": len(card.classes)}
    bar = tqdm(total=len(emb), desc="HNSW index", unit="item", file=sys.stderr, disable=not args.hnsw_m)
    gallery = build(args.out, emb, labels, np.arange(len(emb)), meta,
                    shortlist_dims=[int(m) for m in args.shortlist_dims.split(",")], hnsw_m=args.hnsw_m or None,
                    progress=lambda done: bar.update(done - bar.n))
    bar.close()
    print(f"wrote {args.out}: {len(gallery)} items from {args.data}, embedded in {t1 - t0:.0f} s, "
          f"indexed in {time.perf_counter() - t1:.0f} s")
    return Path(args.out)


if __name__ == "__main__":
    main()
