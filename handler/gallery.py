"""A gallery: the MRL embeddings of a data set, stored once, with a shortlist index per prefix size.

    DIR/meta.json              format, checkpoint sha256, spec, n, numerics, graph, the indexed
                               sizes, and ``version``: the folder that holds this build's data
    DIR/VERSION/vectors.f16    (N, 2048) float16, memory-mapped: each row L2-normalised at 2048 dims
    DIR/VERSION/labels.npy     (N,) class index of each item
    DIR/VERSION/ids.npy        (N,) item id (the item's index in its data spec)
    DIR/VERSION/flat-{m}.faiss exact inner-product index over the L2-normalised m-dim prefixes
    DIR/VERSION/hnsw-2048.faiss FAISS HNSW over the 2048-d vectors (what a user would pick instead)
    DIR/VERSION/meta.json      the same meta, so that a version describes itself

A rebuild into DIR never rewrites a file that a reader may have mapped: it writes a new VERSION
folder, then replaces DIR/meta.json atomically (``os.replace``), then unlinks the older versions
(a reader's memory map keeps an unlinked file alive). A reader sees the old gallery or the new one
whole; ``Gallery.changed`` says when DIR/meta.json was replaced. Galleries built before versions
(the data files straight in DIR, no ``version`` in meta.json) still open.

Every prefix is normalised on its own (the MRL paper does the same): the direction of x[:m] does
not depend on how x was scaled, so rows stored unit-length at 2048 give every prefix by slicing
and renormalising. Scores are cosine similarities.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "mrl-serve-gallery/1"
EMBED_DIM = 2048
DATA_FILES = ("vectors.f16", "labels.npy", "ids.npy")  # beside flat-{m}.faiss and hnsw-2048.faiss
VERSION_NAME = re.compile(r"v-[0-9A-Za-z_.-]+")


def normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def prefix(x: np.ndarray, m: int) -> np.ndarray:
    """The first m dims of each row, renormalised."""
    return np.ascontiguousarray(normalize(np.asarray(x)[..., :m]))


@dataclass
class Gallery:
    folder: Path                   # the folder named by the user (and served): DIR
    vectors: np.ndarray            # (N, 2048) float16 memmap, unit rows
    labels: np.ndarray
    ids: np.ndarray
    meta: dict
    flat: dict[int, object] = field(default_factory=dict)   # m -> faiss.IndexFlatIP
    hnsw: object | None = None
    path: Path | None = None       # the folder holding this build's data: DIR/VERSION (or DIR)
    stamp: tuple | None = None     # DIR/meta.json's identity when it was read

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def open(cls, folder: str | Path, *, checkpoint_sha256: str | None = None, hnsw: bool = True) -> Gallery:
        """Load a gallery; refuse one built from another checkpoint, naming both, or one whose
        parts disagree on the item count. ``hnsw`` False leaves the HNSW index on disk (it holds
        a float32 copy of every vector)."""
        folder = Path(folder)
        for attempt in range(3):
            meta, stamp = _read_meta(folder, checkpoint_sha256)
            try:
                return cls._load(folder, meta, stamp, hnsw)
            except FileNotFoundError:  # a rebuild removed this version while we read it: read again
                if attempt == 2 or _stamp(folder) == stamp:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _load(cls, folder: Path, meta: dict, stamp: tuple, hnsw: bool) -> Gallery:
        import faiss

        path = _data_folder(folder, meta)
        n = meta["n"]
        size = (path / "vectors.f16").stat().st_size
        if size != n * EMBED_DIM * 2:
            raise ValueError(f"{path}: vectors.f16 holds {size / (EMBED_DIM * 2):g} items but meta.json says {n}")
        vectors = np.memmap(path / "vectors.f16", dtype=np.float16, mode="r", shape=(n, EMBED_DIM))
        labels, ids = np.load(path / "labels.npy"), np.load(path / "ids.npy")
        flat = {m: faiss.read_index(str(path / f"flat-{m}.faiss")) for m in meta["shortlist_dims"]}
        index = faiss.read_index(str(path / f"hnsw-{EMBED_DIM}.faiss")) if hnsw and meta.get("hnsw") else None
        counts = {"labels.npy": len(labels), "ids.npy": len(ids),
                  **{f"flat-{m}.faiss": f.ntotal for m, f in flat.items()},
                  **({f"hnsw-{EMBED_DIM}.faiss": index.ntotal} if index is not None else {})}
        for name, count in counts.items():
            if count != n:
                raise ValueError(f"{path}: {name} holds {count} items but meta.json says {n}; "
                                 "rebuild the gallery with retrieval/build_index.py")
        return cls(folder, vectors, labels, ids, meta, flat, index, path, stamp)

    def disk_stamp(self) -> tuple | None:
        """The identity of DIR/meta.json now (None if it is missing): a rebuild replaces the file."""
        return _stamp(self.folder)

    def changed(self) -> bool:
        """True once DIR/meta.json was replaced (a rebuild) since this gallery was read."""
        now = self.disk_stamp()
        return now is not None and now != self.stamp

    def subset(self, n: int) -> Gallery:
        """The first n items as a gallery of their own (flat indexes copied in memory, no HNSW):
        the same spec at a smaller size, for cost curves."""
        import faiss

        if n >= len(self):
            return self
        flat = {}
        for m, index in self.flat.items():
            flat[m] = faiss.IndexFlatIP(m)
            flat[m].add(index.reconstruct_n(0, n))
        return Gallery(self.folder, self.vectors[:n], self.labels[:n], self.ids[:n], {**self.meta, "n": n}, flat,
                       path=self.path, stamp=self.stamp)

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
    return _read_meta(Path(folder), checkpoint_sha256)[0]


def _read_meta(folder: Path, checkpoint_sha256: str | None) -> tuple[dict, tuple]:
    """meta.json and the identity of the very file read (a rebuild replaces it, never rewrites it)."""
    with open(folder / "meta.json", "rb") as f:
        st = os.fstat(f.fileno())
        meta = json.loads(f.read())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{folder}: gallery format must be {FORMAT!r}, got {meta.get('format')!r}")
    if checkpoint_sha256 is not None and meta["checkpoint_sha256"] != checkpoint_sha256:
        raise ValueError(f"gallery {folder} was built from checkpoint sha256 {meta['checkpoint_sha256']} "
                         f"but the model is sha256 {checkpoint_sha256}; rebuild it with "
                         "retrieval/build_index.py")
    return meta, (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _stamp(folder: Path) -> tuple | None:
    try:
        st = os.stat(folder / "meta.json")
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _data_folder(folder: Path, meta: dict) -> Path:
    version = meta.get("version")
    if version is None:  # the layout before versions: the data files beside meta.json
        return folder
    if not isinstance(version, str) or not VERSION_NAME.fullmatch(version):
        raise ValueError(f"{folder}/meta.json: version must be a folder name like 'v-...', got {version!r}")
    return folder / version

