"""The MRL funnel on Qdrant: a gallery as one collection with a named vector per stage, searched by
one Query API call whose nested ``prefetch`` runs the shortlist and the query reranks it.

    python -m retrieval.qdrant upload --gallery galleries/han-100k --url http://qdrant:6333 [--funnel rerank]
    python -m retrieval.qdrant check  --gallery galleries/han-100k --checkpoint CKPT --queries han1000:test
    python -m retrieval.qdrant check  ... --url http://qdrant:6333 --collection han-100k   # a served one, read only

Each point is one gallery item: its id is the item's position in the gallery, its payload the
label and item id, and its vectors the separately normalised prefixes the funnel uses, named
``d{m}`` (the default funnel needs two: ``d32`` and ``d2048``). Qdrant scores them by cosine, as
the in-process search does, so a funnel asked of Qdrant and of handler.search gives the same
neighbours; ``check`` compares the two on real queries (qdrant-client's local mode by default, or a
server with --url). ``check`` never writes to a collection it did not make: it uploads the gallery
(or its first ``--items``) into a scratch collection of its own and deletes it afterwards, or, given
``--collection``, only reads that one. ``upload`` (re)creates the collection it names. A server's
API key comes from ``--api-key`` or the ``QDRANT_API_KEY`` environment variable. Needs ``pip
install qdrant-client`` (the tests pin it).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Sequence

import numpy as np

from handler.gallery import EMBED_DIM, Gallery, normalize, prefix
from handler.search import FUNNELS, funnel_stages

BATCH = 2048   # points per upsert


def vector_name(dim: int) -> str:
    return f"d{dim}"


def funnel_dims(funnels: Sequence[str] = ("rerank",)) -> list[int]:
    """The prefix sizes a collection needs to run these named funnels."""
    return sorted({d for name in funnels for d, _ in FUNNELS[name]})


def upload(client, collection: str, gallery: Gallery, dims: Sequence[int] = funnel_dims(), *,
           progress=None) -> int:
    """(Re)create ``collection`` holding the gallery's normalised prefixes at ``dims``; each point's
    payload names the checkpoint, so ``search`` can refuse a collection built from another one.
    Returns the number of points written."""
    from qdrant_client import models

    dims = sorted(set(int(d) for d in dims))
    if not dims or dims[-1] > EMBED_DIM or dims[0] < 1:
        raise ValueError(f"prefix sizes must lie in 1..{EMBED_DIM}, got {dims}")
    if client.collection_exists(collection):
        client.delete_collection(collection)
    client.create_collection(collection, vectors_config={
        vector_name(d): models.VectorParams(size=d, distance=models.Distance.COSINE) for d in dims})
    n = len(gallery)
    sha = gallery.meta["checkpoint_sha256"]
    for lo in range(0, n, BATCH):
        hi = min(lo + BATCH, n)
        rows = np.asarray(gallery.vectors[lo:hi], dtype=np.float32)
        client.upsert(collection, wait=True, points=models.Batch(
            ids=list(range(lo, hi)),
            vectors={vector_name(d): prefix(rows, d).tolist() for d in dims},
            payloads=[{"label": int(gallery.labels[i]), "item_id": int(gallery.ids[i]), "checkpoint_sha256": sha}
                      for i in range(lo, hi)]))
        if progress:
            progress(hi)
    return n


def describe(client, collection: str) -> dict:
    """A collection's size, the prefix sizes it holds and the checkpoint its points came from."""
    info = client.get_collection(collection)
    names = info.config.params.vectors
    dims = sorted(int(name[1:]) for name in names)
    first = client.retrieve(collection, [0], with_payload=True)
    return {"n": client.count(collection, exact=True).count, "dims": dims,
            "checkpoint_sha256": first[0].payload.get("checkpoint_sha256") if first else None}


