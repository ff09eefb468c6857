"""The Qdrant adapter (qdrant-client's local mode, a real Qdrant engine in process): one collection
with a named vector per funnel stage, the funnel as one Query API call with nested prefetch, and
the same neighbours as the in-process search."""
import numpy as np
import pytest

from retrieval import qdrant
from retrieval.gallery import build
from retrieval.search import search

N, C = 2000, 20


@pytest.fixture(scope="module")
def gallery_and_queries(tmp_path_factory):
    rng = np.random.default_rng(1)
    centers = (rng.normal(size=(C, 2048)) * np.where(np.arange(2048) < 16, 4.0, 1.0)).astype(np.float32)
    emb = centers[np.arange(N) % C] + 1.5 * rng.normal(size=(N, 2048)).astype(np.float32)
    queries = centers[np.arange(200) % C] + 1.5 * rng.normal(size=(200, 2048)).astype(np.float32)
    g = build(tmp_path_factory.mktemp("gallery"), emb, np.arange(N) % C, np.arange(N) + 7,
              {"checkpoint_sha256": "abc", "spec": "synthetic"}, hnsw_m=None)
    return g, queries


@pytest.fixture(scope="module")
def client(gallery_and_queries):
    g, _ = gallery_and_queries
    c = qdrant.connect(None)
    assert qdrant.upload(c, "g", g, qdrant.funnel_dims(["rerank", "funnel"])) == N
    return c


def test_the_collection_holds_one_named_vector_per_stage(client):
    about = qdrant.describe(client, "g")
    assert about == {"n": N, "dims": [8, 16, 32, 64, 128, 2048], "checkpoint_sha256": "abc"}
    point = client.retrieve("g", [5], with_payload=True, with_vectors=True)[0]
    assert point.payload == {"label": 5, "item_id": 12, "checkpoint_sha256": "abc"}
    assert len(point.vector["d16"]) == 16 and abs(np.linalg.norm(point.vector["d16"]) - 1) < 1e-5


@pytest.mark.parametrize("funnel", ["rerank", "funnel"])
def test_qdrant_gives_the_in_process_funnels_neighbours(client, gallery_and_queries, funnel):
    g, queries = gallery_and_queries
    ours = search(g, queries, 10, funnel)
    theirs, scores = qdrant.search(client, "g", queries, 10, funnel, checkpoint_sha256="abc")
    assert theirs.shape == (200, 10)
    agree = qdrant.agreement(ours.index, theirs)
    assert agree["compared"] == 200 and agree["same_set"] == 200 and agree["identical"] >= 198, agree   # float32 near-ties may swap
    np.testing.assert_allclose(scores, ours.score, atol=1e-4)


def test_a_small_shortlist_changes_the_answer_so_the_comparison_can_fail(client, gallery_and_queries):
    g, queries = gallery_and_queries
    ours = search(g, queries, 10, "exact")
    theirs, _ = qdrant.search(client, "g", queries, 10, ((8, 12), (2048, 10)))
    assert qdrant.agreement(ours.index, theirs)["same_set"] < 200


def test_refusals(client, gallery_and_queries):
    _, queries = gallery_and_queries
    with pytest.raises(ValueError, match="checkpoint sha256 abc but the model is sha256 def"):
        qdrant.search(client, "g", queries[:1], 10, checkpoint_sha256="def")
    with pytest.raises(ValueError, match="no vectors at \\[256\\]"):
        qdrant.search(client, "g", queries[:1], 10, ((16, 100), (256, 10)))
