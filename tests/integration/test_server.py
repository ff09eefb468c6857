"""The product's front door, through a real TorchServe: curl-style calls, batching, bad items, tokens."""
import concurrent.futures as cf
import json
import re
import time

import pytest
import torch

from client.http import run_load
from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.service import MRLService
from handler.thresholds import load_thresholds

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
    for r, (_status, body) in zip(results, expected):
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


@pytest.mark.parametrize("route", ["/models/{m}/invoke?top_k=2&dim=64", "/invocations?model_name={m}&top_k=2&dim=64"])
def test_query_string_options_where_torchserve_passes_them(tiny_server, test_images, route):
    """/invoke and /invocations hand query parameters to the handler; they act as headers do."""
    client = tiny_server.client()
    want = client.predict(test_images[3], {"X-MRL-Top-K": "2", "X-MRL-Dim": "64"})
    got = client.predict(test_images[3], path=route.format(m=tiny_server.model))
    assert want.status == got.status == 200, got.body
    assert got.body == want.body and got.body["embedding_dim"] == 64 and len(got.body["top_k"]) == 2
    bad_header = client.predict(test_images[3], {"X-MRL-Top-K": "many"})
    bad_query = client.predict(test_images[3], path=route.format(m=tiny_server.model).replace("top_k=2", "top_k=many"))
    assert bad_query.status == bad_header.status == 400
    assert bad_query.body == bad_header.body and "top_k='many' is not an integer" in bad_query.body["message"]


def test_predictions_drops_the_query_string_so_the_header_is_the_way(tiny_server, test_images):
    """Documented, not wished away: TorchServe drops ?top_k=... on /predictions before the handler."""
    r = tiny_server.client().predict(test_images[3], path=f"/predictions/{tiny_server.model}?top_k=2")
    assert r.status == 200 and len(r.body["top_k"]) == 5


def test_a_rotated_inference_key_is_renewed_by_the_documented_command(tiny_server, test_images):
    """make token (serve.renew_key) trades the non-expiring API key for a new inference key."""
    from model_store.serve import renew_key

    old = tiny_server.keys["inference"]
    assert tiny_server.client().predict(test_images[0]).status == 200
    new = renew_key("inference", root=tiny_server.root, management=tiny_server.management)
    assert new != old and tiny_server.keys["inference"] == new  # key_file.json holds the new one
    stale = tiny_server.client(token=old).predict(test_images[0])
    assert stale.status == 400 and "InvalidKeyException" in json.dumps(stale.body)
    assert tiny_server.client(token=new).predict(test_images[0]).status == 200


def test_the_folder_client_agrees_with_the_servers_counters(tiny_server, tmp_path):
    """1,000 exported test images through `python -m client.classify`: its share per size equals
    the delta of the server's mrl_cascade_exits_total counters for those requests."""
    import time

    from client.classify import main as classify_main
    from imagedata.specs import fashion_mnist
    from tests.integration.test_metrics import delta

    data = fashion_mnist("test")
    for i in range(1000):
        img, label = data[i]
        (tmp_path / str(label)).mkdir(exist_ok=True)
        img.save(tmp_path / str(label) / f"{i:05d}.png")
    before = tiny_server.scrape()
    rows = tmp_path.parent / f"{tmp_path.name}-answers.jsonl"
    # "--token=KEY": a key may start with "-", which argparse would take for an option
    summary = classify_main([str(tmp_path), "--url", tiny_server.inference, "--model", tiny_server.model,
                             "--token=" + tiny_server.keys["inference"], "--concurrency", "4", "--json",
                             "--out", str(rows)])
    time.sleep(1.5)  # the frontend applies metric lines shortly after the response
    exits = delta(tiny_server.scrape(), before, "mrl_cascade_exits_total", by="embedding_dim")
    assert summary["requests"] == summary["answered"] == summary["labelled"] == 1000
    assert {k: int(v) for k, v in exits.items()} == summary["exits"]
    assert len(summary["exits"]) > 1 and 0.0 <= summary["top1"] <= 1.0
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(lines) == 1000 and all(r["status"] == 200 for r in lines)
    per_dim: dict = {}
    for r in lines:
        per_dim[str(r["embedding_dim"])] = per_dim.get(str(r["embedding_dim"]), 0) + 1
    assert per_dim == summary["exits"]


