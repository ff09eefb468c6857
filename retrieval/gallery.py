"""A gallery: the MRL embeddings of a data set, stored once, with a shortlist index per prefix size.

    DIR/meta.json          format, checkpoint sha256, spec, n, numerics, graph, the indexed sizes
    DIR/vectors.f16        (N, 2048) float16, memory-mapped: each row L2-normalised at 2048 dims
    DIR/labels.npy         (N,) class index of each item
    DIR/ids.npy            (N,) item id (the item's index in its data spec)
    DIR/flat-{m}.faiss     exact inner-product index over the L2-normalised m-dim prefixes
    DIR/hnsw-2048.faiss    FAISS HNSW over the 2048-d vectors (what a user would pick instead)

Every prefix is normalised on its own (the MRL paper does the same): the direction of x[:m] does
not depend on how x was scaled, so rows stored unit-length at 2048 give every prefix by slicing
and renormalising. Scores are cosine similarities.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT = "mrl-serve-gallery/1"
EMBED_DIM = 2048
SHORTLIST_DIMS = (8, 16, 32, 64)   # prefix sizes with a flat index: where funnels start
HNSW_M = 32                        # neighbours per node (the paper's HNSW-32)


def normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def prefix(x: np.ndarray, m: int) -> np.ndarray:
    """The first m dims of each row, renormalised."""
    return np.ascontiguousarray(normalize(np.asarray(x)[..., :m]))


@dataclass
class Gallery:
    folder: Path
    vectors: np.ndarray            # (N, 2048) float16 memmap, unit rows
    labels: np.ndarray
    ids: np.ndarray
    meta: dict
    flat: dict[int, object] = field(default_factory=dict)   # m -> faiss.IndexFlatIP
    hnsw: object | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def open(cls, folder: str | Path, *, checkpoint_sha256: str | None = None, hnsw: bool = True) -> "Gallery":
        """Load a gallery; refuse one built from another checkpoint, naming both. ``hnsw`` False
        leaves the HNSW index on disk (it holds a float32 copy of every vector)."""
        import faiss

        folder = Path(folder)
        meta = read_meta(folder, checkpoint_sha256)
        n = meta["n"]
        vectors = np.memmap(folder / "vectors.f16", dtype=np.float16, mode="r", shape=(n, EMBED_DIM))
        flat = {m: faiss.read_index(str(folder / f"flat-{m}.faiss")) for m in meta["shortlist_dims"]}
        index = faiss.read_index(str(folder / f"hnsw-{EMBED_DIM}.faiss")) if hnsw and meta.get("hnsw") else None
        return cls(folder, vectors, np.load(folder / "labels.npy"), np.load(folder / "ids.npy"), meta, flat, index)

    def subset(self, n: int) -> "Gallery":
        """The first n items as a gallery of their own (flat indexes copied in memory, no HNSW):
        the same spec at a smaller size, for cost curves."""
        import faiss

        if n >= len(self):
            return self
        flat = {}
        for m, index in self.flat.items():
            flat[m] = faiss.IndexFlatIP(m)
            flat[m].add(index.reconstruct_n(0, n))
        return Gallery(self.folder, self.vectors[:n], self.labels[:n], self.ids[:n], {**self.meta, "n": n}, flat)

    def add_exact_index(self) -> None:
        """A flat index at 2048 dims in memory (float32, 8 KiB an item): exact search as a user
        would run it (FAISS brute force), the fair reference to time a funnel against."""
        import faiss

        if EMBED_DIM not in self.flat:
            index = faiss.IndexFlatIP(EMBED_DIM)
            for lo in range(0, len(self), 16384):
                index.add(normalize(self.vectors[lo:lo + 16384]))
            self.flat[EMBED_DIM] = index

    def rows(self, idx: np.ndarray, m: int) -> np.ndarray:
        """Renormalised m-dim prefixes of the items ``idx`` (any shape), as float32 (..., m)."""
        import torch  # converts float16 with F16C, several times faster than numpy

        flat = np.asarray(idx).reshape(-1)
        rows = torch.from_numpy(self.vectors[flat, :m] if m < EMBED_DIM else self.vectors[flat]).float()
        return torch.nn.functional.normalize(rows, dim=-1, eps=1e-12).numpy().reshape(*np.shape(idx), m)

    def cosine(self, idx: np.ndarray, q: np.ndarray) -> np.ndarray:
        """(Q, c) cosine similarities of the items ``idx`` (Q, c) with unit queries ``q`` (Q, m) at
        prefix m: the dot product over the row's norm, without normalising a copy of the rows."""
        import torch

        n_q, c = idx.shape
        m = q.shape[1]
        flat = np.asarray(idx).reshape(-1)
        rows = torch.from_numpy(self.vectors[flat, :m] if m < EMBED_DIM else self.vectors[flat]).float()
        rows = rows.view(n_q, c, m)
        dots = torch.bmm(rows, torch.from_numpy(q)[:, :, None]).squeeze(-1)
        return (dots / torch.linalg.vector_norm(rows, dim=-1).clamp_min(1e-12)).numpy()


