"""The adaptive-classification cascade: one pure, vectorized rule shared by server and calibration.

At size index s (8, 16, ..., 1024) a sample is answered by head s when that head's max softmax
is at least its threshold t_s; otherwise it escalates to the next size. The largest size always
answers. A threshold of +inf skips a size: it is never tried (this is how a fixed ``dim``
request is expressed, and how an operating point can skip sizes).

In NumPy, not torch: a worker runs it right after a forward pass has swept the caches, where
each of torch's small ops paid its dispatch cold (a lone ImageNet-size request's rule took 0.39 ms
right after an OpenVINO forward, 0.07 ms warm; docs/benchmarks.md, "Server tuning").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

INF = float("inf")


@dataclass
class CascadeResult:
    """Per-sample decisions for a batch of B samples over S sizes."""

    exit_index: np.ndarray   # (B,) int64: index into the nesting sizes of the answering head
    exit_dim: np.ndarray     # (B,) int64: the embedding size that answered
    label: np.ndarray        # (B,) int64: argmax class of the answering head
    confidence: np.ndarray   # (B,) float32: max softmax of the answering head
    probs: np.ndarray        # (B, C) float32: softmax of the answering head
    tried: np.ndarray        # (B, S) bool: sizes evaluated by the cascade rule, up to the exit
    size_conf: np.ndarray    # (B, S) float32: max softmax of every head (what traffic capture records)
    size_label: np.ndarray   # (B, S) int64: argmax of every head

    def sizes_tried(self, nesting: Sequence[int]) -> list[list[int]]:
        return [[int(m) for m, t in zip(nesting, row) if t] for row in self.tried.tolist()]


def threshold_rows(thresholds: Sequence[float | None], batch: int) -> np.ndarray:
    """Expand one operating point (S-1 values, None = skip the size) to a (B, S-1) array."""
    t = np.array([INF if v is None else float(v) for v in thresholds], dtype=np.float32)
    return np.broadcast_to(t, (batch, len(t)))


def fixed_dim_row(nesting: Sequence[int], dim: int) -> list[float | None]:
    """Thresholds that answer at exactly ``dim``: skip every smaller size, accept at ``dim``."""
    if dim not in nesting:
        raise ValueError(f"dim must be one of {list(nesting)}, got {dim}")
    k = list(nesting).index(dim)
    return [None] * k + [-INF] * (len(nesting) - 1 - k)


def exit_indices(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The rule itself: (B, S) max-softmax per size, (S-1,) or (B, S-1) thresholds -> (B,) exit index.

    The exit is the first size whose confidence is at least its threshold; the last size always
    accepts. +inf never accepts (the size is skipped).
    """
    conf = np.asarray(conf)
    b, s = conf.shape
    accept = np.ones((b, s), dtype=bool)
    np.greater_equal(conf[:, :-1], np.asarray(thresholds, dtype=conf.dtype), out=accept[:, :-1])
    return accept.argmax(axis=1)  # argmax returns the first maximum


def run_cascade(probs: np.ndarray, thresholds: np.ndarray, nesting: Sequence[int]) -> CascadeResult:
    """Apply the cascade rule to per-size class probabilities.

    probs:      (B, S, C) softmax outputs, one row per nesting size.
    thresholds: (S-1,), (1, S-1) or (B, S-1) thresholds for every size but the last; +inf skips a size.

    Only NumPy's C functions on the way (no take_along_axis, broadcast_to or isposinf, which run
    Python of their own). Right after a forward every NumPy call is cold all the same: a lone
    ImageNet-size request's rule went only 0.17 → 0.15 ms (docs/benchmarks.md, "Server tuning").
    """
    probs = np.asarray(probs)
    b, s, _ = probs.shape
    if s != len(nesting):
        raise ValueError(f"probs have {s} sizes but the nesting has {len(nesting)}: {list(nesting)}")
    thresholds = np.asarray(thresholds, dtype=np.float32)
    if thresholds.shape[-1:] != (s - 1,) or thresholds.ndim > 2 or (thresholds.ndim == 2 and len(thresholds) not in (1, b)):
        raise ValueError(f"thresholds must be ({s - 1},) or ({b}, {s - 1}), got {thresholds.shape}")
    label = probs.argmax(axis=-1)  # (B, S)
    conf = probs.max(axis=-1)  # (B, S): the probability at label
    exit_index = exit_indices(conf, thresholds)
    rows = np.arange(b)
    tried = np.arange(s) <= exit_index[:, None]
    tried[:, :-1] &= thresholds != INF
    return CascadeResult(exit_index=exit_index, exit_dim=np.asarray(nesting)[exit_index],
                         label=label[rows, exit_index], confidence=conf[rows, exit_index].astype(np.float32),
                         probs=probs[rows, exit_index].astype(np.float32), tried=tried,
                         size_conf=conf, size_label=label)


def top_classes(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, C) probabilities -> the ``k`` most probable classes of each row, most probable first, and
    their probabilities, both (B, k); equal probabilities in class order."""
    rows = np.arange(len(probs))[:, None]
    if k < probs.shape[-1]:  # the k largest in linear time, then only those sorted
        part = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
        idx = part[rows, np.lexsort((part, -probs[rows, part]), axis=-1)]
    else:
        idx = np.argsort(-probs, axis=-1, kind="stable")
    return idx, probs[rows, idx]
