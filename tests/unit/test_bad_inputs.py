"""The bad-input corpus (tests/corpus.py) through MRLService in-process.

Every case alone gets exactly its status and error body; all refusals mixed into one batch leave
the valid requests in it untouched; EXIF rotation and GIF frames are honoured pixel for pixel; the
error counter counts each refusal once, under its reason.
"""
from __future__ import annotations

import base64
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from handler.checkpoint import IMAGENET_PREPROCESSING, load_mrl_resnet50
from handler.errors import ERROR_REASONS, InputError
from handler.metrics import PrometheusSink
from handler.preprocess import crop_image, decode_image
from handler.service import MRLService
from handler.thresholds import OperatingPoints
from tests.corpus import cases, encode, images

CASES = cases()
REFUSALS = [c for c in CASES if not c.ok]
MODEL_NAME = "tiny"


def build_service(checkpoint, sink=None) -> MRLService:
    model, card = load_mrl_resnet50(checkpoint)
    points = OperatingPoints({"balanced": (0.5,) * 8, "exact": (None,) * 8}, "balanced",
                             {"nesting": list(card.nesting)})
    return MRLService(model, card, points, name=MODEL_NAME, graph="eager", batch_sizes=(1,), sink=sink)


@pytest.fixture(scope="module")
def service(tiny_checkpoint) -> MRLService:
    return build_service(tiny_checkpoint)


def check_refusal(case, status: int, body: dict) -> None:
    assert status in case.statuses, f"{case.name}: got {status} {body}"
    assert set(body) == {"code", "type", "message"}, body
    assert type(body["code"]) is int and body["code"] == status
    assert body["type"] == InputError("", reason=case.reason).error_type, body
    assert case.message_contains in body["message"], body["message"]
    json.dumps(body)  # the adapter sends it as JSON


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_case_alone_gets_exactly_its_status(service, case):
    [(status, body)] = service.handle([case.item], [case.headers])
    if not case.ok:
        check_refusal(case, status, body)
        return
    assert status == 200, body
    assert body["label"] == service.card.classes[body["class_index"]]
    assert 0.0 <= body["confidence"] <= 1.0
    assert body["embedding_dim"] in service.nesting and body["sizes_tried"][-1] == body["embedding_dim"]
    json.dumps(body)


def valid_requests() -> list[tuple[dict, dict]]:
    """Three valid requests through three channels, with options that differ per request."""
    img = images()
    return [
        ({"body": img["png"]}, {}),
        ({"body": img["jpeg"]}, {"X-MRL-Dim": "16", "X-MRL-Return-Embedding": "1"}),
        ({"body": {"data": base64.b64encode(img["gif_animated"]).decode(), "operating_point": "exact",
                   "top_k": 3}}, {}),
    ]


