"""Retrieval on a synthetic gallery: storage, prefix normalisation, exact search against brute
force, funnels, HNSW, the metrics' definitions and the refusals."""
import numpy as np
import pytest

from handler.gallery import Gallery, normalize
from handler.search import funnel_stages, knn_labels, search
from retrieval.evaluate import average_precision_at_k, precision_at_k, recall_against
from retrieval.gallery import build

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
    r = search(gallery, queries, 10, "rerank16")
    assert [(s["dim"], s["candidates"], s["kept"]) for s in r.stages] == [(16, N, 200), (2048, 200, 10)]
    assert [s["dim"] for s in search(gallery, queries, 10, "rerank").stages] == [32, 2048]
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
    assert funnel_stages("rerank16", 7, 100, {16}) == ((16, 100), (2048, 7))


def test_a_subset_is_the_first_items_with_their_own_indexes(gallery, data):
    emb, _, queries, _ = data
    sub = gallery.subset(500)
    assert len(sub) == 500 and sub.flat[16].ntotal == 500 and sub.hnsw is None
    r = search(sub, queries, 10, "exact")
    assert r.index.max() < 500
    assert recall_against(r.index, brute(emb[:500], queries, 2048, 10)).mean() > 0.99


def test_exact_search_on_a_faiss_flat_index_agrees_with_the_brute_force_path(gallery, data, tmp_path):
    _, _, queries, _ = data
    plain = Gallery.open(gallery.folder)
    torch_path = search(plain, queries, 10, "exact")
    plain.add_exact_index()
    faiss_path = search(plain, queries, 10, "exact")
    assert recall_against(faiss_path.index, torch_path.index).mean() > 0.995
    np.testing.assert_allclose(faiss_path.score, torch_path.score, atol=1e-4)


def test_evaluation_reports_every_method_side_by_side(gallery, data):
    from retrieval.evaluate import cost_curve, evaluate
    _, _, queries, qlabels = data
    g = Gallery.open(gallery.folder)
    report = evaluate(g, queries, qlabels, single=5, nesting=(16, 2048))
    assert set(report["methods"]) == {"exact", "rerank", "rerank16", "funnel"}
    assert [h["efSearch"] for h in report["hnsw_sweep"]] == [16, 32, 64, 128, 256, 512]
    exact = report["methods"]["exact"]
    assert exact["recall@10_vs_exact"] == 1.0 and exact["mflops_per_query"] == 2 * 2048 * N / 1e6
    d = report["default_vs_exact"]
    assert d["flops_ratio"] == pytest.approx(2 * 2048 * N / (2 * 32 * N + 2 * 2048 * 200))
    assert report["hnsw_at_equal_recall"]["recall@10"] >= d["recall@10"]
    assert set(report["knn_top1"]) == {"16", "2048"}
    rows = cost_curve(g, queries[:20], qlabels[:20], [300, N], single=3)
    assert [r["n"] for r in rows] == [300, N] and rows[0]["exact"]["mflops_per_query"] == 2 * 2048 * 300 / 1e6


def test_building_an_index_twice_gives_the_same_bytes(tiny_checkpoint, tmp_path):
    """build_index embeds through the serving Engine; two builds of one spec are byte-identical
    (the flat indexes, vectors, labels and ids; meta differs only in its creation time)."""
    import json

    from imagedata.specs import fashion_mnist
    from retrieval import build_index
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        build_index.main(["--checkpoint", str(tiny_checkpoint), "--data", "fashion-mnist:test", "--limit", "300",
                          "--hnsw-m", "0", "--out", str(out)])
    g = Gallery.open(outs[0])
    assert sorted(p.name for p in outs[0].iterdir()) == ["meta.json", g.path.name]  # the data in one version folder
    names = sorted(p.name for p in g.path.iterdir())
    assert names == ["flat-16.faiss", "flat-32.faiss", "flat-64.faiss", "flat-8.faiss", "ids.npy", "labels.npy",
                     "meta.json", "vectors.f16"]
    other = Gallery.open(outs[1]).path
    for name in names[:-2] + ["vectors.f16"]:
        assert (g.path / name).read_bytes() == (other / name).read_bytes(), name
    metas = [json.loads((o / "meta.json").read_text()) for o in outs]
    for m in metas:
        m.pop("created"), m.pop("version")
    assert metas[0] == metas[1] and metas[0]["n"] == 300 and metas[0]["spec"] == "fashion-mnist:test"
    assert np.count_nonzero(np.asarray(g.vectors)) > 0
    np.testing.assert_array_equal(g.labels, fashion_mnist("test").labels[:300])


def _small(data, n, id0=0, shift=0):
    emb, labels, _, _ = data
    return emb[:n], (labels[:n] + shift) % C, np.arange(n) + id0


