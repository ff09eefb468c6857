"""Threshold fitting: the paper's greedy method by hand, the frontier, and the LTT guarantee."""
import numpy as np
import pytest
from scipy.stats import binom

from calibration.methods import exits, fit_frontier, fit_greedy, fit_guaranteed, ltt_losses, pareto, score
from calibration.outputs import Outputs


def outputs(conf, correct_rows, nesting):
    conf = np.asarray(conf, dtype=np.float32)
    correct = np.asarray(correct_rows, dtype=bool)
    labels = np.zeros(len(conf), dtype=np.int64)
    pred = np.where(correct, 0, 1).astype(np.int32)
    return Outputs(conf, pred, labels, tuple(nesting), {})


def test_greedy_matches_the_hand_worked_case():
    # Two sizes. Accepting at 8 when conf >= g gives 2 correct for g <= 0.85 and 3 for g > 0.85:
    # the smallest grid value above 0.85 is 0.1 + 83 * 0.9 / 99 = 0.854545...
    conf = [[0.95, 1.0], [0.85, 1.0], [0.50, 1.0], [0.30, 1.0]]
    correct = [[1, 1], [0, 1], [1, 1], [0, 0]]
    t = fit_greedy(outputs(conf, correct, (8, 2048)))
    assert t == [pytest.approx(0.1 + 83 * 0.9 / 99)]


def test_greedy_uses_greater_or_equal():
    # A confidence exactly on a grid point (0.1) is accepted by >=: all-at-8 is then as good as any.
    conf = [[0.1, 1.0], [0.9, 1.0]]
    correct = [[1, 1], [1, 1]]
    assert fit_greedy(outputs(conf, correct, (8, 2048))) == [pytest.approx(0.1)]


def synthetic(n, seed, nesting=(8, 16, 32, 2048)):
    """A latent difficulty per sample: each size is right below its skill level, and its
    confidence is a noisy sigmoid of the margin (as in real MRL heads, easy images are easy at
    every size)."""
    rng = np.random.default_rng(seed)
    skill = np.linspace(0.8, 0.93, len(nesting))
    difficulty = rng.random((n, 1))
    correct = difficulty < skill
    conf = 1 / (1 + np.exp(-(12 * (skill - difficulty) + rng.normal(0, 0.5, (n, len(nesting))))))
    return outputs(conf, correct, nesting)


def test_frontier_meets_the_constraint_and_is_never_dominated_by_greedy():
    out = synthetic(3000, 1)
    greedy = score(out, fit_greedy(out))
    full = out.correct[:, -1].mean()
    for drop in (0.0, 0.002, 0.01, 0.05):
        chosen, front = fit_frontier(out, drop, extra=[list(greedy.thresholds)])
        assert chosen.top1 >= full - drop - 1e-12
        dominated = (greedy.top1 >= chosen.top1 and greedy.expected_dims <= chosen.expected_dims
                     and (greedy.top1 > chosen.top1 or greedy.expected_dims < chosen.expected_dims))
        assert not dominated
        dims = [p.expected_dims for p in front]
        accs = [p.top1 for p in front]
        assert dims == sorted(dims) and accs == sorted(accs)


def test_pareto_keeps_only_non_dominated_points():
    from calibration.methods import Point
    pts = [Point((), 0.9, 10), Point((), 0.8, 12), Point((), 0.95, 20), Point((), 0.95, 30)]
    assert [(p.top1, p.expected_dims) for p in pareto(pts)] == [(0.9, 10), (0.95, 20)]


def test_guaranteed_falls_back_to_the_full_model_when_nothing_can_be_certified():
    out = synthetic(200, 2)
    t, info = fit_guaranteed(out, epsilon=1e-4, delta=0.1)
    assert t == [None, None, None]
    assert info["accepted"] == 0


def test_guaranteed_p_values_are_exact_binomial():
    out = synthetic(2000, 3)
    t, info = fit_guaranteed(out, epsilon=0.02, delta=0.1)
    assert info["accepted"] >= 1
    rng = np.random.default_rng(info["seed"])
    perm = rng.permutation(len(out.labels))
    test = out.subset(perm[int(round(0.3 * len(perm))):])
    k = int(ltt_losses(test, t, unlabeled=False).sum())
    assert binom.cdf(k, len(test.labels), 0.02) <= 0.1


