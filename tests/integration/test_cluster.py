"""Three real TorchServe replicas behind a real HAProxy gateway (model_store/cluster.py): API keys at
the gateway, health checks, one whole instance killed with SIGKILL under 16-client load, and one
real Prometheus scraping every replica, with every dashboard query answered per instance and summed.

The model is the suite's tiny random MRL ResNet50 with thresholds that spread exits over sizes, so
that escalations, every exit size and errors show up on each replica."""
import datetime
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from client.http import Client, run_load
from model_store import cluster as cl
from model_store.serve import describe, read_keys
from monitoring import prometheus
from monitoring.queries import dashboard_queries
from tests import deps
from tests.integration.server import ROOT, build_archive, prom_query
from tests.integration.test_metrics import send_mix

pytestmark = pytest.mark.integration
KEY = "test-key-" + "k" * 24
COMMA_KEY = "test,key," + "c" * 24  # commas are allowed in keys (api_keys refuses only spaces)
PROM_PORT = 19093


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_checkpoint, tiny_thresholds, tiny_gallery):
    deps.need_binary("haproxy", "haproxy")
    tmp = tmp_path_factory.mktemp("cluster")
    store = tmp / "model_store"
    store.mkdir()
    # Every dashboard panel needs data: a gallery (neighbors requests) and one capture folder that
    # the three replicas share.
    build_archive(tiny_checkpoint, store, thresholds=tiny_thresholds, gallery_dir=tiny_gallery,
                  capture_dir=tmp / "capture")
    keys = tmp / "api_keys"
    keys.write_text(f"# test keys\n{KEY}\n{COMMA_KEY}\n")
    c = cl.Cluster(home=tmp / "cluster", replicas=3, gateway_port=18090, base_port=18100,
                   base_worker_port=19500)
    # A keys.acl left world-readable by an earlier run: rewriting it must make it 0600 again.
    (c.home / "gateway").mkdir(parents=True)
    (c.home / "gateway" / "keys.acl").write_text("stale\n")
    (c.home / "gateway" / "keys.acl").chmod(0o644)
    try:
        cl.start(c, ["mrl_resnet50"], keys, model_store=store, load_models="mrl_resnet50.mar", timeout=240)
        yield c, store
    finally:
        cl.stop(c)


@dataclass
class Gateway:
    cluster: cl.Cluster

    def client(self) -> Client:
        return Client(self.cluster.gateway, KEY)


@pytest.fixture(scope="module")
def cluster_prometheus(cluster, tmp_path_factory, prometheus_installed):
    c, _ = cluster
    data = tmp_path_factory.mktemp("prom-cluster")
    prometheus.start(c.home / "prometheus.yml", data, port=PROM_PORT)
    try:
        yield
    finally:
        prometheus.stop(data)


def _image() -> bytes:
    return (ROOT / "examples" / "ankle_boot.png").read_bytes()


def _served(c) -> dict[str, int]:
    return {name: int(row["stot"]) for name, row in cl.gateway_stats(c).items()}


def _access_lines(c) -> int:
    """Requests other than HAProxy's health checks (GET /ping every second) in TorchServe's logs."""
    return sum(sum('"POST ' in line for line in (r.home / "logs" / "access_log.log").read_text().splitlines())
               for r in c.members)


def test_the_gateway_answers_like_one_server_and_spreads_the_load(cluster):
    c, _ = cluster
    before = _served(c)
    results = run_load(Client(c.gateway, KEY), [_image()], concurrency=4, count=60)
    assert {r.status for r in results} == {200}
    assert len({(r.body["label"], r.body["embedding_dim"]) for r in results}) == 1  # one image, one answer
    after = _served(c)
    assert sorted(after) == ["replica0", "replica1", "replica2"]
    assert all(after[n] > before[n] for n in after), (before, after)


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key-" + "x" * 20, f"Bearer {KEY}x", KEY])
def test_no_key_or_a_wrong_key_is_401_at_the_gateway(cluster, auth):
    c, _ = cluster
    before, lines = _served(c), _access_lines(c)
    client = Client(c.gateway, None)
    r = client.predict(_image(), headers={"Authorization": auth} if auth else None)
    assert r.status == 401 and r.body["code"] == 401 and "API key" in r.body["message"]
    time.sleep(0.5)
    assert _served(c) == before and _access_lines(c) == lines  # it never reached TorchServe


@pytest.mark.parametrize("auth", [f"bearer {KEY}", f"BEARER  {KEY}", f"Bearer {COMMA_KEY}"])
def test_the_scheme_is_case_insensitive_and_a_key_may_hold_commas(cluster, auth):
    """RFC 7235: the auth scheme is case-insensitive; HAProxy's req.hdr() would split the header
    at its commas, so a key with commas never matched."""
    c, _ = cluster
    r = Client(c.gateway, None).predict(_image(), headers={"Authorization": auth})
    assert r.status == 200, (auth, r.status, r.body)


