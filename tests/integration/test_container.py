"""The runtime image as KServe runs it (issue #32, acceptance 2 and 4).

`make image`'s script builds the image (a rebuild with unchanged inputs is the layer cache), the
bundled archives go to /mnt/models, and the container starts with the ServingRuntime's args under
the manifest's CPU and memory limits. Then: /ping, the README's curl for each model, tritonclient
v2 infer, every Open Inference Protocol route with its content, 60 s of 16 clients (no 5xx, peak
RSS within 80 % of the memory limit), and a worker killed with kill -9 that is replaced.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import http.client
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from handler.cpus import machine
from model_store.serve import EXAMPLES, ROOT
from tests import deps
from tests.integration.bundled import build_bundled, check_answer, curl

pytestmark = pytest.mark.integration
PORT, METRICS_PORT = 28080, 28082
LOAD_SECONDS = float(os.environ.get("MRL_CONTAINER_LOAD_SECONDS", 60))
RESULTS = Path(os.environ.get("MRL_CONTAINER_RESULTS", ROOT / "logs" / "container_check.json"))
BUILD: dict = {}
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / ".cache" / "image" / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, check=check,
                          timeout=timeout)


def runtime_container() -> dict:
    doc = yaml.safe_load((ROOT / "deploy" / "kserve" / "servingruntime.yaml").read_text())
    (container,) = doc["spec"]["containers"]
    return container


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for unit, factor in units.items():
        if quantity.endswith(unit):
            return int(float(quantity[: -len(unit)]) * factor)
    return int(quantity)


@pytest.fixture(scope="module")
def image() -> str:
    deps.need_binary("podman", "podman")
    deps.need_binary("mmdebstrap", "mmdebstrap")
    t0 = time.monotonic()
    out = subprocess.run([str(ROOT / "deploy" / "kserve" / "build-image.sh")], capture_output=True, text=True,
                         timeout=1500, env={**os.environ, "PY": str(Path(os.sys.executable))})
    assert out.returncode == 0, out.stderr[-3000:]
    BUILD["seconds"] = round(time.monotonic() - t0, 1)  # from nothing on a fresh machine, the cache after
    BUILD["log"] = [line for line in out.stderr.splitlines() if line.startswith(("base:", "wheelhouse:", "image:"))]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def models_dir():
    # The container's user (uid 1000) must read the archives: a folder outside pytest's 0700 tree.
    folder = Path(tempfile.mkdtemp(prefix="mrl-models-"))
    folder.chmod(0o755)
    build_bundled(folder)
    for mar in folder.iterdir():
        mar.chmod(0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


class Container:
    def __init__(self, name: str) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{PORT}"

    def pid(self) -> int:
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout)

    def processes(self) -> list[psutil.Process]:
        init = psutil.Process(self.pid())
        return [init] + init.children(recursive=True)

    def workers(self) -> list[psutil.Process]:
        """The live workers (a killed one is a zombie until the frontend reaps it)."""
        live = []
        for p in self.processes():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "model_service_worker" in " ".join(p.cmdline()):
                    live.append(p)
            except psutil.Error:
                pass
        return live

    def rss(self) -> int:
        """The container's processes' resident memory now, summed."""
        return sum(self._each(lambda p: p.memory_info().rss))

    def peak_rss_sum(self) -> int:
        """Each process's own peak (VmHWM), summed: at least the container's peak RSS."""
        def hwm(p: psutil.Process) -> int:
            status = Path(f"/proc/{p.pid}/status").read_text()
            return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) * 1024
        return sum(self._each(hwm))

    def _each(self, read) -> list[int]:
        """``read`` of every process of the container that is still there to be read."""
        values = []
        for p in self.processes():
            try:
                values.append(read(p))
            except (OSError, StopIteration, psutil.Error):
                pass
        return values

    def log(self) -> str:
        return podman("exec", self.name, "sh", "-c", "cat /home/mrl/logs/model_log.log", check=False).stdout

    def worker_threads(self, workers: int, timeout: float = 60) -> list[int]:
        """threads= of each worker's ready line (handler/ts_handler.py), once ``workers`` have
        logged one (the frontend writes its log buffered: the lines may trail readiness)."""
        deadline = time.monotonic() + timeout
        while True:
            threads = [int(line.split("threads=")[1].split()[0]) for line in self.log().splitlines()
                       if "mrl handler ready" in line]
            if len(threads) >= workers or time.monotonic() > deadline:
                return threads
            time.sleep(1)

    def get(self, path: str) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()


def start_container(image: str, models: Path, name: str, *, cpus: str, memory: str, args: list[str]) -> Container:
    podman("rm", "--force", "--ignore", name, check=False)
    podman("run", "--detach", "--name", name, "--cpus", cpus, "--memory", memory,
           "-p", f"127.0.0.1:{PORT}:8080", "-p", f"127.0.0.1:{METRICS_PORT}:8082",
           "-v", f"{models}:/mnt/models:ro", image, *args)
    c = Container(name)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if c.get("/v2/health/ready")[0] == 200:
                return c
        except (OSError, ValueError, http.client.HTTPException):
            pass
        assert podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true", \
            podman("logs", name, check=False).stderr[-3000:]
        time.sleep(1)
    raise AssertionError(f"{name} not ready after 300 s:\n{c.log()[-3000:]}")


@pytest.fixture(scope="module")
def served(image, models_dir):
    spec = runtime_container()
    limits = spec["resources"]["limits"]
    c = start_container(image, models_dir, "mrl-serve-test", cpus=str(limits["cpu"]), memory=limits["memory"],
                        args=spec["args"])
    c.worker_threads(4)  # every worker has loaded
    c.rss_at_start = c.rss()
    try:
        yield c
    finally:
        podman("rm", "--force", "--time", "20", c.name, check=False, timeout=60)


def triton_infer(url: str, model: str, image: Path):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    inp = httpclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([base64.b64encode(image.read_bytes())], dtype=np.object_), binary_data=False)
    return client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput(n, binary_data=False)
                                               for n in ("label", "embedding_dim")])


def test_ping_v1_and_v2_answer_for_both_models(served):
    assert served.get("/ping") == (200, {"status": "Healthy"})
    # The manifest's CPUs shared by each model's workers (two per archive), not the node's cores.
    cpus = int(float(runtime_container()["resources"]["limits"]["cpu"]))
    threads = served.worker_threads(4)
    assert len(threads) == 4 and set(threads) == {max(1, min(cpus, os.cpu_count()) // 2)}, threads
    for model in ("mrl_resnet50", "han1000"):
        status, body = curl(served.url, None, model)
        check_answer(model, status, body)
        res = triton_infer(served.url, model, ROOT / "examples" / EXAMPLES[model])
        label = res.as_numpy("label")[0]
        assert (label.decode() if isinstance(label, bytes) else label) == body["label"]
        assert int(res.as_numpy("embedding_dim")[0]) == body["embedding_dim"]


def test_every_oip_route_answers_with_its_content(served):
    import tritonclient.http as httpclient

    assert served.get("/v2/health/live") == (200, {"live": True})
    assert served.get("/v2/health/ready") == (200, {"ready": True})
    status, meta = served.get("/v2")
    assert status == 200 and meta["name"] == "torchserve" and meta["version"] == "0.12.0"
    assert "extensions" in meta
    client = httpclient.InferenceServerClient(served.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    for model in ("mrl_resnet50", "han1000"):
        assert served.get(f"/v2/models/{model}/ready") == (200, {"name": model, "ready": True})
        assert client.is_model_ready(model)
        meta = client.get_model_metadata(model)
        assert meta["name"] == model and meta["versions"] == ["1.0"]
        assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [1]}]
        outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
        assert outputs["label"] == ("BYTES", [1]) and outputs["embedding_dim"] == ("INT32", [1])
        assert outputs["top_k_probabilities"] == ("FP32", [-1])
    assert served.get("/v2/models/nope")[0] == 404
    assert served.get("/v2/models/nope/ready")[0] == 404


def test_sixteen_clients_for_a_minute_no_5xx_and_memory_within_the_limit(served):
    limit = memory_bytes(runtime_container()["resources"]["limits"]["memory"])
    images = {m: (ROOT / "examples" / EXAMPLES[m]).read_bytes() for m in EXAMPLES}
    statuses: dict[int, int] = {}
    peak = [served.rss()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], served.rss())
            time.sleep(0.5)

    def client(i: int) -> dict[int, int]:
        model = ("mrl_resnet50", "han1000")[i % 2]
        seen: dict[int, int] = {}
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        end = time.monotonic() + LOAD_SECONDS
        while time.monotonic() < end:
            conn.request("POST", f"/predictions/{model}", body=images[model])
            resp = conn.getresponse()
            resp.read()
            seen[resp.status] = seen.get(resp.status, 0) + 1
        conn.close()
        return seen

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        with cf.ThreadPoolExecutor(16) as pool:
            for seen in pool.map(client, range(16)):
                for k, v in seen.items():
                    statuses[k] = statuses.get(k, 0) + v
    finally:  # a failed client stops the sampler too, not the next module's tests
        stop.set()
        sampler.join()
    took = time.monotonic() - t0
    hwm = served.peak_rss_sum()
    record = {"load_s": round(took, 1), "clients": 16, "statuses": statuses,
              "requests_per_s": round(sum(statuses.values()) / took, 1),
              "rss_at_start_mib": round(served.rss_at_start / 2**20), "peak_rss_sampled_mib": round(peak[0] / 2**20),
              "peak_rss_hwm_sum_mib": round(hwm / 2**20), "limit_mib": round(limit / 2**20),
              "limits": runtime_container()["resources"]["limits"], "machine": machine(), "image": BUILD,
              "command": "pytest tests/integration/test_container.py (MRL_CONTAINER_RESULTS names this file)"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record))
    assert not any(k >= 500 for k in statuses), statuses
    assert statuses.get(200, 0) > 0
    assert hwm <= 0.8 * limit, record  # every process's own peak, summed: an upper bound


def test_a_worker_killed_with_kill_9_is_replaced(served):
    before = served.workers()
    victim = before[0]
    victim.kill()  # SIGKILL, as the OOM killer would
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pids = {p.pid for p in served.workers()}
        if victim.pid not in pids and len(pids) == len(before):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"worker {victim.pid} not replaced: {pids}")
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        codes = [curl(served.url, None, m)[0] for m in ("mrl_resnet50", "han1000")]
        if codes == [200, 200]:
            return
        time.sleep(1)
    raise AssertionError(f"models did not answer again after the kill: {codes}")


def test_under_one_cpu_no_worker_runs_more_than_one_thread(image, served):
    """The CPU quota, not the node's cores, sizes the workers' threads (handler/cpus.py): a
    one-worker archive, which takes every core without a quota (os.cpu_count() here), runs one
    thread under --cpus 1. And SIGTERM stops the container at once (tini passes it on)."""
    podman("rm", "--force", "--time", "20", served.name, check=False, timeout=60)
    from model_store.build_archive import archive
    from tests.integration.bundled import MODELS

    folder = Path(tempfile.mkdtemp(prefix="mrl-models-1w-"))
    folder.chmod(0o755)
    ckpt, thr = MODELS["mrl_resnet50"]
    archive(ckpt, folder, thresholds=thr, name="mrl_resnet50", graph="eager", workers=1).chmod(0o644)
    c = start_container(image, folder, "mrl-serve-test-1cpu", cpus="1", memory="4g",
                        args=runtime_container()["args"])
    try:
        threads = c.worker_threads(1)
        assert threads == [1], c.log()[-3000:]
        t0 = time.monotonic()
        podman("stop", "--time", "30", c.name, timeout=60)
        assert time.monotonic() - t0 < 25  # SIGTERM stops it; no wait for the kill
    finally:
        podman("rm", "--force", c.name, check=False)
        shutil.rmtree(folder, ignore_errors=True)