def search(client, collection: str, queries: np.ndarray, k: int,
           funnel: str | Sequence[tuple[int, int]] = "rerank", *,
           checkpoint_sha256: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The funnel as one Query API call per query (all sent in one batch request): (positions,
    scores), each (Q, k), best first. The stages are the ones handler.search plans for a gallery
    of the collection's size. Refuses a collection from another checkpoint when given the hash."""
    from qdrant_client import models

    about = describe(client, collection)
    if checkpoint_sha256 is not None and about["checkpoint_sha256"] != checkpoint_sha256:
        raise ValueError(f"collection {collection} holds embeddings of checkpoint sha256 "
                         f"{about['checkpoint_sha256']} but the model is sha256 {checkpoint_sha256}")
    plan = funnel_stages(funnel, k, about["n"], about["dims"])
    missing = sorted({d for d, _ in plan} - set(about["dims"]))
    if missing:
        raise ValueError(f"collection {collection} has no vectors at {missing} dims for this funnel; "
                         f"upload it with them")
    requests = []
    for row in normalize(queries):
        inner = None
        for dim, keep in plan[:-1]:
            inner = models.Prefetch(query=prefix(row, dim).tolist(), using=vector_name(dim), limit=keep,
                                    prefetch=inner)
        last, keep = plan[-1]
        requests.append(models.QueryRequest(query=prefix(row, last).tolist(), using=vector_name(last),
                                            prefetch=inner, limit=keep, with_payload=False))
    answers = client.query_batch_points(collection, requests=requests)
    index = np.array([[p.id for p in a.points] for a in answers], dtype=np.int64)
    score = np.array([[p.score for p in a.points] for a in answers], dtype=np.float32)
    return index, score


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """How two (Q, k) neighbour lists compare: identical lists, and the same sets in any order."""
    same_list = (ours == theirs).all(axis=1)
    same_set = np.array([set(a) == set(b) for a, b in zip(ours.tolist(), theirs.tolist())])
    return {"compared": len(ours), "identical": int(same_list.sum()), "same_set": int(same_set.sum()),
            "differing_queries": np.flatnonzero(~same_set).tolist()}


def connect(url: str | None, path: str | None = None, api_key: str | None = None):
    """A client of the server at ``url`` (with ``api_key``), else qdrant-client's local mode on
    disk at ``path`` or in memory."""
    from qdrant_client import QdrantClient

    if url:
        return QdrantClient(url=url, api_key=api_key or None, timeout=120)
    return QdrantClient(path=path) if path else QdrantClient(":memory:")


def scratch_name(client, base: str) -> str:
    """A collection name for ``check`` alone: never one that exists (a served collection)."""
    while True:
        name = f"{base}-check-{secrets.token_hex(4)}"
        if not client.collection_exists(name):
            return name


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("upload", "check"):
        s = sub.add_parser(name)
        s.add_argument("--gallery", required=True)
        s.add_argument("--url", default=None, help="a Qdrant server; default: qdrant-client's local mode")
        s.add_argument("--path", default=None, help="local mode on disk instead of in memory")
        s.add_argument("--api-key", default=os.environ.get("QDRANT_API_KEY"),
                       help="the server's API key (default: $QDRANT_API_KEY)")
        s.add_argument("--funnel", default="rerank", choices=sorted(FUNNELS))
    sub.choices["upload"].add_argument("--collection", default=None,
                                       help="default: the gallery folder's name; (re)created")
    sub.choices["check"].add_argument("--collection", default=None,
                                      help="an existing collection of the whole gallery to compare, read "
                                           "only; default: a scratch collection, uploaded and deleted")
    c = sub.choices["check"]
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--queries", required=True, help="a data spec never in the gallery")
    c.add_argument("--limit", type=int, default=200, help="the first N query images")
    c.add_argument("-k", type=int, default=10)
    c.add_argument("--out", default=None, help="write the comparison as JSON here")
    c.add_argument("--items", type=int, default=None,
                   help="the gallery's first N items only (local mode filters in Python: about 5 s a "
                        "query at 100,000 items on 2 cores)")
    args = p.parse_args(argv)
    if args.cmd == "check" and args.collection and args.items:
        raise SystemExit("check --collection compares a whole collection: drop --items")

    from handler.checkpoint import file_sha256
    sha = file_sha256(args.checkpoint) if args.cmd == "check" else None
    gallery = Gallery.open(args.gallery, checkpoint_sha256=sha, hnsw=False)
    if getattr(args, "items", None):
        gallery = gallery.subset(args.items)
    client = connect(args.url, args.path, args.api_key)
    try:
        if args.cmd == "upload":
            collection = args.collection or gallery.folder.name
            _upload_with_bar(client, collection, gallery, args.funnel)
            return {"collection": collection, "points": len(gallery)}
        if args.collection:
            return _check(client, args.collection, gallery, sha, args, argv)
        collection = scratch_name(client, gallery.folder.name)
        try:
            _upload_with_bar(client, collection, gallery, args.funnel)
            return _check(client, collection, gallery, sha, args, argv)
        finally:
            client.delete_collection(collection)
    finally:
        client.close()


def _upload_with_bar(client, collection: str, gallery: Gallery, funnel: str) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(gallery), desc=f"upload to {collection}", unit="item", file=sys.stderr)
    upload(client, collection, gallery, funnel_dims([funnel]), progress=lambda done: bar.update(done - bar.n))
    bar.close()


def _check(client, collection: str, gallery: Gallery, sha: str, args, argv) -> dict:
    from handler import search as local
    from retrieval.build_index import embed

    n = describe(client, collection)["n"]
    if n != len(gallery):
        raise SystemExit(f"collection {collection} holds {n} points, the gallery {len(gallery)} items")
    queries, _ = embed(args.checkpoint, args.queries, limit=args.limit)
    ours = local.search(gallery, queries, args.k, args.funnel)
    theirs, _ = search(client, collection, queries, args.k, args.funnel, checkpoint_sha256=sha)
    words = list(argv or sys.argv[1:])
    for i, word in enumerate(words):  # never write the key into a report
        if word == "--api-key" and i + 1 < len(words):
            words[i + 1] = "***"
        elif word.startswith("--api-key="):
            words[i] = "--api-key=***"
    report = {"command": "python -m retrieval.qdrant " + " ".join(words),
              "gallery": str(gallery.folder), "items": len(gallery), "queries": args.queries, "k": args.k,
              "funnel": args.funnel, "stages": ours.stages, "backend": args.url or "qdrant-client local mode",
              "collection": collection if args.collection else "scratch (deleted)",
              **agreement(ours.index, theirs)}
    print(json.dumps(report))
    if args.out:
        from pathlib import Path
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
