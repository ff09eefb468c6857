"""Golden tests of the cascade rule shared by server and calibration."""
import numpy as np
import torch

from handler.cascade import fixed_dim_row, run_cascade, threshold_rows, top_classes

NESTING = (8, 16, 2048)


def probs_from_conf(conf_rows, classes=4):
    """(B, S, C) probabilities whose max at each size is the given confidence, on class = size index."""
    b, s = len(conf_rows), len(conf_rows[0])
    p = np.zeros((b, s, classes), dtype=np.float32)
    for i, row in enumerate(conf_rows):
        for j, c in enumerate(row):
            rest = (1 - c) / (classes - 1)
            p[i, j] = rest
            p[i, j, j] = c
    return p


def test_boundary_at_exactly_the_threshold_answers():
    p = probs_from_conf([[0.5, 0.9, 0.9], [0.49999, 0.9, 0.9]])
    r = run_cascade(p, np.array([0.5, 0.95]), NESTING)
    assert r.exit_dim.tolist() == [8, 2048]
    assert r.label.tolist() == [0, 2]
    assert r.sizes_tried(NESTING) == [[8], [8, 16, 2048]]


def test_largest_size_always_answers_even_below_every_threshold():
    p = probs_from_conf([[0.3, 0.3, 0.3]])
    r = run_cascade(p, np.array([0.99, 0.99]), NESTING)
    assert r.exit_dim.tolist() == [2048]
    assert abs(r.confidence.item() - 0.3) < 1e-6


def test_rows_are_independent_of_their_batch():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(32, 3, 5) * 3, dim=-1).numpy()
    t = np.array([0.6, 0.7])
    whole = run_cascade(p, t, NESTING)
    for i in (0, 7, 31):
        alone = run_cascade(p[i: i + 1], t, NESTING)
        assert alone.exit_dim.item() == whole.exit_dim[i].item()
        assert alone.label.item() == whole.label[i].item()
        np.testing.assert_array_equal(alone.probs[0], whole.probs[i])


def test_per_row_thresholds_and_fixed_dims():
    p = probs_from_conf([[0.99, 0.99, 0.99]] * 3)
    rows = np.stack([threshold_rows([0.5, 0.5], 1)[0],
                        threshold_rows(fixed_dim_row(NESTING, 16), 1)[0],
                        threshold_rows(fixed_dim_row(NESTING, 2048), 1)[0]])
    r = run_cascade(p, rows, NESTING)
    assert r.exit_dim.tolist() == [8, 16, 2048]
    assert r.sizes_tried(NESTING) == [[8], [16], [2048]]


def test_skipped_size_is_not_tried():
    p = probs_from_conf([[0.99, 0.99, 0.99]])
    r = run_cascade(p, threshold_rows([None, 0.5], 1), NESTING)
    assert r.exit_dim.tolist() == [16] and r.sizes_tried(NESTING) == [[16]]


def test_top_classes_agree_with_torch_topk_and_break_ties_by_class():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6, 1000) * 4, dim=-1)
    for k in (1, 5, 999, 1000):
        idx, val = top_classes(p.numpy(), k)
        ref_val, ref_idx = p.topk(k, dim=-1)
        assert idx.shape == val.shape == (6, k)
        np.testing.assert_array_equal(val, ref_val.numpy())
        np.testing.assert_array_equal(idx, ref_idx.numpy())  # random floats: no ties
    tied = np.array([[0.1, 0.3, 0.3, 0.3]], dtype=np.float32)
    assert top_classes(tied, 2)[0].tolist() == [[1, 2]]
    assert top_classes(tied, 4)[0].tolist() == [[1, 2, 3, 0]]


def test_a_float_batch_and_its_confidences_keep_float32():
    p = probs_from_conf([[0.4, 0.9, 0.9]])
    r = run_cascade(p, np.array([0.5, 0.5]), NESTING)
    assert r.confidence.dtype == r.probs.dtype == r.size_conf.dtype == np.float32
    assert r.exit_index.dtype == r.size_label.dtype == np.int64
