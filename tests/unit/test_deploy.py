"""deploy/kserve: the KServe kinds against KServe v0.20.0's own CRDs (tests/data, unmodified), with every
object closed where the schema does not preserve unknown fields, and the built-in kinds with
kubernetes-validate --strict. A broken manifest must fail both ways: the validators bite."""
import copy
import functools
import hashlib
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kserve"
CRDS = ROOT / "tests" / "data" / "kserve-crds-v0.20.0"  # from KServe's config/crd/full at v0.20.0
CRD_SHA256 = {
    "serving.kserve.io_inferenceservices.yaml": "57c3bf13f77de94678bf2ae3748056ec071ad2b9e88d6a28f44fb4710758fcff",
    "serving.kserve.io_servingruntimes.yaml": "380a3e1e1444cef9b8b88819596692728868205a2147dc66423be469a4a7bbb1",
}
KUBERNETES_VERSION = "1.34.0"  # the oldest release kubernetes-validate 1.37 ships schemas for


def documents() -> list[dict]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML


def strict(schema: dict) -> dict:
    """The CRD's schema with objects closed: additionalProperties false wherever properties are
    listed and neither additionalProperties nor x-kubernetes-preserve-unknown-fields opens them."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    close(schema)
    return schema


@functools.cache
def crd_validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=LOADER)
        if crd["spec"]["names"]["kind"] == kind:
            (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
            schema = strict(v["schema"]["openAPIV3Schema"])
            # OpenAPI v3 schemas are Draft 4 JSON Schema with extensions (nullable, x-kubernetes-*).
            jsonschema.Draft4Validator.check_schema(schema)
            return jsonschema.Draft4Validator(schema)
    raise LookupError(kind)


def validate_kserve(doc: dict) -> None:
    group, version = doc["apiVersion"].split("/")
    assert group == "serving.kserve.io"
    # metadata is ObjectMeta, which CRD schemas leave to the API server: check its own shape here.
    assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}
    crd_validator(doc["kind"], version).validate({k: v for k, v in doc.items() if k != "metadata"})


def validate_builtin(doc: dict) -> None:
    import kubernetes_validate
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def as_pod(runtime: dict) -> dict:
    """The runtime's containers are core/v1 Containers: check them as a Pod's, strictly."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "mrl-serve-runtime"},
            "spec": {"containers": runtime["spec"]["containers"]}}


def test_the_crds_are_kserves_unmodified():
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in CRDS.glob("*.yaml")} == CRD_SHA256


def test_every_manifest_validates():
    docs = documents()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["InferenceService", "NetworkPolicy", "PodDisruptionBudget", "ServingRuntime"]
    for doc in docs:
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            validate_kserve(doc)
        else:
            validate_builtin(doc)
    (runtime,) = [d for d in docs if d["kind"] == "ServingRuntime"]
    validate_builtin(as_pod(runtime))


def test_runtime_and_service_agree():
    docs = {d["kind"]: d for d in documents()}
    runtime, isvc = docs["ServingRuntime"], docs["InferenceService"]
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert isvc["spec"]["predictor"]["scaleMetric"] == "concurrency"
    (container,) = runtime["spec"]["containers"]
    port = container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": port}
    ts_config = dict(line.split("=", 1) for line in (DEPLOY / "config.properties").read_text().splitlines()
                     if line and not line.startswith("#"))
    assert ts_config["inference_address"].endswith(f":{port}")
    assert ts_config["metrics_address"].endswith(":" + runtime["metadata"]["annotations"]["prometheus.kserve.io/port"])
    assert ts_config["ts_open_inference_protocol"] == "true"
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == {
        "serving.kserve.io/inferenceservice": isvc["metadata"]["name"]}


def test_a_drain_can_take_a_replica_and_only_the_ingress_reaches_the_port():
    """Issue #33 item 8: minAvailable 1 over minReplicas 1 allowed no disruption (kubectl drain
    hung); the pod listens on every interface with auth at the ingress, so a NetworkPolicy admits
    only the ingress path to the inference port and Prometheus to the metrics port."""
    docs = {d["kind"]: d for d in documents()}
    predictor = docs["InferenceService"]["spec"]["predictor"]
    pdb = docs["PodDisruptionBudget"]["spec"]
    allowed = pdb["maxUnavailable"] if "maxUnavailable" in pdb else predictor["minReplicas"] - pdb["minAvailable"]
    assert allowed >= 1 and predictor["minReplicas"] >= 2  # a drain proceeds, and one replica keeps serving
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"] == pdb["selector"] and policy["policyTypes"] == ["Ingress"]
    (container,) = docs["ServingRuntime"]["spec"]["containers"]
    ports = {p: [r for r in policy["ingress"] if p in [q["port"] for q in r["ports"]]]
             for p in (container["ports"][0]["containerPort"], 8082)}
    for port, rules in ports.items():
        assert rules, f"port {port} admits nobody"
        for rule in rules:  # every source is a named namespace: no empty (match-all) selector
            assert all(src["namespaceSelector"]["matchLabels"] for src in rule["from"]), rule
    assert "env" not in container or "OMP_NUM_THREADS" not in [e["name"] for e in container["env"]]