def test_a_rebuild_in_place_leaves_an_open_gallery_intact(data, tmp_path):
    """A rebuild into the folder a reader has open (a worker's memory map) writes new files and
    switches to them: the open gallery keeps reading its own vectors, a fresh open gets the new."""
    folder = tmp_path / "g"
    old = build(folder, *_small(data, 300), {"checkpoint_sha256": "abc", "spec": "a"}, hnsw_m=None)
    before = np.array(old.vectors[:300])
    new_emb = data[0][1000:1300][::-1].copy()
    build(folder, new_emb, np.zeros(300, int), np.arange(300) + 5000, {"checkpoint_sha256": "abc", "spec": "b"},
          hnsw_m=None)
    np.testing.assert_array_equal(np.array(old.vectors[:300]), before)   # a memory map never rewritten
    assert old.changed()
    fresh = Gallery.open(folder)
    assert (len(fresh), fresh.meta["spec"], int(fresh.ids[0])) == (300, "b", 5000) and not fresh.changed()
    np.testing.assert_allclose(np.asarray(fresh.vectors[0], np.float32), normalize(new_emb[:1])[0], atol=2e-3)


def test_a_rebuild_of_another_size_and_counts_checked_on_open(data, tmp_path):
    folder = tmp_path / "g"
    build(folder, *_small(data, 300), {"checkpoint_sha256": "abc", "spec": "a"}, hnsw_m=None)
    g = build(folder, *_small(data, 120, id0=7000), {"checkpoint_sha256": "abc", "spec": "a"}, hnsw_m=None)
    assert (len(g), g.flat[8].ntotal, len(g.ids), g.vectors.shape[0]) == (120, 120, 120, 120)
    # A gallery whose parts disagree is refused on open, naming the counts.
    np.save(g.path / "labels.npy", np.zeros(119, dtype=np.int64))
    with pytest.raises(ValueError, match="labels.npy holds 119 items but meta.json says 120"):
        Gallery.open(folder)


def test_a_gallery_in_the_layout_before_versions_still_opens(data, tmp_path):
    """Galleries built before versioned folders (files straight in the folder) open as they are,
    and a rebuild into such a folder replaces them."""
    import json
    import shutil
    folder = tmp_path / "g"
    g = build(folder, *_small(data, 200), {"checkpoint_sha256": "abc", "spec": "a"}, hnsw_m=None)
    for p in g.path.iterdir():
        shutil.move(str(p), folder / p.name)
    shutil.rmtree(g.path)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["version"]
    (folder / "meta.json").write_text(json.dumps(meta))
    flat = Gallery.open(folder)
    assert len(flat) == 200 and flat.path == folder
    g2 = build(folder, *_small(data, 100), {"checkpoint_sha256": "abc", "spec": "b"}, hnsw_m=None)
    assert len(Gallery.open(folder)) == 100 and g2.path != folder
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", g2.path.name]
    assert np.array(flat.vectors[199]).any()  # the old files were unlinked, not truncated: still mapped


@pytest.mark.parametrize("method", ["exact", "rerank", "funnel"])
def test_a_query_that_is_not_finite_is_refused_not_answered_with_the_last_item(gallery, data, method):
    """FAISS answers a NaN query with index -1, which ids[-1] turns into the gallery's last item."""
    queries = data[2][:3].copy()
    queries[1, 5] = np.nan
    with pytest.raises(ValueError, match="query 1 holds NaN or infinite values"):
        search(gallery, queries, 5, method)


FULL_DISK = """
import errno, sys
import numpy as np
from handler.gallery import Gallery
from retrieval.gallery import build
folder, meta = sys.argv[1], {"checkpoint_sha256": "abc", "spec": "a"}
rng = np.random.default_rng(0)
build(folder, rng.normal(size=(300, 2048)).astype(np.float32), np.zeros(300, int), np.arange(300), meta,
      hnsw_m=None)
try:
    build(folder, rng.normal(size=(3000, 2048)).astype(np.float32), np.zeros(3000, int), np.arange(3000), meta,
          hnsw_m=None)
except OSError as e:
    print("refused", errno.errorcode[e.errno], len(Gallery.open(folder)), sorted(p.name[:2] for p in
          __import__("pathlib").Path(folder).iterdir()))
"""


def test_a_build_onto_a_full_disk_is_an_error_and_the_old_gallery_stays(tmp_path):
    """A 4 MB file system (a tmpfs in a mount namespace of its own) holds a 300-item gallery but not a
    3000-item rebuild (12 MB of vectors): the build raises ENOSPC and leaves the served gallery as it
    was, where writing through a map of a sparse file killed the process with SIGBUS."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    folder = tmp_path / "small"
    folder.mkdir()
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                          f'mount -t tmpfs -o size=4m tmpfs "{folder}" && exec "{sys.executable}" -c "$0" "{folder}"',
                          FULL_DISK], capture_output=True, text=True, timeout=120, cwd=root)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split(None, 3)[:3] == ["refused", "ENOSPC", "300"], out.stdout
    assert out.stdout.rstrip().endswith("['me', 'v-']"), out.stdout   # meta.json and one version, no .building
