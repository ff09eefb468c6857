"""The Open Inference Protocol (v2) in the service: typed outputs, shared batches, v2 errors."""
import base64

import pytest

from handler.checkpoint import load_mrl_resnet50
from handler.oip import OUTPUTS
from handler.service import MRLService
from handler.thresholds import OperatingPoints


@pytest.fixture(scope="module")
def service(tiny_checkpoint):
    model, card = load_mrl_resnet50(tiny_checkpoint)
    points = OperatingPoints({"balanced": (0.3,) * 8, "exact": (None,) * 8}, "balanced", {})
    return MRLService(model, card, points, name="tiny", batch_sizes=(1, 4))


def v2(png: bytes, **body) -> dict:
    req = {"id": "r1", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(png).decode()]}]}
    req.update(body)
    return {"body": req}


def outputs(body: dict) -> dict:
    return {o["name"]: o for o in body["outputs"]}


def test_a_v2_request_gets_named_typed_outputs_and_the_same_answer_as_v1(service, gray_png):
    [(s1, want)] = service.handle([{"body": gray_png, "top_k": b"3"}])
    [(s2, got)] = service.handle([v2(gray_png, parameters={"top_k": 3, "return_embedding": True})])
    assert s1 == s2 == 200
    assert got["id"] == "r1" and got["model_name"] == "tiny"
    out = outputs(got)
    assert set(out) == set(OUTPUTS) - {"neighbor_ids", "neighbor_labels", "neighbor_scores"}  # no gallery
    assert all(o["datatype"] == OUTPUTS[n] and o["shape"] == [len(o["data"])] for n, o in out.items())
    assert out["label"]["data"] == [want["label"]] and out["class_index"]["data"] == [want["class_index"]]
    assert out["confidence"]["data"] == [want["confidence"]]
    assert out["embedding_dim"]["data"] == [want["embedding_dim"]]
    assert out["top_k_labels"]["data"] == [t["label"] for t in want["top_k"]]
    assert len(out["embedding"]["data"]) == want["embedding_dim"]
    assert got["parameters"] == {"sizes_tried": want["sizes_tried"], "operating_point": "balanced"}


def test_v1_and_v2_requests_share_a_batch(service, gray_png):
    items = [{"body": gray_png}, v2(gray_png, parameters={"dim": 64}), {"body": gray_png, "dim": b"64"},
             v2(gray_png, outputs=[{"name": "label"}, {"name": "embedding_dim"}])]
    (s0, a), (s1, b), (s2, c), (s3, d) = service.handle(items)
    assert s0 == s1 == s2 == s3 == 200
    assert outputs(b)["embedding_dim"]["data"] == [64] == [c["embedding_dim"]]
    assert outputs(b)["label"]["data"] == [c["label"]]
    assert [o["name"] for o in d["outputs"]] == ["label", "embedding_dim"]
    assert outputs(d)["label"]["data"] == [a["label"]]


def _bad(png: bytes) -> dict:
    good = v2(png)["body"]["inputs"][0]
    return {
        "wrong datatype": {"inputs": [{**good, "datatype": "FP32"}]},
        "wrong shape": {"inputs": [{**good, "shape": [2]}]},
        "missing input": {"inputs": []},
        "no inputs field": {"inputs": None},
        "two inputs": {"inputs": [good, good]},
        "bad base64": {"inputs": [{**good, "data": ["not base64 ☃"]}]},
        "not an image": {"inputs": [{**good, "data": [base64.b64encode(b"hello").decode()]}]},
        "unknown parameter": {"inputs": [good], "parameters": {"temperature": 2}},
        "parameter of the wrong type": {"inputs": [good], "parameters": {"top_k": "3"}},
        "bool for an int": {"inputs": [good], "parameters": {"dim": True}},
        "bad dim": {"inputs": [good], "parameters": {"dim": 7}},
        "unknown output": {"inputs": [good], "outputs": [{"name": "logits"}]},
        "unknown field": {"inputs": [good], "extra": 1},
    }


@pytest.mark.parametrize("case", list(_bad(b"x")))
def test_bad_v2_requests_get_a_v2_error_and_spare_the_batch(service, gray_png, case):
    bad = {"body": _bad(gray_png)[case]}
    results = service.handle([{"body": gray_png}, bad, v2(gray_png)])
    assert results[0][0] == 200 and results[2][0] == 200 and "outputs" in results[2][1]
    status, body = results[1]
    assert 400 <= status < 500 and set(body) == {"error"} and body["error"], (case, body)


def test_a_v2_body_without_a_json_content_type_is_still_v2(service, gray_png):
    """tritonclient sends no Content-Type: TorchServe then hands over the raw JSON bytes."""
    import json
    raw = json.dumps(v2(gray_png)["body"]).encode()
    [(status, body)] = service.handle([{"body": raw}])
    assert status == 200 and outputs(body)["label"]["data"]