def test_refusals_in_one_batch_leave_valid_requests_untouched(service):
    valid = valid_requests()
    alone = [service.handle([item], [headers])[0] for item, headers in valid]
    assert [status for status, _ in alone] == [200, 200, 200]

    # Valid requests first, in the middle and last; every refusal around them.
    slots = {0: 0, len(REFUSALS) // 2 + 1: 1, len(REFUSALS) + 2: 2}
    requests, refusals = [], iter(REFUSALS)
    for position in range(len(REFUSALS) + 3):
        if position in slots:
            requests.append(valid[slots[position]])
        else:
            case = next(refusals)
            requests.append((case.item, case.headers))
    results = service.handle([item for item, _ in requests], [headers for _, headers in requests])

    assert len(results) == len(requests)
    refusals = iter(REFUSALS)
    for position, (status, body) in enumerate(results):
        if position not in slots:
            check_refusal(next(refusals), status, body)
            continue
        expected = alone[slots[position]][1]
        assert status == 200, body
        assert body["label"] == expected["label"]
        assert body["confidence"] == pytest.approx(expected["confidence"], abs=1e-5)
        assert body["embedding_dim"] == expected["embedding_dim"]
        assert body["sizes_tried"] == expected["sizes_tried"]
        assert body["operating_point"] == expected["operating_point"]
        assert [t["label"] for t in body["top_k"]] == [t["label"] for t in expected["top_k"]]
        assert ("embedding" in body) == ("embedding" in expected)
        if "embedding" in body:
            assert body["embedding"] == pytest.approx(expected["embedding"], abs=1e-4)


def decoded_like_the_server(jpeg: bytes, mode: str) -> np.ndarray:
    """The JPEG's pixels as the server decodes them: libjpeg converting to the model's colour mode."""
    img = Image.open(io.BytesIO(jpeg))
    img.draft(mode, None)
    return np.asarray(img.convert(mode))


@pytest.mark.parametrize("spec_name", ["demo", "imagenet"])
def test_exif_orientation_6_crop_equals_the_physically_rotated_image(service, spec_name):
    spec = service.card.preprocessing if spec_name == "demo" else IMAGENET_PREPROCESSING
    tagged, plain = images()["jpeg_exif_rotated"], images()["jpeg"]
    assert Image.open(io.BytesIO(tagged)).getexif()[0x0112] == 6
    # Same entropy-coded data, so the same pixels: only the EXIF block differs.
    assert np.array_equal(decoded_like_the_server(tagged, "RGB"), decoded_like_the_server(plain, "RGB"))

    # Orientation 6: the stored pixels are shown turned 90 degrees clockwise.
    rotated = np.rot90(decoded_like_the_server(plain, spec.color_mode), k=-1)
    assert rotated.shape[:2] == (40, 30)
    reference = crop_image(decode_image(encode(Image.fromarray(np.ascontiguousarray(rotated)), "PNG")), spec)
    got = crop_image(decode_image(tagged), spec)
    assert got.shape == reference.shape
    # The crop is turned after it is resampled (the full-size image is never copied to turn it):
    # Pillow resamples rows then columns, rounding in between, so a turn swaps where it rounds.
    diff = np.abs(got.astype(int) - reference)
    assert diff.max() <= 1, (diff.max(), diff.mean())  # 12 % of values off by 1 here (ImageNet crop)
    assert not np.array_equal(got, crop_image(decode_image(plain), spec))  # the tag changed something


@pytest.mark.parametrize("spec_name", ["demo", "imagenet"])
def test_animated_gif_is_classified_by_its_first_frame(service, spec_name):
    spec = service.card.preprocessing if spec_name == "demo" else IMAGENET_PREPROCESSING
    gif = Image.open(io.BytesIO(images()["gif_animated"]))
    assert gif.n_frames == 3
    frames = []
    for i in range(2):
        gif.seek(i)
        frames.append(encode(gif.convert("RGB"), "PNG"))
    got = crop_image(decode_image(images()["gif_animated"]), spec)
    assert np.array_equal(got, crop_image(decode_image(frames[0]), spec))
    assert not np.array_equal(got, crop_image(decode_image(frames[1]), spec))


def test_error_counter_counts_each_refusal_once_by_reason(tiny_checkpoint):
    registry = CollectorRegistry()
    service = build_service(tiny_checkpoint, sink=PrometheusSink(registry))
    # Refusals one per call, the valid cases as one batch (one forward pass keeps this quick);
    # the error counts do not depend on how requests were batched.
    statuses = [service.handle([case.item], [case.headers])[0][0] for case in REFUSALS]
    valid = [case for case in CASES if case.ok]
    statuses += [s for s, _ in service.handle([c.item for c in valid], [c.headers for c in valid])]

    def sample(name: str, **labels) -> float:
        return registry.get_sample_value(name, {"model_name": MODEL_NAME, **labels}) or 0.0

    expected = Counter(case.reason for case in REFUSALS)
    got = {reason: sample("mrl_request_errors_total", reason=reason) for reason in ERROR_REASONS}
    assert got == {reason: float(expected[reason]) for reason in ERROR_REASONS}
    assert sum(got.values()) == sum(1 for s in statuses if s != 200) == len(REFUSALS)
    assert sample("mrl_batches_total") == len(REFUSALS) + 1
    assert sample("mrl_batch_items_total") == len(CASES)
    answered = sum(s.value for metric in registry.collect() if metric.name == "mrl_cascade_exits"
                   for s in metric.samples if s.name == "mrl_cascade_exits_total")
    assert answered == len(valid) == statuses.count(200)


def test_corpus_is_broad_and_sendable_over_http():
    assert len(CASES) >= 30 and len(REFUSALS) >= 30
    assert {c.reason for c in REFUSALS} >= {"empty", "decode", "too_large", "bad_option", "bad_request"}
    for case in CASES:
        body, headers = case.to_http()
        assert isinstance(body, bytes) and all(isinstance(v, str) for v in headers.values())
        assert any(k.lower() == "content-type" for k in headers), case.name
