"""The adaptive-classification cascade: one pure, vectorized rule shared by server and calibration.

At size index s (8, 16, ..., 1024) a sample is answered by head s when that head's max softmax
is at least its threshold t_s; otherwise it escalates to the next size. The largest size always
answers. A threshold of +inf skips a size: it is never tried (this is how a fixed ``dim``
request is expressed, and how an operating point can skip sizes).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

INF = float("inf")


@dataclass
class CascadeResult:
    """Per-sample decisions for a batch of B samples over S sizes."""

    exit_index: torch.Tensor   # (B,) int64: index into the nesting sizes of the answering head
    exit_dim: torch.Tensor     # (B,) int64: the embedding size that answered
    label: torch.Tensor        # (B,) int64: argmax class of the answering head
    confidence: torch.Tensor   # (B,) float32: max softmax of the answering head
    probs: torch.Tensor        # (B, C) float32: softmax of the answering head
    tried: torch.Tensor        # (B, S) bool: sizes evaluated by the cascade rule, up to the exit
    size_conf: torch.Tensor    # (B, S) max softmax of every head (what traffic capture records)
    size_label: torch.Tensor   # (B, S) argmax of every head

    def sizes_tried(self, nesting: Sequence[int]) -> list[list[int]]:
        return [[int(m) for m, t in zip(nesting, row) if t] for row in self.tried.tolist()]


def threshold_rows(thresholds: Sequence[float | None], batch: int) -> torch.Tensor:
    """Expand one operating point (S-1 values, None = skip the size) to a (B, S-1) tensor."""
    t = torch.tensor([INF if v is None else float(v) for v in thresholds], dtype=torch.float32)
    return t.expand(batch, -1)


def fixed_dim_row(nesting: Sequence[int], dim: int) -> list[float | None]:
    """Thresholds that answer at exactly ``dim``: skip every smaller size, accept at ``dim``."""
    if dim not in nesting:
        raise ValueError(f"dim must be one of {list(nesting)}, got {dim}")
    k = list(nesting).index(dim)
    return [None] * k + [-INF] * (len(nesting) - 1 - k)


def exit_indices(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The rule itself: (B, S) max-softmax per size, (S-1,) or (B, S-1) thresholds -> (B,) exit index.

    The exit is the first size whose confidence is at least its threshold; the last size always
    accepts. +inf never accepts (the size is skipped).
    """
    b, s = conf.shape
    accept = torch.ones(b, s, dtype=torch.bool, device=conf.device)
    accept[:, :-1] = conf[:, :-1] >= thresholds.to(conf.device, conf.dtype)
    return accept.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximum


def run_cascade(probs: torch.Tensor, thresholds: torch.Tensor, nesting: Sequence[int]) -> CascadeResult:
    """Apply the cascade rule to per-size class probabilities.

    probs:      (B, S, C) softmax outputs, one row per nesting size.
    thresholds: (S-1,) or (B, S-1) thresholds for every size but the last; +inf skips a size.
    """
    b, s, _ = probs.shape
    if s != len(nesting):
        raise ValueError(f"probs have {s} sizes but the nesting has {len(nesting)}: {list(nesting)}")
    thresholds = thresholds.to(probs.device, torch.float32).expand(b, s - 1)
    conf, label = probs.max(dim=-1)  # (B, S) each
    exit_index = exit_indices(conf, thresholds)
    rows = torch.arange(b, device=probs.device)
    skipped = torch.zeros(b, s, dtype=torch.bool, device=probs.device)
    skipped[:, :-1] = torch.isposinf(thresholds)
    tried = (torch.arange(s, device=probs.device) <= exit_index[:, None]) & ~skipped
    dims = torch.as_tensor(list(nesting), device=probs.device)
    return CascadeResult(exit_index=exit_index, exit_dim=dims[exit_index],
                         label=label[rows, exit_index], confidence=conf[rows, exit_index].float(),
                         probs=probs[rows, exit_index].float(), tried=tried,
                         size_conf=conf, size_label=label)