def test_the_gateway_keys_file_is_0600_whatever_its_mode_was(cluster):
    c, _ = cluster
    acl = c.home / "gateway" / "keys.acl"
    assert acl.stat().st_mode & 0o777 == 0o600
    assert KEY in acl.read_text() and "stale" not in acl.read_text()


def _call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _grpc_status(port: int, method: str, request: bytes = b"", key: str | None = None):
    """A unary gRPC call with a hand-encoded request (TorchServe ships no Python stubs)."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            call(request, timeout=10, metadata=[("authorization", f"Bearer {key}")] if key else None)
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def _predictions_request(model: str, image: bytes) -> bytes:
    """PredictionsRequest{model_name=model, input={"data": image}} in protobuf wire format."""
    def field(number: int, payload: bytes) -> bytes:
        n, varint = len(payload), b""
        while True:
            varint += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                break
        return bytes([number << 3 | 2]) + varint + payload
    return field(1, model.encode()) + field(3, field(1, b"data") + field(2, image))


@pytest.mark.parametrize("auth", [None, f"Bearer {KEY}"])
def test_a_replica_refuses_direct_calls_without_its_own_key(cluster, auth):
    """Issue #33 item 2: anyone on the machine reached a replica's inference, management and gRPC
    ports without a key (token auth was off inside). The gateway's key opens nothing there either;
    metrics stay readable for Prometheus."""
    c, _ = cluster
    r = c.replica(0)
    headers = {"Authorization": auth} if auth else {}
    png = headers | {"Content-Type": "application/octet-stream"}
    assert _call(f"{r.url('inference')}/predictions/mrl_resnet50", "POST", _image(), png) == 400
    assert _call(f"{r.url('inference')}/v2/models/mrl_resnet50/ready", headers=headers) == 400
    assert _call(f"{r.url('management')}/models/mrl_resnet50", headers=headers) == 400
    assert _call(f"{r.url('management')}/models/mrl_resnet50?min_worker=0", "PUT", headers=headers) == 400
    key = auth and auth.split()[1]
    inference = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
    management = "/org.pytorch.serve.grpc.management.ManagementAPIsService/"
    denied = __import__("grpc").StatusCode.PERMISSION_DENIED
    assert _grpc_status(r.port("grpc_inference"), inference + "Predictions",
                        _predictions_request("mrl_resnet50", _image()), key) == denied
    assert _grpc_status(r.port("grpc_management"), management + "ListModels", b"", key) == denied
    assert _call(f"{r.url('metrics')}/metrics") == 200
    workers = describe("mrl_resnet50", read_keys(r.home)["management"], r.url("management"))["workers"]
    assert len(workers) == 1  # the PUT above scaled nothing down


def test_every_v2_path_reaches_the_replicas_with_their_credentials(cluster):
    """The gateway forwards any /v2/... path with the chosen replica's own key: each answers as the
    replica itself answers a caller that holds the key (model metadata and readiness included,
    whatever TorchServe serves there)."""
    import base64

    c, _ = cluster
    auth = {"Authorization": f"Bearer {KEY}"}
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(_image()).decode()]}]}).encode()
    assert _call(f"{c.gateway}/v2/models/mrl_resnet50/infer", "POST", body,
                 auth | {"Content-Type": "application/json"}) == 200
    r = c.replica(0)
    own = {"Authorization": "Bearer " + read_keys(r.home)["inference"]}
    for path in ("/v2", "/v2/models/mrl_resnet50", "/v2/models/mrl_resnet50/ready", "/v2/health/ready"):
        assert _call(c.gateway + path, headers=auth) == _call(r.url("inference") + path, headers=own), path
    assert _call(c.gateway + "/v2", headers=auth) == 200


def test_health_answers_without_a_key(cluster):
    c, _ = cluster
    for path in ("/ping", "/v2/health/ready"):
        with urllib.request.urlopen(c.gateway + path, timeout=5) as resp:
            assert resp.status == 200


def test_a_slow_client_is_cut_off_by_the_gateway(cluster):
    """Slow-loris: a request head that never completes gets 408 after HAProxy's 10 s, and the
    replicas never see it."""
    import socket

    c, _ = cluster
    before = _access_lines(c)
    with socket.create_connection(("127.0.0.1", c.gateway_port), timeout=30) as s:
        s.sendall(b"POST /predictions/mrl_resnet50 HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no end of head
        t0 = time.monotonic()
        reply = s.recv(4096)
        waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert 9 <= waited <= 15, waited
    assert _access_lines(c) == before


def test_a_killed_replica_costs_at_most_its_in_flight_requests_and_rejoins(cluster):
    c, store = cluster
    victim = c.replica(1)
    client = Client(c.gateway, KEY, timeout=30)
    out: dict = {}

    def load():
        out["results"] = run_load(client, [_image()], concurrency=16, duration=25)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(8)
    in_flight = int(cl.gateway_stats(c)[victim.name]["scur"])
    killed_at = time.monotonic()
    pids = cl.kill_replica(victim)
    down_at = cl.wait_status(c, victim.name, "DOWN")
    t.join()
    results = out["results"]
    failed = [r for r in results if r.status != 200]
    print(f"killed {victim.name} (pids {pids}) with {in_flight} requests in flight; HAProxy marked it "
          f"down {down_at - killed_at:.2f} s later; {len(results)} requests, {len(failed)} failed")
    assert len(pids) >= 2  # the frontend and its worker
    assert len(failed) <= in_flight
    assert all(r.finished <= down_at for r in failed)
    assert sum(r.status == 200 for r in results if r.finished > down_at) > 0  # the others carried on

    cl.start_replica(c, victim, store, ["mrl_resnet50"], timeout=240, load_models="mrl_resnet50.mar")
    cl.wait_status(c, victim.name, "UP")
    before = _served(c)[victim.name]
    assert {r.status for r in run_load(client, [_image()], concurrency=4, count=60)} == {200}
    assert _served(c)[victim.name] > before


def test_keys_appear_in_no_log(cluster):
    c, _ = cluster
    replica_keys = [read_keys(r.home)["inference"].encode() for r in c.members]
    secret_files = {c.home.parent / "api_keys", c.home / "gateway" / "keys.acl",
                    c.home / "gateway" / "replica_keys.map"} | {r.home / "key_file.json" for r in c.members}
    for p in secret_files - {c.home.parent / "api_keys"}:
        assert p.stat().st_mode & 0o777 == 0o600, p
    for r in c.members:  # TorchServe's default of 60 minutes would lock the gateway out after an hour
        expires = json.loads((r.home / "key_file.json").read_text())["inference"]["expiration time"]
        assert datetime.datetime.fromisoformat(expires.replace("Z", "+00:00")).year >= time.gmtime().tm_year + 5
    logs = [p for p in c.home.rglob("*") if p.is_file() and p not in secret_files and p.suffix != ".sock"]
    assert any(p.name == "haproxy.log" for p in logs) and any(p.name == "access_log.log" for p in logs)
    for p in logs:
        text = p.read_bytes()
        assert KEY.encode() not in text and not any(k in text for k in replica_keys), p


def test_one_prometheus_config_lists_every_replica(cluster):
    c, _ = cluster
    text = (c.home / "prometheus.yml").read_text()
    for r in c.members:
        assert f"127.0.0.1:{r.port('metrics')}" in text and f'replica: "{r.name}"' in text


def test_every_dashboard_query_has_data_per_instance_and_summed(cluster, cluster_prometheus, test_images):
    c, _ = cluster
    gateway = Gateway(c)
    instances = [f"127.0.0.1:{r.port('metrics')}" for r in c.members]
    pending = {inst: dashboard_queries(variables={"instance": inst}) for inst in instances + [".+"]}
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        send_mix(gateway, test_images)  # successes at several sizes, escalations, every error reason
        run_load(gateway.client(), test_images, concurrency=4, count=40)
        for inst in list(pending):
            pending[inst] = [q for q in pending[inst] if not prom_query(PROM_PORT, q)["data"]["result"]]
            if not pending[inst]:
                del pending[inst]
    assert not pending, f"dashboard queries without data: {pending}"
    (by_instance,) = [q for q in dashboard_queries() if q.startswith("sum by (instance)")]
    series = prom_query(PROM_PORT, by_instance)["data"]["result"]
    assert sorted(s["metric"]["instance"] for s in series) == sorted(instances)
    replicas = prom_query(PROM_PORT, "count by (replica) (up == 1)")["data"]["result"]
    assert sorted(s["metric"]["replica"] for s in replicas) == [r.name for r in c.members]


def test_tritonclient_through_the_gateway_sees_the_model_ready_and_its_metadata(cluster):
    """Issue #32, acceptance 3, through the replica gateway: the OIP agent's model routes answer on
    every replica, and the gateway forwards them with the caller's gateway key."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from handler.oip import model_metadata

    c, _ = cluster
    client = httpclient.InferenceServerClient(c.gateway.removeprefix("http://"))
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.is_server_live(headers=auth) and client.is_server_ready(headers=auth)
    for _ in range(3):  # leastconn spreads these over the replicas
        assert client.is_model_ready("mrl_resnet50", headers=auth)
        meta = client.get_model_metadata("mrl_resnet50", headers=auth)
        assert meta["name"] == "mrl_resnet50" and meta["inputs"] == model_metadata(gallery=True)["inputs"]
        assert meta["outputs"] == model_metadata(gallery=True)["outputs"]
    assert not client.is_model_ready("no_such_model", headers=auth)
    with pytest.raises(InferenceServerException, match="401"):
        client.get_model_metadata("mrl_resnet50")  # no key: 401 at the gateway
