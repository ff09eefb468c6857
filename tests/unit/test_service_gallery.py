"""Neighbors requests in the service: a gallery of the tiny model's own embeddings, v1 and v2
answers, the funnel's stages, the refusals, and the metrics."""
import base64
import re

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.gallery import Gallery
from handler.metrics import PrometheusSink
from handler.service import MRLService
from handler.thresholds import OperatingPoints
from retrieval.gallery import build
from tests.conftest import encode

N = 60


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [encode(Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L")) for _ in range(N)]


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    model, card = load_mrl_resnet50(tiny_checkpoint)
    return model, card, OperatingPoints({"balanced": (0.3,) * 8}, "balanced", {})


@pytest.fixture(scope="module")
def gallery(parts, images, tiny_checkpoint, tmp_path_factory):
    plain = MRLService(*parts)
    emb = np.array([body["embedding"] for _, body in plain.handle(
        [{"body": b, "dim": b"2048", "return_embedding": b"1"} for b in images])], dtype=np.float32)
    labels = np.arange(N) % 10
    folder = tmp_path_factory.mktemp("gallery")
    build(folder, emb, labels, np.arange(N) + 1000, {"checkpoint_sha256": file_sha256(tiny_checkpoint),
                                                    "spec": "synthetic"}, hnsw_m=None)
    return Gallery.open(folder, checkpoint_sha256=file_sha256(tiny_checkpoint))


@pytest.fixture(scope="module")
def registry():
    return CollectorRegistry()


@pytest.fixture(scope="module")
def service(parts, gallery, registry):
    return MRLService(*parts, name="tiny", gallery=gallery, sink=PrometheusSink(registry))


@pytest.mark.parametrize("funnel", ["rerank", "rerank16", "funnel", "exact"])
def test_an_image_in_the_gallery_finds_itself_first(service, images, funnel):
    [(status, body)] = service.handle([{"body": images[17], "neighbors": b"5", "funnel": funnel.encode()}])
    assert status == 200, body
    top = body["neighbors"][0]
    assert len(body["neighbors"]) == 5 and top["id"] == 1017 and top["score"] == pytest.approx(1.0, abs=2e-3)
    assert top["label"] == service.card.classes[17 % 10]
    assert [n["score"] for n in body["neighbors"]] == sorted((n["score"] for n in body["neighbors"]), reverse=True)
    assert body["retrieval"]["funnel"] == funnel and body["retrieval"]["stages"][-1]["kept"] == 5
    assert body["label"] and body["embedding_dim"]  # the classification answer is still there


def test_a_named_funnel_serves_any_k_up_to_the_gallery(service, images):
    [(status, body)] = service.handle([{"body": images[2], "neighbors": b"60", "funnel": b"funnel"}])
    assert status == 200 and len(body["neighbors"]) == 60 and body["neighbors"][0]["id"] == 1002
    assert len({n["id"] for n in body["neighbors"]}) == 60  # the whole gallery, each item once


def test_a_batch_mixes_neighbors_requests_and_plain_ones(service, images):
    results = service.handle([{"body": images[3], "neighbors": b"2"}, {"body": images[4]},
                              {"body": images[5], "neighbors": b"3", "funnel": b"exact"}])
    assert [s for s, _ in results] == [200, 200, 200]
    assert [len(b.get("neighbors", [])) for _, b in results] == [2, 0, 3]
    assert [b["neighbors"][0]["id"] for _, b in (results[0], results[2])] == [1003, 1005]


def test_v2_parameters_and_outputs(service, images):
    req = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                       "data": [base64.b64encode(images[9]).decode()]}], "parameters": {"neighbors": 4}}
    [(status, body)] = service.handle([{"body": req}])
    out = {o["name"]: o for o in body["outputs"]}
    assert status == 200 and out["neighbor_ids"]["data"][0] == 1009 and out["neighbor_scores"]["shape"] == [4]
    assert out["neighbor_labels"]["datatype"] == "BYTES" and body["parameters"]["retrieval"]["funnel"] == "rerank"