def _triton(server):
    import tritonclient.http as httpclient

    return httpclient, httpclient.InferenceServerClient(url=server.inference.removeprefix("http://"))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # JSON BYTES come back as str


def _triton_infer(server, png: bytes, **kw):
    import base64

    import numpy as np

    httpclient, client = _triton(server)
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([base64.b64encode(png)], dtype=np.object_), binary_data=False)
    outs = [httpclient.InferRequestedOutput(n, binary_data=False)
            for n in ("label", "class_index", "confidence", "embedding_dim", "top_k_labels")]
    return client.infer(server.model, [inp], outputs=outs,
                        headers={"Authorization": f"Bearer {server.keys['inference']}"}, **kw)


def test_tritonclient_agrees_with_predictions_on_50_images(tiny_server, test_images):
    """The real tritonclient[http] over /v2/models/{m}/infer: same answers as /predictions."""
    client = tiny_server.client()
    for png in test_images[:50]:
        want = client.predict(png).body
        res = _triton_infer(tiny_server, png, parameters={"top_k": 3})
        assert _text(res.as_numpy("label")[0]) == want["label"]
        assert int(res.as_numpy("class_index")[0]) == want["class_index"]
        assert int(res.as_numpy("embedding_dim")[0]) == want["embedding_dim"]
        assert abs(float(res.as_numpy("confidence")[0]) - want["confidence"]) <= 1e-6
        assert [_text(b) for b in res.as_numpy("top_k_labels")] == [t["label"] for t in want["top_k"][:3]]
        params = res.get_response()["parameters"]
        assert params == {"sizes_tried": want["sizes_tried"], "operating_point": want["operating_point"]}


def test_a_v2_request_in_a_batch_of_v1_requests(tiny_server, test_images):
    client = tiny_server.client()
    alone = [client.predict(b).body for b in test_images[:7]]
    with cf.ThreadPoolExecutor(8) as pool:
        v1 = [pool.submit(client.predict, b) for b in test_images[:7]]
        v2 = pool.submit(_triton_infer, tiny_server, test_images[0])
        results = [f.result() for f in v1]
        res = v2.result()
    assert [(r.body["label"], r.body["embedding_dim"]) for r in results] == \
        [(a["label"], a["embedding_dim"]) for a in alone]
    assert _text(res.as_numpy("label")[0]) == alone[0]["label"]


@pytest.mark.parametrize("case", ["wrong datatype", "wrong shape", "missing input", "two inputs", "bad base64",
                                  "unknown parameter", "parameter of the wrong type"])
def test_bad_v2_requests_get_a_v2_error_and_the_worker_lives(tiny_server, test_images, case):
    import http.client

    from tests.unit.test_oip import _bad

    pids = tiny_server.worker_pids()
    body = json.dumps(_bad(test_images[0])[case]).encode()
    host, port = tiny_server.inference.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", f"/v2/models/{tiny_server.model}/infer", body=body,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {tiny_server.keys['inference']}"})
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    assert 400 <= resp.status < 500 and set(doc) == {"error"} and doc["error"], (case, resp.status, doc)
    assert tiny_server.worker_pids() == pids


