"""The serving pipeline in-process: responses, options, batching independence and exact metrics."""
import base64
import threading

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

import handler.preprocess as preprocess_module
from handler.checkpoint import load_mrl_resnet50
from handler.metrics import PrometheusSink
from handler.service import MRLService
from handler.thresholds import OperatingPoints
from tests.corpus import encode, gradient
from tests.unit.test_oip import v2

FIELDS = {"label", "class_index", "confidence", "embedding_dim", "sizes_tried", "operating_point", "top_k"}


@pytest.fixture(scope="module")
def registry():
    return CollectorRegistry()


@pytest.fixture(scope="module")
def service(tiny_checkpoint, registry):
    model, card = load_mrl_resnet50(tiny_checkpoint)
    points = OperatingPoints({"balanced": (0.3,) * 8, "exact": (None,) * 8}, "balanced", {})
    return MRLService(model, card, points, name="tiny", sink=PrometheusSink(registry))


def test_response_has_every_documented_field(service, gray_png):
    [(status, body)] = service.handle([{"body": gray_png}])
    assert status == 200 and FIELDS <= set(body)
    assert body["operating_point"] == "balanced"
    assert body["sizes_tried"][-1] == body["embedding_dim"]
    assert len(body["top_k"]) == 5 and body["top_k"][0]["label"] == body["label"]
    assert body["top_k"][0]["probability"] == pytest.approx(body["confidence"])
    assert "embedding" not in body


def test_options_from_fields_json_and_headers(service, gray_png):
    b64 = base64.b64encode(gray_png).decode()
    results = service.handle(
        [{"data": gray_png, "top_k": b"2", "dim": b"64"},
         {"body": {"data": b64, "top_k": 3, "return_embedding": True, "operating_point": "exact"}},
         {"body": gray_png}],
        [{}, {}, {"X-MRL-Dim": "16", "x-mrl-return-embedding": "1"}])
    (s1, a), (s2, b), (s3, c) = results
    assert (s1, s2, s3) == (200, 200, 200)
    assert (a["embedding_dim"], len(a["top_k"]), a["operating_point"]) == (64, 2, "fixed_dim")
    assert (b["embedding_dim"], len(b["top_k"]), len(b["embedding"])) == (2048, 3, 2048)
    assert b["sizes_tried"] == [2048] and b["operating_point"] == "exact"
    assert (c["embedding_dim"], len(c["embedding"])) == (16, 16)


@pytest.mark.parametrize("fields, message", [
    ({"dim": b"12"}, "dim=12 is not a nesting size"),
    ({"top_k": b"0"}, "top_k=0 is out of range; allowed: 1 to 10"),
    ({"operating_point": b"turbo"}, "operating_point='turbo' is unknown; allowed: balanced, exact"),
    ({"colour": b"red"}, "unknown option 'colour'"),
    ({"dim": b"64", "operating_point": b"exact"}, "not both"),
])
def test_bad_options_get_400_naming_the_value(service, gray_png, fields, message):
    [(status, body)] = service.handle([{"data": gray_png, **fields}])
    assert status == 400 and body["code"] == 400 and body["type"] == "InvalidOption"
    assert message in body["message"]


def test_one_bad_item_fails_alone(service, gray_png):
    alone = service.handle([{"body": gray_png}])[0][1]
    results = service.handle([{"body": gray_png}, {"body": b"\x89PNG\r\n\x1a\nbroken"}, {"body": gray_png}])
    assert [s for s, _ in results] == [200, 400, 200]
    for _status, body in (results[0], results[2]):
        assert body["label"] == alone["label"] and body["embedding_dim"] == alone["embedding_dim"]
        assert body["confidence"] == pytest.approx(alone["confidence"], abs=1e-5)


def test_an_unexpected_fault_reading_one_item_fails_that_item_alone(tiny_checkpoint, gray_png, monkeypatch):
    """A fault of ours (not InputError) while decoding one item answers that item 500, in its own
    protocol's form; the batch's other items are answered as they would be alone."""
    real = preprocess_module.crop_image

    def crop(img, spec, **kw):
        if img.size == (3, 5):
            raise RuntimeError("a decoder bug")
        return real(img, spec, **kw)

    monkeypatch.setattr(preprocess_module, "crop_image", crop)
    registry = CollectorRegistry()
    model, card = load_mrl_resnet50(tiny_checkpoint)
    svc = MRLService(model, card, OperatingPoints.fixed(card.nesting), name="m", sink=PrometheusSink(registry))
    odd = encode(Image.new("L", (3, 5), 128), "PNG")
    alone = svc.handle([{"body": gray_png}])[0][1]
    results = svc.handle([{"body": gray_png}, {"body": odd}, v2(odd), {"body": b""}, {"body": gray_png}])
    assert [s for s, _ in results] == [200, 500, 500, 400, 200]
    assert results[1][1]["code"] == 500 and results[1][1]["type"] == "InternalServerError"
    assert set(results[2][1]) == {"error"} and "server log" in results[2][1]["error"]
    for _, body in (results[0], results[4]):
        assert (body["label"], body["embedding_dim"]) == (alone["label"], alone["embedding_dim"])
        assert body["confidence"] == pytest.approx(alone["confidence"], abs=1e-5)
    errors = {r: registry.get_sample_value("mrl_request_errors_total", {"model_name": "m", "reason": r})
              for r in ("internal", "empty")}
    assert errors == {"internal": 2, "empty": 1}