@pytest.mark.parametrize("fields, message", [
    ({"neighbors": b"0"}, "neighbors=0 is out of range; allowed: 1 to 60"),
    ({"neighbors": b"61"}, "neighbors=61 is out of range; allowed: 1 to 60 .the gallery holds 60 items"),
    ({"neighbors": b"3", "funnel": b"hnsw"}, "funnel='hnsw' is unknown; allowed: rerank, rerank16, funnel, exact"),
    ({"funnel": b"exact"}, "funnel applies to a neighbors request"),
    ({"neighbors": b"two"}, "neighbors='two' is not an integer"),
])
def test_bad_neighbors_requests_get_400_naming_the_value(service, images, fields, message):
    [(status, body)] = service.handle([{"body": images[0], **fields}])
    assert status == 400 and body["type"] == "InvalidOption", body
    assert re.search(message, body["message"]), body["message"]


def test_neighbors_without_a_gallery_is_a_clear_400(parts, images):
    [(status, body)] = MRLService(*parts).handle([{"body": images[0], "neighbors": b"3"}])
    assert status == 400 and "this model has none" in body["message"]


def test_retrieval_metrics_count_queries_and_stage_sizes(service, images, registry):
    def value(name, **labels):
        return registry.get_sample_value(name, {"model_name": "tiny", **labels}) or 0.0
    before = (value("mrl_retrieval_queries_total", funnel="rerank"),
              value("mrl_retrieval_candidates_total", funnel="rerank", dim="32"))
    service.handle([{"body": images[i], "neighbors": b"3"} for i in range(4)])
    assert value("mrl_retrieval_queries_total", funnel="rerank") - before[0] == 4
    # the first stage scores the whole gallery (60 < the 200 shortlist) for each of the 4 queries
    assert value("mrl_retrieval_candidates_total", funnel="rerank", dim="32") - before[1] == 4 * N


def test_the_request_parser_names_exactly_the_served_search_methods():
    """handler.requests keeps its own list (parsing needs no FAISS): it must not drift from search's."""
    from handler.requests import FUNNELS
    from handler.search import METHODS
    assert set(FUNNELS) == set(METHODS) - {"hnsw"}


def test_a_failed_search_fails_its_own_item_alone(service, images, monkeypatch):
    """A fault while searching for one request answers that request 500; the batch's plain
    classifications and its other neighbors requests are answered as they would be alone."""
    import handler.search as search_module
    from handler.gallery import normalize

    [(_, probe)] = service.handle([{"body": images[5], "dim": b"2048", "return_embedding": b"1"}])
    poison = normalize(np.asarray([probe["embedding"]], dtype=np.float32))[0]
    real = search_module.search

    def search(gallery, queries, k, method="rerank", **kw):
        if np.any(np.all(np.isclose(normalize(queries), poison, atol=1e-5), axis=1)):
            raise RuntimeError("a search bug on this one query")
        return real(gallery, queries, k, method, **kw)

    monkeypatch.setattr(search_module, "search", search)
    items = [{"body": images[3], "neighbors": b"2"}, {"body": images[4]},
             {"body": images[5], "neighbors": b"3"}, {"body": images[6], "neighbors": b"2", "funnel": b"exact"}]
    results = service.handle(items)
    assert [s for s, _ in results] == [200, 200, 500, 200], [b for _, b in results]
    assert results[2][1]["type"] == "InternalServerError"
    assert [b["neighbors"][0]["id"] for _, b in (results[0], results[3])] == [1003, 1006]
    alone = service.handle([items[1]])[0][1]
    assert (results[1][1]["label"], results[1][1]["embedding_dim"]) == (alone["label"], alone["embedding_dim"])
    assert "neighbors" not in results[1][1]


