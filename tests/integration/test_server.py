"""The product's front door, through a real TorchServe: curl-style calls, batching, bad items, tokens."""
import concurrent.futures as cf
import re

import pytest
import torch

from bench.client import run_load
from handler.checkpoint import load_mrl_resnet50
from handler.service import MRLService
from handler.thresholds import load_thresholds
from handler.checkpoint import file_sha256

pytestmark = pytest.mark.integration
FIELDS = {"label", "class_index", "confidence", "embedding_dim", "sizes_tried", "operating_point", "top_k"}


def test_a_curl_style_request_gets_every_documented_field(tiny_server, test_images):
    r = tiny_server.client().predict(test_images[0], {"Content-Type": "image/png", "X-MRL-Top-K": "3",
                                                      "X-MRL-Return-Embedding": "true"})
    assert r.status == 200, r.body
    assert FIELDS | {"embedding"} <= set(r.body)
    assert len(r.body["top_k"]) == 3 and len(r.body["embedding"]) == r.body["embedding_dim"]
    assert r.body["operating_point"] == "balanced"


def test_200_images_from_8_clients_match_the_in_process_cascade(tiny_server, tiny_checkpoint, tiny_thresholds,
                                                               test_images):
    before = tiny_server.scrape()
    results = run_load(tiny_server.client(), test_images, concurrency=8, count=200)
    assert [r.status for r in results] == [200] * 200
    model, card = load_mrl_resnet50(tiny_checkpoint)
    points = load_thresholds(tiny_thresholds, nesting=card.nesting, checkpoint_sha256=file_sha256(tiny_checkpoint),
                             numerics=card.numerics)
    local = MRLService(model, card, points, batch_sizes=(8,))
    expected = []
    for i in range(0, 200, 8):
        expected += local.handle([{"body": b} for b in test_images[i:i + 8]])
    for r, (status, body) in zip(results, expected):
        assert (r.body["label"], r.body["embedding_dim"]) == (body["label"], body["embedding_dim"])
    assert len({r.body["embedding_dim"] for r in results}) > 1  # the thresholds spread the exits
    after = tiny_server.scrape()
    batches = _counter(after, "mrl_batches_total") - _counter(before, "mrl_batches_total")
    items = _counter(after, "mrl_batch_items_total") - _counter(before, "mrl_batch_items_total")
    assert items == 200 and batches < 200, (items, batches)  # dynamic batching formed batches > 1


def test_one_corrupt_among_seven_valid(tiny_server, test_images):
    pids = tiny_server.worker_pids()
    client = tiny_server.client()
    bodies = test_images[:7] + [test_images[0][:40]]
    alone = [client.predict(b).body for b in test_images[:7]]
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client.predict, bodies))
    assert [r.status for r in results[:7]] == [200] * 7
    assert 400 <= results[7].status < 500
    assert set(results[7].body) == {"code", "type", "message"} and results[7].body["type"] == "UndecodableImage"
    for r, a in zip(results[:7], alone):
        assert (r.body["label"], r.body["embedding_dim"]) == (a["label"], a["embedding_dim"])
    assert tiny_server.worker_pids() == pids


@pytest.mark.parametrize("token", [None, "not-the-token", "management"])
def test_requests_without_the_inference_token_are_refused(tiny_server, test_images, token):
    r = tiny_server.client(token=token).predict(test_images[0])
    assert r.status in (400, 401, 403) and "Token Authorization failed" in r.body["message"]


def _counter(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_an_official_format_checkpoint_serves_224_jpegs(tmp_path_factory):
    """Random weights in the official RAIVNLab layout (DDP prefix, BlurPool, nine MRL heads)."""
    import io

    import numpy as np
    from PIL import Image

    from handler.checkpoint import imagenet_classes
    from tests.integration.server import running_server
    from tests.unit.test_checkpoint import official_state

    tmp = tmp_path_factory.mktemp("official")
    torch.save(official_state("mrl"), tmp / "mrl_r50_official.pt")
    rng = np.random.default_rng(0)
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(jpeg, "JPEG", quality=90)
    with running_server(tmp / "ts", tmp / "mrl_r50_official.pt", batch_size=2, batch_delay=5) as server:
        r = server.client().predict(jpeg.getvalue(), {"Content-Type": "image/jpeg", "X-MRL-Top-K": "3"})
    assert r.status == 200, r.body
    assert r.body["operating_point"] == "fixed_2048" and r.body["embedding_dim"] == 2048
    assert r.body["label"] in imagenet_classes() and len(r.body["top_k"]) == 3