def test_decoding_on_threads_answers_as_one_thread_and_keeps_large_images_to_the_caller(tiny_checkpoint,
                                                                                      monkeypatch):
    """decode_threads=2: a batch's small images are cropped half in the calling thread, half on the
    pool's, a large one in the calling thread after them (never two large images' pixels at once);
    too few pixels in all stay in the calling thread; every image is closed once cropped; the
    answers, and a truncated JPEG's 400, are those of one thread."""
    real, seen = preprocess_module.crop_image, []

    def crop(img, spec, **kw):
        seen.append((img, img.size, threading.current_thread().name.startswith("mrl-decode")))
        return real(img, spec, **kw)

    monkeypatch.setattr(preprocess_module, "crop_image", crop)
    monkeypatch.setattr(preprocess_module.BatchDecoder, "PARALLEL_PIXELS", 40 * 30)
    monkeypatch.setattr(preprocess_module.BatchDecoder, "PARALLEL_MIN_PIXELS", 4 * 40 * 30)
    model, card = load_mrl_resnet50(tiny_checkpoint)
    one, two = (MRLService(model, card, OperatingPoints.fixed(card.nesting), name="m", decode_threads=n)
                for n in (1, 2))
    small = [encode(gradient(seed=s), "JPEG") for s in range(3)]
    batch = [{"body": small[0]}, {"body": encode(gradient(80, 60), "PNG")}, {"body": small[1][:-100]},
             {"body": small[1]}, {"body": small[2]}]
    want = one.handle(batch)
    seen.clear()
    got = two.handle(batch)
    assert [s for s, _ in got] == [s for s, _ in want] == [200, 200, 400, 200, 200]
    assert "corrupt or truncated" in got[2][1]["message"]  # failed on a thread, not at the header
    for (_, a), (_, b) in zip(want, got):
        assert (a.get("label"), a.get("embedding_dim")) == (b.get("label"), b.get("embedding_dim"))
        assert a.get("confidence", 0) == pytest.approx(b.get("confidence", 0), abs=1e-6)
    where = [(size, pooled) for _, size, pooled in seen]
    assert sorted(where) == [((40, 30), False)] * 2 + [((40, 30), True)] * 2 + [((80, 60), False)]
    assert where[-1] == ((80, 60), False)  # after the small ones
    for img, *_ in seen:
        with pytest.raises(ValueError, match="closed"):
            img.im  # noqa: B018
    seen.clear()
    assert [s for s, _ in two.handle(batch[:3])] == [200, 200, 400]  # 2 small images: too few pixels
    assert not any(pooled for *_, pooled in seen)
    with pytest.raises(ValueError, match="decode_threads"):
        MRLService(model, card, OperatingPoints.fixed(card.nesting), decode_threads=0)


def test_a_failed_forward_answers_500_for_its_items_and_keeps_the_bad_items_400(tiny_checkpoint, gray_png,
                                                                                 monkeypatch):
    registry = CollectorRegistry()
    model, card = load_mrl_resnet50(tiny_checkpoint)
    svc = MRLService(model, card, OperatingPoints.fixed(card.nesting), name="m", sink=PrometheusSink(registry))

    def boom(batch):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(svc, "engine", boom)
    results = svc.handle([{"body": gray_png}, {"body": b""}, {"body": gray_png}])
    assert [s for s, _ in results] == [500, 400, 500]
    assert results[0][1] == {"code": 500, "type": "InternalServerError",
                             "message": "inference failed; the error is in the server log"}
    assert registry.get_sample_value("mrl_request_errors_total", {"model_name": "m", "reason": "internal"}) == 2


def test_urlencoded_body_is_refused_with_415(service, gray_png):
    [(status, body)] = service.handle([{"body": gray_png}], [{"Content-Type": "application/x-www-form-urlencoded"}])
    assert status == 415 and "curl -T" in body["message"]