def test_each_answer_describes_its_own_search(service, images):
    """Two requests of one funnel with different k in one batch: each gets the neighbours, stages and
    MFLOPs it gets alone, not those of a search run for the other's k."""
    items = [{"body": images[3], "neighbors": b"2", "funnel": b"funnel"},
             {"body": images[8], "neighbors": b"60", "funnel": b"funnel"}]
    together = service.handle(items)
    for item, (status, body) in zip(items, together):
        [(_, alone)] = service.handle([item])
        assert status == 200
        assert body["retrieval"] == alone["retrieval"]
        assert [n["id"] for n in body["neighbors"]] == [n["id"] for n in alone["neighbors"]]
    assert together[0][1]["retrieval"]["stages"][-1]["kept"] == 2


def test_exact_search_is_refused_above_the_servers_bound(parts, gallery, images):
    """funnel=exact scans the whole gallery: above the server's bound it is a 400 naming the bound
    and the setting, and the other requests of the batch are answered."""
    bounded = MRLService(*parts, name="tiny", gallery=gallery, exact_max_items=59)
    results = bounded.handle([{"body": images[1], "neighbors": b"3", "funnel": b"exact"},
                              {"body": images[1], "neighbors": b"3"}])
    assert [s for s, _ in results] == [400, 200]
    body = results[0][1]
    assert body["type"] == "InvalidOption" and body["code"] == 400
    assert "funnel=exact scans all 60 gallery items; this server allows it up to 59" in body["message"]
    assert "exact_max_items" in body["message"]
    [(status, v2body)] = bounded.handle([{"body": {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                               "data": [base64.b64encode(images[1]).decode()]}],
                                                   "parameters": {"neighbors": 3, "funnel": "exact"}}}])
    assert status == 400 and "allows it up to 59" in v2body["error"]
    enabled = MRLService(*parts, name="tiny", gallery=gallery, exact_max_items=60)
    assert enabled.handle([{"body": images[1], "neighbors": b"3", "funnel": b"exact"}])[0][0] == 200


def test_exact_search_has_a_default_bound(parts, gallery):
    from handler.service import EXACT_MAX_ITEMS
    assert MRLService(*parts, gallery=gallery).exact_max_items == EXACT_MAX_ITEMS == 10_000


def test_a_rebuilt_gallery_is_served_from_the_next_batch(parts, gallery, images, tiny_checkpoint, tmp_path):
    """A rebuild into the served folder is picked up between batches, whole: the new ids, labels and
    vectors together; a rebuild from another checkpoint is refused and the old gallery kept."""
    folder = tmp_path / "served"
    emb = np.asarray(gallery.vectors, dtype=np.float32)
    sha = file_sha256(tiny_checkpoint)
    build(folder, emb, np.arange(N) % 10, np.arange(N) + 1000, {"checkpoint_sha256": sha, "spec": "a"}, hnsw_m=None)
    svc = MRLService(*parts, name="tiny", gallery=Gallery.open(folder, checkpoint_sha256=sha),
                     checkpoint_sha256=sha)
    ask = [{"body": images[7], "neighbors": b"3"}]
    assert svc.handle(ask)[0][1]["neighbors"][0]["id"] == 1007
    build(folder, emb[:40], (np.arange(40) + 1) % 10, np.arange(40) + 9000, {"checkpoint_sha256": sha, "spec": "b"},
          hnsw_m=None)
    [(status, body)] = svc.handle(ask)
    top = body["neighbors"][0]
    assert status == 200 and (top["id"], top["label"]) == (9007, svc.card.classes[8]) and len(svc.gallery) == 40
    assert svc.handle([{"body": images[7], "neighbors": b"41"}])[0][0] == 400  # the new size bounds k
    build(folder, emb, np.arange(N) % 10, np.arange(N), {"checkpoint_sha256": "other", "spec": "c"}, hnsw_m=None)
    [(status, body)] = svc.handle(ask)
    assert status == 200 and body["neighbors"][0]["id"] == 9007  # refused (logged): the old one still serves