@pytest.mark.parametrize("unlabeled", [False, True])
def test_guarantee_holds_in_repeated_draws(unlabeled):
    """Population risk (on 200k fresh samples) exceeds epsilon in at most ~delta of the draws."""
    population = synthetic(200_000, 99)
    eps, delta, violations, trials, dims = 0.01, 0.1, 0, 40, []
    for trial in range(trials):
        t, _ = fit_guaranteed(synthetic(1500, 1000 + trial), eps, delta, unlabeled=unlabeled, seed=trial)
        violations += ltt_losses(population, t, unlabeled).mean() > eps
        dims.append(score(population, t).expected_dims)
    assert violations / trials <= delta + 0.05
    assert np.mean(dims) < 1024  # not vacuous: the certified cascades do save dims


def test_a_descent_seeded_at_greedy_never_ends_above_it():
    """The local search from greedy's point: every lambda's descent lowers dims + lam * errors, so
    the first vector of the seeded path costs no more than greedy at that lambda."""
    from calibration.methods import frontier_path
    out = synthetic(3000, 4, nesting=(8, 16, 32, 64, 2048))
    greedy = fit_greedy(out)
    g = score(out, greedy)
    lam = 2e5
    first = frontier_path(out, np.array([lam]), start=greedy)[0]
    cost = lambda p: p.expected_dims + lam * (1 - p.top1)  # noqa: E731
    assert cost(first) <= cost(g) + 1e-9


def test_frontier_vs_greedy_on_eval_data():
    from calibration.fit_thresholds import frontier_vs_greedy
    hold, ev = synthetic(3000, 5), synthetic(3000, 6)
    greedy = fit_greedy(hold)
    _, front = fit_frontier(hold, 0.001, extra=[greedy])
    on_eval = [score(ev, list(p.thresholds)) for p in front]
    cmp = frontier_vs_greedy(score(hold, greedy), front, on_eval, ev)
    g_eval = score(ev, greedy)
    assert cmp["greedy"] == {"top1": g_eval.top1, "expected_dims": g_eval.expected_dims}
    reach = [(p.expected_dims, q) for p, q in zip(front, on_eval) if p.top1 >= score(hold, greedy).top1]
    q = min(reach, key=lambda r: r[0])[1]  # cheapest on the holdout, then scored on eval
    assert cmp["at_greedy_holdout"] == {"top1": q.top1, "expected_dims": q.expected_dims}
    if cmp["cheapest_on_eval"] is not None:
        assert cmp["cheapest_on_eval"]["top1"] >= g_eval.top1


def test_alert_lines_follow_the_documented_rule():
    from calibration.fit_thresholds import ALERT_FACTOR, ALERT_FLOOR, alert_line, disagreement
    # Two confident samples answer at 8 (one agrees with 2048, one does not), two escalate to 2048.
    out = Outputs(conf=np.array([[0.9, 1.0], [0.9, 1.0], [0.2, 1.0], [0.2, 1.0]]),
                  pred=np.array([[1, 1], [2, 5], [3, 6], [4, 4]]), labels=np.array([1, 5, 6, 4]),
                  nesting=(8, 2048), meta={})
    assert list(exits(out, [0.5])) == [0, 0, 1, 1]
    assert disagreement(out, [0.5]) == 0.25
    assert disagreement(out, [None]) == 0.0  # exact never disagrees
    assert disagreement(out, [0.1]) == 0.5  # all answer at 8: samples 2 and 3 differ
    assert alert_line("frontier", {}, 0.01) == ALERT_FACTOR * 0.01
    assert alert_line("greedy", {}, 0.0001) == ALERT_FLOOR
    assert alert_line("guaranteed", {"unlabeled": True, "epsilon": 0.02}, 0.0) == 0.02
    assert alert_line("guaranteed", {"unlabeled": False, "epsilon": 0.02}, 0.004) == ALERT_FACTOR * 0.004
    assert alert_line("fixed", {"dims": 2048}, 0.0) is None
