"""Building a gallery (the format and the reader are ``handler/gallery.py``, which a worker serves):
the embeddings written once, with a flat index per shortlist prefix and an HNSW index, into a new
version folder, published by one atomic replace of DIR/meta.json.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from handler.gallery import DATA_FILES, EMBED_DIM, FORMAT, VERSION_NAME, Gallery, normalize, prefix

SHORTLIST_DIMS = (8, 16, 32, 64)   # prefix sizes with a flat index: where funnels start
HNSW_M = 32                        # neighbours per node (the paper's HNSW-32)


@contextlib.contextmanager
def _build_lock(folder: Path):
    """One build at a time per gallery folder (a lock on the folder itself, released on exit or death)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build(folder: str | Path, embeddings: np.ndarray, labels: Sequence[int], ids: Sequence[int], meta: dict, *,
          shortlist_dims: Sequence[int] = SHORTLIST_DIMS, hnsw_m: int | None = HNSW_M,
          ef_construction: int = 40, progress=None) -> Gallery:
    """Write a gallery from (N, 2048) embeddings. ``meta`` names the checkpoint (sha256) and spec.

    Into a folder that already holds a gallery (one a server may be reading), the new build goes
    into a new version folder and replaces the old one atomically (see the module's docstring)."""
    folder = Path(folder)
    n = len(embeddings)
    labels, ids = np.asarray(labels, dtype=np.int64), np.asarray(ids, dtype=np.int64)
    if embeddings.shape != (n, EMBED_DIM):
        raise ValueError(f"embeddings must be (N, {EMBED_DIM}), got {embeddings.shape}")
    if labels.shape != (n,) or ids.shape != (n,):
        raise ValueError(f"need one label and one id per embedding ({n}), got {labels.shape} and {ids.shape}")
    if any(m not in range(1, EMBED_DIM + 1) for m in shortlist_dims):
        raise ValueError(f"shortlist dims must lie in 1..{EMBED_DIM}, got {list(shortlist_dims)}")
    folder.mkdir(parents=True, exist_ok=True)
    with _build_lock(folder):
        now = dt.datetime.now(dt.timezone.utc)
        version = f"v-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        work = folder / f".building-{version}"
        try:
            work.mkdir()
            doc = _write_data(work, embeddings, labels, ids, shortlist_dims, hnsw_m, ef_construction, progress)
            doc = {"format": FORMAT, **meta, **doc, "version": version,
                   "created": now.isoformat(timespec="seconds")}
            _write_atomic(work / "meta.json", json.dumps(doc, indent=2) + "\n")
            os.rename(work, folder / version)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _fsync(folder)
        _write_atomic(folder / "meta.json", json.dumps(doc, indent=2) + "\n")  # the switch
        _remove_all_but(folder, version)
    return Gallery.open(folder)


def _write_data(work: Path, embeddings, labels, ids, shortlist_dims, hnsw_m, ef_construction, progress) -> dict:
    import faiss

    n = len(embeddings)
    vec = np.memmap(_reserved(work / "vectors.f16", n * EMBED_DIM * 2), dtype=np.float16, mode="r+",
                    shape=(n, EMBED_DIM))
    for lo in range(0, n, 8192):
        vec[lo:lo + 8192] = normalize(embeddings[lo:lo + 8192]).astype(np.float16)
    vec.flush()
    np.save(work / "labels.npy", labels)
    np.save(work / "ids.npy", ids)
    stored = np.asarray(vec)
    for m in shortlist_dims:
        index = faiss.IndexFlatIP(m)
        for lo in range(0, n, 8192):
            index.add(prefix(stored[lo:lo + 8192], m))
        faiss.write_index(index, str(work / f"flat-{m}.faiss"))
    if hnsw_m:
        index = faiss.IndexHNSWFlat(EMBED_DIM, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        for lo in range(0, n, 4096):
            index.add(normalize(stored[lo:lo + 4096]))
            if progress:
                progress(min(lo + 4096, n))
        faiss.write_index(index, str(work / f"hnsw-{EMBED_DIM}.faiss"))
    del vec, stored
    for p in work.iterdir():
        _fsync(p)
    return {"n": n, "dim": EMBED_DIM, "shortlist_dims": list(shortlist_dims),
            "hnsw": {"M": hnsw_m, "efConstruction": ef_construction} if hnsw_m else None}


def _reserved(path: Path, size: int) -> Path:
    """A new file of ``size`` bytes whose blocks are allocated now: a full disk is an OSError
    (ENOSPC) here, where writing through a map of a sparse file would kill the process (SIGBUS)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_all_but(folder: Path, version: str) -> None:
    """Unlink the builds that ``version`` replaced (readers' memory maps outlive the unlink): older
    version folders, a build that died half-way, and the data files of the layout before versions."""
    for p in folder.iterdir():
        if p.is_dir() and p.name != version and (VERSION_NAME.fullmatch(p.name) or p.name.startswith(".building-v-")):
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and (p.name in DATA_FILES or re.fullmatch(r"(flat-\d+|hnsw-\d+)\.faiss", p.name)
                              or re.fullmatch(r"\.meta\.json\.[0-9a-f]+\.tmp", p.name)):
            p.unlink()