@pytest.mark.parametrize("path,key", [("/v2/health/live", "live"), ("/v2/health/ready", "ready")])
def test_v2_health_is_served_by_torchserve(tiny_server, path, key):
    import urllib.request

    req = urllib.request.Request(tiny_server.inference + path,
                                 headers={"Authorization": f"Bearer {tiny_server.keys['inference']}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200 and json.load(resp) == {key: True}


def test_tritonclient_sees_the_server_and_the_model_ready_and_the_models_metadata(tiny_server):
    """GET /v2/models/{m} and /v2/models/{m}/ready, which TorchServe 0.12 answers 404, through the
    OIP agent (model_store/java): what tritonclient and KServe call first (issue #32, acceptance 3)."""
    from handler.oip import OUTPUTS

    _, client = _triton(tiny_server)
    auth = {"Authorization": f"Bearer {tiny_server.keys['inference']}"}
    assert client.is_server_live(headers=auth) and client.is_server_ready(headers=auth)
    assert client.is_model_ready(tiny_server.model, headers=auth)
    assert not client.is_model_ready("no_such_model", headers=auth)
    meta = client.get_model_metadata(tiny_server.model, headers=auth)
    assert meta["name"] == tiny_server.model and meta["versions"] == ["1.0"]
    assert meta["platform"] == "pytorch_torchserve"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
    # The tiny server has a gallery: every output a request can get, neighbours included.
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == OUTPUTS
    assert client.get_server_metadata(headers=auth)["extensions"] == ["model_metadata", "model_ready"]
    with pytest.raises(Exception, match="not found"):
        client.get_model_metadata("no_such_model", headers=auth)


def test_the_frontend_jvm_runs_with_the_configured_options(tiny_server):
    """config.properties' vmargs (C1 only, serial GC: bench/server_tuning.py) reach the frontend's JVM."""
    from model_store.serve import config_vmargs

    # The OIP agent's jar is named relative to the root in config.properties, absolute elsewhere.
    vmargs = config_vmargs().split()
    assert vmargs, "config.properties sets no vmargs"
    frontends = _frontends()
    assert len(frontends) == 1, frontends
    assert set(vmargs) <= set(frontends[0]), (vmargs, frontends[0])


def test_the_frontend_logs_with_the_projects_configuration(tiny_server, test_images):
    """monitoring/log4j2.xml reaches the JVM: every request in the access log (written by log4j's
    own thread: config.properties' async_logging), none of TorchServe's per-request, per-batch,
    per-metric-line or DEBUG lines in ts_log.log, none of its worker's per-batch lines in
    model_log.log, and each line written once."""
    from model_store.serve import LOG_CONFIG

    frontend = next(argv for argv in _frontends())
    assert f"-Dlog4j.configurationFile=file://{LOG_CONFIG}" in frontend, frontend
    logs = tiny_server.root / "logs"
    before = (logs / "access_log.log").read_text().count('"POST /predictions/')
    client = tiny_server.client()
    for body in test_images[:8]:
        assert client.predict(body).status == 200
    deadline = time.monotonic() + 10  # log4j writes on its own thread's schedule
    while (logs / "access_log.log").read_text().count('"POST /predictions/') < before + 8:
        assert time.monotonic() < deadline, "access_log.log is missing requests"
        time.sleep(0.2)
    ts_log = (logs / "ts_log.log").read_text().splitlines()
    assert ts_log, "ts_log.log is empty"
    for noise in ("Sending response for jobId", "result=[METRICS]", "[DEBUG]",
                  "Looping backend response at", "Backend response time"):
        assert not any(noise in line for line in ts_log), noise
    model_log = (logs / "model_log.log").read_text()
    assert "mrl handler ready" in model_log  # the worker's own lines still arrive
    assert "Backend received inference at" not in model_log  # TorchServe's, once a batch: dropped
    # Logged once a start; TorchServe's own configuration writes every ts_log line twice.
    assert sum("Loading snapshot serializer plugin" in line for line in ts_log) == 1


def _frontends() -> list[list[str]]:
    from pathlib import Path

    out = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "org.pytorch.serve.ModelServer" in argv:
            out.append(argv)
    return out


# Last in this module: it starts its own TorchServe, and stopping it stops tiny_server too.
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


def test_the_archives_exact_bound_reaches_the_worker(tiny_checkpoint, tiny_thresholds, tiny_gallery, test_images,
                                                      tmp_path):
    """build_archive --exact-max-items lands in the handler block and ts_handler passes it on: on
    the 200-item gallery a bound of 100 refuses funnel=exact (400), the cascade funnel still answers."""
    from tests.integration.server import running_server

    with running_server(tmp_path, tiny_checkpoint, thresholds=tiny_thresholds, gallery_dir=tiny_gallery,
                        exact_max_items=100) as server:
        client = server.client()
        refused = client.predict(test_images[0], path=f"/models/{server.model}/invoke?neighbors=3&funnel=exact")
        assert refused.status == 400 and "up to 100" in refused.body["message"], refused.body
        ok = client.predict(test_images[0], path=f"/models/{server.model}/invoke?neighbors=3")
        assert ok.status == 200 and len(ok.body["neighbors"]) == 3
