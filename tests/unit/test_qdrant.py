"""The Qdrant adapter (qdrant-client's local mode, a real Qdrant engine in process): one collection
with a named vector per funnel stage, the funnel as one Query API call with nested prefetch, and
the same neighbours as the in-process search."""
import json

import numpy as np
import pytest

from handler.search import search
from retrieval import qdrant
from retrieval.gallery import build

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


# --- python -m retrieval.qdrant check never harms a real collection (issue #33 item 5) -------------

@pytest.fixture
def served(tmp_path, tiny_checkpoint):
    """A gallery of the tiny checkpoint (random vectors stand in for its embeddings), uploaded as
    the collection a server would use (named after the gallery folder), in an on-disk local Qdrant;
    and a folder of query images."""
    from PIL import Image

    from handler.checkpoint import file_sha256

    rng = np.random.default_rng(3)
    g = build(tmp_path / "han-small", rng.normal(size=(300, 2048)).astype(np.float32), np.arange(300) % 10,
              np.arange(300), {"checkpoint_sha256": file_sha256(tiny_checkpoint), "spec": "synthetic"}, hnsw_m=None)
    for i in range(6):
        (tmp_path / "queries" / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(tmp_path / "queries" / str(i % 3) / f"{i}.png")
    store = tmp_path / "qdrant"
    c = qdrant.connect(None, str(store))
    qdrant.upload(c, "han-small", g)
    c.close()
    return g, store, tmp_path / "queries"


def collections(store) -> dict[str, int]:
    c = qdrant.connect(None, str(store))
    try:
        return {col.name: c.count(col.name, exact=True).count for col in c.get_collections().collections}
    finally:
        c.close()


def test_check_uses_a_scratch_collection_and_leaves_the_real_one_whole(served, tiny_checkpoint):
    g, store, queries = served
    report = qdrant.main(["check", "--gallery", str(g.folder), "--path", str(store), "--checkpoint",
                          str(tiny_checkpoint), "--queries", str(queries), "--items", "50", "-k", "5"])
    assert report["items"] == 50 and report["same_set"] == 6
    assert collections(store) == {"han-small": 300}  # the real one untouched, the scratch one gone


def test_check_against_a_named_collection_reads_it_and_writes_nothing(served, tiny_checkpoint):
    g, store, queries = served
    report = qdrant.main(["check", "--gallery", str(g.folder), "--path", str(store), "--checkpoint",
                          str(tiny_checkpoint), "--queries", str(queries), "--collection", "han-small", "-k", "5",
                          "--api-key", "s3cret-key"])  # local mode needs none; the report must not show it
    assert report["collection"] == "han-small" and report["items"] == 300 and report["same_set"] == 6
    assert "s3cret-key" not in json.dumps(report)
    assert collections(store) == {"han-small": 300}
    with pytest.raises(SystemExit, match="--items"):  # a subset cannot be compared with a whole collection
        qdrant.main(["check", "--gallery", str(g.folder), "--path", str(store), "--checkpoint",
                     str(tiny_checkpoint), "--queries", str(queries), "--collection", "han-small", "--items", "50"])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_api_key_reaches_the_server(served, how, monkeypatch):
    """--api-key (or QDRANT_API_KEY) is sent as Qdrant's api-key header; a stub server on loopback
    records what arrives."""
    import http.server
    import threading

    seen = []

    class Stub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("api-key"))
            self.send_response(401)
            self.send_header("content-length", "0")
            self.end_headers()

        do_PUT = do_POST = do_DELETE = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    g, _, _ = served
    args = ["upload", "--gallery", str(g.folder), "--url", f"http://127.0.0.1:{server.server_port}"]
    if how == "flag":
        args += ["--api-key", "s3cret-key"]
    else:
        monkeypatch.setenv("QDRANT_API_KEY", "s3cret-key")
    try:
        with pytest.raises(Exception):  # noqa: B017 (the stub refuses everything; the client raises its own transport errors)
            qdrant.main(args)
    finally:
        server.shutdown()
    assert seen and set(seen) == {"s3cret-key"}