def read_meta(folder: str | Path, checkpoint_sha256: str | None = None) -> dict:
    """A gallery's meta.json, checked for its format and (if given) the checkpoint it came from."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: gallery format must be {FORMAT!r}, got {meta.get('format')!r}")
    if checkpoint_sha256 is not None and meta["checkpoint_sha256"] != checkpoint_sha256:
        raise ValueError(f"gallery {folder} was built from checkpoint sha256 {meta['checkpoint_sha256']} "
                         f"but the model is sha256 {checkpoint_sha256}; rebuild it with "
                         "retrieval/build_index.py")
    return meta


def build(folder: str | Path, embeddings: np.ndarray, labels: Sequence[int], ids: Sequence[int], meta: dict, *,
          shortlist_dims: Sequence[int] = SHORTLIST_DIMS, hnsw_m: int | None = HNSW_M,
          ef_construction: int = 40, progress=None) -> Gallery:
    """Write a gallery from (N, 2048) embeddings. ``meta`` names the checkpoint (sha256) and spec."""
    import faiss

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(embeddings)
    if embeddings.shape != (n, EMBED_DIM):
        raise ValueError(f"embeddings must be (N, {EMBED_DIM}), got {embeddings.shape}")
    if any(m not in range(1, EMBED_DIM + 1) for m in shortlist_dims):
        raise ValueError(f"shortlist dims must lie in 1..{EMBED_DIM}, got {list(shortlist_dims)}")
    vec = np.memmap(folder / "vectors.f16", dtype=np.float16, mode="w+", shape=(n, EMBED_DIM))
    for lo in range(0, n, 8192):
        vec[lo:lo + 8192] = normalize(embeddings[lo:lo + 8192]).astype(np.float16)
    vec.flush()
    np.save(folder / "labels.npy", np.asarray(labels, dtype=np.int64))
    np.save(folder / "ids.npy", np.asarray(ids, dtype=np.int64))
    stored = np.asarray(vec)
    for m in shortlist_dims:
        index = faiss.IndexFlatIP(m)
        for lo in range(0, n, 8192):
            index.add(prefix(stored[lo:lo + 8192], m))
        faiss.write_index(index, str(folder / f"flat-{m}.faiss"))
    if hnsw_m:
        index = faiss.IndexHNSWFlat(EMBED_DIM, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        for lo in range(0, n, 4096):
            index.add(normalize(stored[lo:lo + 4096]))
            if progress:
                progress(min(lo + 4096, n))
        faiss.write_index(index, str(folder / f"hnsw-{EMBED_DIM}.faiss"))
    doc = {"format": FORMAT, **meta, "n": n, "dim": EMBED_DIM, "shortlist_dims": list(shortlist_dims),
           "hnsw": {"M": hnsw_m, "efConstruction": ef_construction} if hnsw_m else None,
           "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (folder / "meta.json").write_text(json.dumps(doc, indent=2) + "\n")
    return Gallery.open(folder)
