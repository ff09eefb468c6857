"""Retrieval on a synthetic gallery: storage, prefix normalisation, exact search against brute
force, funnels, HNSW, the metrics' definitions and the refusals."""
import numpy as np
import pytest

from retrieval.evaluate import average_precision_at_k, precision_at_k, recall_against
from retrieval.gallery import Gallery, build, normalize
from retrieval.search import funnel_stages, knn_labels, search

N, C = 3000, 20


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # MRL-like: the class signal is strongest in the first dims, so small prefixes shortlist well.
    centers = (rng.normal(size=(C, 2048)) * np.where(np.arange(2048) < 16, 4.0, 1.0)).astype(np.float32)
    labels = np.arange(N) % C
    emb = centers[labels] + 1.5 * rng.normal(size=(N, 2048)).astype(np.float32)
    queries_labels = np.arange(200) % C
    queries = centers[queries_labels] + 1.5 * rng.normal(size=(200, 2048)).astype(np.float32)
    return emb, labels, queries, queries_labels


@pytest.fixture(scope="module")
def gallery(data, tmp_path_factory):
    emb, labels, _, _ = data
    return build(tmp_path_factory.mktemp("gallery"), emb * 3.0, labels, np.arange(N) + 100,
                 {"checkpoint_sha256": "abc", "spec": "synthetic"}, hnsw_m=16)


def brute(emb, queries, m, k):
    s = normalize(queries[:, :m]) @ normalize(emb[:, :m]).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_rows_are_each_prefix_renormalised(gallery, data):
    emb = data[0]
    got = gallery.rows(np.array([[5, 7], [0, 2999]]), 16)
    want = normalize(emb[[5, 7, 0, 2999], :16]).reshape(2, 2, 16)
    np.testing.assert_allclose(got, want, atol=2e-3)  # float16 storage
    assert gallery.meta["n"] == N and list(gallery.ids[:2]) == [100, 101]


def test_exact_search_is_brute_force(gallery, data):
    emb, _, queries, _ = data
    r = search(gallery, queries, 10, "exact")
    want = brute(emb, queries, 2048, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(r.index, want)]) > 0.99  # float16 ties aside
    assert r.flops == 2 * 2048 * N


def test_a_funnel_whose_shortlist_is_the_gallery_is_exact(gallery, data):
    _, _, queries, _ = data
    exact = search(gallery, queries, 10, "exact")
    full = search(gallery, queries, 10, stages=((8, N), (2048, 10)), method="custom")
    np.testing.assert_array_equal(full.index, exact.index)
    np.testing.assert_allclose(full.score, exact.score, atol=1e-5)


def test_named_funnels_report_their_stages_and_cost(gallery, data):
    _, _, queries, _ = data
    r = search(gallery, queries, 10, "rerank")
    assert [(s["dim"], s["candidates"], s["kept"]) for s in r.stages] == [(16, N, 200), (2048, 200, 10)]
    assert r.flops == 2 * 16 * N + 2 * 2048 * 200
    f = search(gallery, queries, 5, "funnel")
    assert [s["kept"] for s in f.stages] == [800, 400, 200, 50, 10, 5] and f.index.shape == (200, 5)
    exact = search(gallery, queries, 10, "exact")
    assert recall_against(r.index, exact.index).mean() > 0.9
    # The funnel's middle stages see little of this data's within-class structure (only 16 dims
    # carry extra signal), so judge it by labels: as precise as exact search.
    qlabels = data[3]
    assert precision_at_k(gallery.labels[f.index], qlabels, 5).mean() >= precision_at_k(
        gallery.labels[exact.index], qlabels, 5).mean() - 0.02


def test_hnsw_finds_most_exact_neighbours(gallery, data):
    _, _, queries, _ = data
    r = search(gallery, queries, 10, "hnsw")
    assert recall_against(r.index, search(gallery, queries, 10, "exact").index).mean() > 0.8
    assert 0 < r.flops < 2 * 2048 * N


def test_knn_classifies_the_clusters(gallery, data):
    _, _, queries, qlabels = data
    assert (knn_labels(gallery, queries, 2048) == qlabels).mean() > 0.95


@pytest.mark.parametrize("kw, message", [
    (dict(k=0), "k must be in 1..3000"), (dict(k=3001), "k must be in 1..3000"),
    (dict(k=10, method="nope"), "unknown method"),
    (dict(k=10, method="x", stages=((8, 100), (16, 200), (2048, 10))), "cannot grow"),
    (dict(k=10, method="x", stages=((12, 100), (2048, 10))), "starts at a prefix with an index"),
    (dict(k=10, method="x", stages=((32, 100), (16, 50), (2048, 10))), "must increase"),
])
def test_bad_searches_are_refused(gallery, data, kw, message):
    with pytest.raises(ValueError, match=message):
        search(gallery, data[2][:2], **kw)


def test_a_gallery_of_another_checkpoint_is_refused_naming_both(gallery):
    with pytest.raises(ValueError, match="sha256 abc but the model is sha256 def"):
        Gallery.open(gallery.folder, checkpoint_sha256="def")


def test_metrics_follow_their_definitions():
    retrieved = np.array([[1, 0, 1, 0, 0, 0, 0, 0, 0, 0], [0] * 10, [1] * 10])
    q = np.array([1, 1, 1])
    np.testing.assert_allclose(average_precision_at_k(retrieved, q), [(1 + 2 / 3) / 10, 0.0, 1.0])
    np.testing.assert_allclose(precision_at_k(retrieved, q), [0.2, 0.0, 1.0])
    np.testing.assert_allclose(recall_against(np.array([[1, 2, 3]]), np.array([[3, 4, 1]])), [2 / 3])
    assert funnel_stages("rerank", 7, type("G", (), {"flat": {16: 0}, "__len__": lambda s: 100})()) == ((16, 100), (2048, 7))