def test_metrics_count_exactly(tiny_checkpoint, gray_png):
    registry = CollectorRegistry()
    model, card = load_mrl_resnet50(tiny_checkpoint)
    svc = MRLService(model, card, OperatingPoints.fixed(card.nesting), name="m", sink=PrometheusSink(registry))
    results = svc.handle([{"body": gray_png}, {"body": b""}, {"data": gray_png, "dim": b"8"}, {"body": gray_png}])
    assert [s for s, _ in results] == [200, 400, 200, 200]

    def value(name, **labels):
        return registry.get_sample_value(name, {"model_name": "m", **labels})

    assert value("mrl_cascade_exits_total", embedding_dim="2048", operating_point="fixed_2048") == 2
    assert value("mrl_cascade_exits_total", embedding_dim="8", operating_point="fixed_dim") == 1
    assert value("mrl_embedding_dims_total") == 2048 * 2 + 8
    assert value("mrl_request_errors_total", reason="empty") == 1
    assert value("mrl_batches_total") == 1 and value("mrl_batch_items_total") == 4
    assert value("mrl_exit_confidence_count") == 3
    assert value("mrl_stage_seconds_count", stage="forward") == 1
    assert value("mrl_cascade_escalations_total", from_dim="8") is None  # fixed points never escalate


def test_model_name_is_the_invocations_routing_key_not_an_option(gray_png):
    from handler.requests import parse_item

    kw = dict(nesting=(8, 2048), operating_points=("balanced",), default_point="balanced", num_classes=10)
    _, opts = parse_item({"body": gray_png, "model_name": b"m", "top_k": b"2"}, model_name="m", **kw)
    assert opts.top_k == 2
    from handler.errors import InputError
    with pytest.raises(InputError, match="unknown option 'model_name'"):
        parse_item({"body": gray_png, "model_name": b"other"}, model_name="m", **kw)


def test_disagreements_count_exactly_the_answers_that_differ_from_the_2048_head(tiny_checkpoint):
    """Counted per operating point; zero by construction for exact and for dim=2048."""
    import io

    import numpy as np
    from PIL import Image

    registry = CollectorRegistry()
    model, card = load_mrl_resnet50(tiny_checkpoint)
    # The random tiny model's 8-d head and 2048-d head disagree on nearly every image, and its
    # 8-d confidence lies around 0.22-0.29: this threshold sends about half of them on to 2048.
    spread = (0.26,) + (None,) * 7
    points = OperatingPoints({"balanced": spread, "exact": (None,) * 8}, "balanced", {})
    svc = MRLService(model, card, points, name="m", sink=PrometheusSink(registry), batch_sizes=(8,))
    rng = np.random.default_rng(7)
    pngs = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L").save(buf, "PNG")
        pngs.append(buf.getvalue())
    cascade, full, exact, fixed64 = [], [], [], []
    for i in range(0, 64, 8):
        chunk = pngs[i:i + 8]
        cascade += [b for _, b in svc.handle([{"body": p} for p in chunk])]
        full += [b for _, b in svc.handle([{"body": p, "dim": b"2048"} for p in chunk])]
        exact += [b for _, b in svc.handle([{"body": p, "operating_point": b"exact"} for p in chunk])]
        fixed64 += [b for _, b in svc.handle([{"body": p, "dim": b"64"} for p in chunk])]
    differ = sum(c["label"] != f["label"] for c, f in zip(cascade, full))
    differ64 = sum(c["label"] != f["label"] for c, f in zip(fixed64, full))
    assert 0 < differ < 64 and len({c["embedding_dim"] for c in cascade}) > 1  # a real mix

    def value(point):
        return registry.get_sample_value("mrl_cascade_disagreements_total",
                                         {"model_name": "m", "operating_point": point})

    assert value("balanced") == differ
    assert value("fixed_dim") == differ64  # dim=2048 adds 0, dim=64 its own disagreements
    assert value("exact") == 0.0  # emitted as an explicit zero


def test_the_alert_line_is_exported_beside_the_ratio(tiny_checkpoint, gray_png):
    registry = CollectorRegistry()
    model, card = load_mrl_resnet50(tiny_checkpoint)
    points = OperatingPoints({"balanced": (0.26,) + (None,) * 7, "exact": (None,) * 8}, "balanced", {},
                             alert_disagreement={"balanced": 0.012})
    svc = MRLService(model, card, points, name="m", sink=PrometheusSink(registry), batch_sizes=(8,))
    line = lambda p: registry.get_sample_value("mrl_disagreement_alert_ratio",  # noqa: E731
                                               {"model_name": "m", "operating_point": p})
    numerics = lambda: registry.get_sample_value("mrl_numerics_info",  # noqa: E731
                                                 {"model_name": "m", "numerics": svc.numerics})
    # Set at start, before any request: the dashboard's line and the numerics are there from the first scrape.
    assert line("balanced") == 0.012 and numerics() == 1
    assert line("exact") is None  # no line: the alert cannot fire for exact
    svc.handle([{"body": gray_png}, {"body": gray_png, "operating_point": b"exact"}])
    assert line("balanced") == 0.012 and line("exact") is None and numerics() == 1
