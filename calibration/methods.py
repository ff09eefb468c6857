"""Ways to choose cascade thresholds from cached per-size outputs.

* ``greedy``     the MRL paper's: one threshold per adjacent pair of sizes, chosen on a grid;
* ``frontier``   ours: all thresholds jointly, tracing the accuracy / expected-dims Pareto frontier;
* ``guaranteed`` ours: Learn-then-Test (Angelopoulos et al., 2021) with fixed-sequence testing, so
                 that with probability >= 1 - delta the cascade loses at most epsilon accuracy
                 (or disagrees with the full model at most epsilon of the time) on new data.

Thresholds are lists of S-1 values (None = skip that size). Every method scores candidates with
``handler.cascade.exit_indices``, the rule the server runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from calibration.outputs import Outputs
from handler.cascade import exit_indices

Thresholds = list  # list[float | None], one per size but the last


@dataclass(frozen=True)
class Point:
    thresholds: tuple
    top1: float
    expected_dims: float


def _row(t: Thresholds) -> np.ndarray:
    return np.array([float("inf") if v is None else v for v in t], dtype=np.float32)


def exits(out: Outputs, t: Thresholds) -> np.ndarray:
    """(N,) exit index of every sample under thresholds ``t``."""
    return exit_indices(np.asarray(out.conf, dtype=np.float32), _row(t))


def score(out: Outputs, t: Thresholds) -> Point:
    e = exits(out, t)
    rows = np.arange(len(e))
    return Point(tuple(t), float(out.correct[rows, e].mean()), float(np.asarray(out.nesting)[e].mean()))


# --- greedy: the paper's method ----------------------------------------------------------------

GREEDY_GRID = np.linspace(0.1, 1.0, 100)


def fit_greedy(out: Outputs, grid: np.ndarray = GREEDY_GRID) -> Thresholds:
    """For each adjacent pair (m_i, m_i+1): the smallest grid threshold reaching the best accuracy
    of the two-size policy "answer with m_i if its confidence >= t, else with m_i+1"."""
    correct = out.correct
    thresholds = []
    for i in range(len(out.nesting) - 1):
        accept = out.conf[:, i][None, :] >= grid[:, None]                        # (G, N)
        hits = np.where(accept, correct[:, i], correct[:, i + 1]).sum(axis=1)    # (G,) exact counts
        thresholds.append(float(grid[np.flatnonzero(hits == hits.max())[0]]))
    return thresholds


# --- frontier: joint coordinate descent on dims + lambda * errors ------------------------------

def _descend(out: Outputs, t: Thresholds, lam: float, order: list[np.ndarray], sweeps: int = 3) -> Thresholds:
    """Coordinate descent on E[dims] + lam * E[error]: each step sets one size's threshold to its
    exact optimum given all the others (a sort-free scan in precomputed confidence order)."""
    dims = np.asarray(out.nesting, dtype=np.float64)
    cost = dims[None, :] + lam * (~out.correct)                                   # (N, S) cost of exiting at s
    conf = out.conf
    s_count = len(out.nesting)
    t = list(t)
    for _ in range(sweeps):
        changed = False
        for s in range(s_count - 1):
            e = exits(out, t[:s] + [None] + t[s + 1:])       # where each sample goes if s answers nobody
            reach = e >= s                                   # rejected by every size before s
            down = cost[np.arange(len(e)), e]                # cost of continuing past s
            idx = order[s][reach[order[s]]]                  # reaching samples, by confidence at s, descending
            if len(idx) == 0:
                continue
            gain = np.cumsum(cost[idx, s] - down[idx])       # total change if the top k answer at s
            c = conf[idx, s]
            valid = np.append(c[:-1] > c[1:], True)          # cut only between distinct confidences
            gain = np.where(valid, gain, np.inf)
            k = int(np.argmin(gain)) + 1
            new = None if gain[k - 1] >= 0 else float((c[k - 1] + c[k]) / 2 if k < len(c) else c[k - 1])
            if new != t[s]:
                t[s], changed = new, True
        if not changed:
            break
    return t


def pareto(points: list[Point]) -> list[Point]:
    """Non-dominated points (higher top-1, fewer dims), sorted by expected dims."""
    best: list[Point] = []
    for p in sorted(points, key=lambda p: (p.expected_dims, -p.top1)):
        if not best or p.top1 > best[-1].top1:
            best.append(p)
    return best


def frontier_path(out: Outputs, lambdas: np.ndarray | None = None, start: Thresholds | None = None
                  ) -> list[Point]:
    """Threshold vectors from conservative (large lambda) to aggressive (small lambda).

    Each lambda's descent starts from the previous lambda's result; the first from ``start``
    (default: every size skipped, i.e. the full model)."""
    if lambdas is None:
        lambdas = np.geomspace(2e5, 1.0, 60)
    order = [np.argsort(-out.conf[:, s], kind="stable") for s in range(len(out.nesting))]
    t: Thresholds = list(start) if start is not None else [None] * (len(out.nesting) - 1)
    path = []
    for lam in lambdas:
        t = _descend(out, t, float(lam), order)
        path.append(score(out, t))
    return path


def fit_frontier(out: Outputs, max_drop: float, extra: list[Thresholds] = ()) -> tuple[Point, list[Point]]:
    """Fewest expected dims with holdout top-1 >= full-model top-1 - max_drop, and the frontier.

    ``extra`` candidates (e.g. greedy's) join the search, so the result is never dominated by them,
    and each also seeds a local search: a descent path warm-started from it. On a hard model the
    path from the full model can jump over the accurate region that greedy lands in (seen on a
    1000-class probe: nothing between 150 and 496 dims); descending from greedy's point finds
    cheaper vectors of the same accuracy there.
    """
    candidates = frontier_path(out) + [score(out, t) for t in extra]
    for t in extra:
        candidates += frontier_path(out, np.geomspace(2e5, 1.0, 60), start=list(t))
    candidates.append(score(out, [None] * (len(out.nesting) - 1)))
    target = float(out.correct[:, -1].mean()) - max_drop
    ok = [p for p in candidates if p.top1 >= target - 1e-12]
    chosen = min(ok, key=lambda p: (p.expected_dims, -p.top1))
    return chosen, pareto(candidates)


# --- guaranteed: Learn-then-Test with fixed-sequence testing -----------------------------------

def ltt_losses(out: Outputs, t: Thresholds, unlabeled: bool) -> np.ndarray:
    """Per-sample 0/1 loss: the cascade is wrong where the full model is right (labelled), or the
    cascade disagrees with the full model (unlabelled). Its mean bounds the accuracy drop."""
    e = exits(out, t)
    rows = np.arange(len(e))
    if unlabeled:
        return out.pred[rows, e] != out.pred[:, -1]
    return ~out.correct[rows, e] & out.correct[:, -1]


def ltt_family(out: Outputs, ramp: int = 20) -> list[Thresholds]:
    """Candidates from conservative to aggressive: a ramp from all-thresholds-1 down to the most
    conservative frontier vector (t -> 1 - a (1 - t), a = 0 ... 1), then along the frontier path.
    The ramp gives fixed-sequence testing small steps where the first risks appear."""
    path = [list(p.thresholds) for p in frontier_path(out, np.geomspace(1e7, 1.0, 80))]
    first = path[0]
    ramp_part = [[None if v is None else float(1 - a * (1 - v)) for v in first]
                 for a in np.linspace(0.0, 1.0, ramp, endpoint=False)]
    family: list[Thresholds] = []
    for t in ramp_part + path:
        if not family or t != family[-1]:
            family.append(t)
    return family


def fit_guaranteed(out: Outputs, epsilon: float, delta: float, *, unlabeled: bool = False,
                   family_fraction: float = 0.3, seed: int = 0) -> tuple[Thresholds, dict]:
    """Learn-then-Test. A random ``family_fraction`` of the holdout orders candidate threshold
    vectors from conservative to aggressive (the frontier path); the rest tests them in that
    order with exact binomial p-values, H_j: risk(t_j) > epsilon, stopping at the first that is
    not rejected at level delta. Fixed-sequence testing controls the family-wise error at delta,
    so every accepted vector (and the most aggressive one returned) has risk <= epsilon with
    probability >= 1 - delta over the draw of the holdout."""
    if not (0 < epsilon < 1 and 0 < delta < 1 and 0 < family_fraction < 1):
        raise ValueError(f"need 0 < epsilon, delta, family_fraction < 1; got {epsilon}, {delta}, {family_fraction}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(out.labels))
    n_family = int(round(family_fraction * len(perm)))
    family_out, test_out = out.subset(perm[:n_family]), out.subset(perm[n_family:])
    family = ltt_family(family_out)
    n = len(test_out.labels)
    chosen: Thresholds = [None] * (len(out.nesting) - 1)   # the full model: zero risk by definition
    tested = []
    for t in family:
        k = int(ltt_losses(test_out, t, unlabeled).sum())
        p_value = float(binom.cdf(k, n, epsilon))           # P(Binom(n, eps) <= k) under H_j
        tested.append({"losses": k, "p_value": p_value})
        if p_value > delta:
            break
        chosen = t
    info = {"epsilon": epsilon, "delta": delta, "unlabeled": unlabeled, "family_fraction": family_fraction,
            "family_size": len(family), "tested": len(tested), "n_test": n, "seed": seed,
            "accepted": sum(1 for r in tested if r["p_value"] <= delta)}
    return chosen, info