def _broken(kind: str, break_it) -> dict:
    (doc,) = [d for d in documents() if d["kind"] == kind]
    doc = copy.deepcopy(doc)
    break_it(doc)
    return doc


@pytest.mark.parametrize("name,kind,break_it", [
    ("unknown field in the predictor", "InferenceService",
     lambda d: d["spec"]["predictor"].update(scaleTraget=4)),
    ("scale metric not in the enum", "InferenceService",
     lambda d: d["spec"]["predictor"].update(scaleMetric="latency")),
    ("protocol versions not a list", "ServingRuntime",
     lambda d: d["spec"].update(protocolVersions="v2")),
    ("model format without a name", "ServingRuntime",
     lambda d: d["spec"]["supportedModelFormats"][0].pop("name")),
    ("misspelled container field", "ServingRuntime",
     lambda d: d["spec"]["containers"][0].update(readinesProbe={})),
])
def test_a_broken_kserve_manifest_fails(name, kind, break_it):
    with pytest.raises(jsonschema.ValidationError):
        validate_kserve(_broken(kind, break_it))


def test_a_broken_builtin_manifest_fails():
    import kubernetes_validate
    pdb = _broken("PodDisruptionBudget", lambda d: d["spec"].update(minAvailabe=1))
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(pdb)
    runtime = _broken("ServingRuntime", lambda d: d["spec"]["containers"][0]["resources"].update(request={}))
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_builtin(as_pod(runtime))


def test_the_kubernetes_validate_cli_agrees(tmp_path):
    """The command-line tool the issue names, on the files as shipped and on a broken copy."""
    cli = [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION]
    builtin = [d for d in documents() if not d["apiVersion"].startswith("serving.kserve.io/")]
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump_all(builtin))
    ok = subprocess.run(cli + [str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_broken("PodDisruptionBudget", lambda d: d["spec"].update(minAvailabe=1))))
    failed = subprocess.run(cli + [str(bad)], capture_output=True, text=True)
    assert failed.returncode != 0 and "minAvailabe" in failed.stdout + failed.stderr


def test_the_image_runs_workers_and_logs_as_make_serve_does():
    """The Dockerfile's ENV is model_store/serve.py's SERVER_ENV, and it starts TorchServe with the
    project's log configuration, as make serve does."""
    import re
    import shlex

    from model_store.serve import LOG_CONFIG, SERVER_ENV

    text = (DEPLOY / "Dockerfile").read_text()
    env = dict(kv.split("=", 1) for line in re.findall(r"^ENV (.*)$", text, re.M) for kv in shlex.split(line))
    assert env.pop("PATH").startswith("/opt/mrl/bin:")  # the runtime's virtual environment
    assert env == SERVER_ENV
    assert f"monitoring/{LOG_CONFIG.name}" in text and f'"--log-config", "/srv/mrl-serve/{LOG_CONFIG.name}"' in text


def test_the_manifests_are_sized_from_the_measured_container():
    """Issue #32: requests and limits come from the image's measured peak RSS (test_container.py's
    record in docs/results/container.json, both bundled archives at their default workers, 60 s of 16
    clients) plus the stated headroom: limit = peak / 0.8, rounded up to 512 MiB; requests = limits."""
    import json
    import math

    record = json.loads((ROOT / "docs" / "results" / "container.json").read_text())
    want_mib = math.ceil(record["peak_rss_hwm_sum_mib"] / 0.8 / 512) * 512
    docs = {d["kind"]: d for d in documents()}
    (container,) = docs["ServingRuntime"]["spec"]["containers"]
    for resources in (container["resources"], docs["InferenceService"]["spec"]["predictor"]["model"]["resources"]):
        assert resources["limits"] == resources["requests"] == {"cpu": record["limits"]["cpu"], "memory": f"{want_mib}Mi"}
    assert record["limits"] == container["resources"]["limits"]  # measured under these very limits
    assert not any(int(k) >= 500 for k in record["statuses"])
