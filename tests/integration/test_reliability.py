"""Reliability and safe defaults against a real TorchServe serving the demo model.

Load length is bounded: MRL_LOAD_SECONDS (default 10 in CI; the report uses 60). Figures are
written to MRL_RELIABILITY_OUT (a JSON file) when that is set.
"""
import concurrent.futures as cf
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from bench import recovery
from client.http import run_load
from model_store.serve import start, stop
from tests.corpus import cases
from tests.integration.server import PORTS, ROOT, running_server

pytestmark = pytest.mark.integration
DEMO = ROOT / "model_store" / "fashion_mnist"
FIGURES: dict = {}


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    ckpt = DEMO / "mrl_resnet50_fp16.pt"
    assert ckpt.exists(), f"the bundled checkpoint {ckpt} is missing from the checkout"
    thresholds = DEMO / "thresholds.json"
    with running_server(tmp_path_factory.mktemp("demo"), ckpt, thresholds=thresholds if thresholds.exists() else None,
                        batch_size=8, batch_delay=5, graph=os.environ.get("MRL_TEST_GRAPH", "jit")) as server:
        yield server
    if os.environ.get("MRL_RELIABILITY_OUT"):
        Path(os.environ["MRL_RELIABILITY_OUT"]).write_text(json.dumps(FIGURES, indent=2) + "\n")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def test_corpus_over_http_alone_and_mixed_with_valid_images(demo_server, test_images):
    pid = demo_server.worker_pids()
    client = demo_server.client()
    outcomes = {}
    for case in cases():
        body, headers = case.to_http()
        r = client.predict(body, headers)
        outcomes[case.name] = r.status
        assert r.status in case.statuses, (case.name, r.status, r.body)
        if r.status >= 400:
            assert {"code", "type", "message"} <= set(r.body) and r.body["message"], (case.name, r.body)
    solo = [client.predict(b).body for b in test_images[:7]]
    refused = [c for c in cases() if not c.ok]
    with cf.ThreadPoolExecutor(8) as pool:
        for case in refused:
            body, headers = case.to_http()
            futures = [pool.submit(client.predict, b) for b in test_images[:7]]
            bad = pool.submit(client.predict, body, headers)
            assert bad.result().status in case.statuses, case.name
            for f, s in zip(futures, solo):
                r = f.result()
                assert r.status == 200 and (r.body["label"], r.body["embedding_dim"]) == (s["label"], s["embedding_dim"])
    assert demo_server.worker_pids() == pid
    FIGURES["corpus"] = {"kinds": len(outcomes), "refused": sum(s >= 400 for s in outcomes.values()),
                         "classified": sum(s == 200 for s in outcomes.values()), "worker_pid_unchanged": True}


def test_body_over_max_request_size_is_refused(demo_server):
    r = demo_server.client().predict(b"\xff" * (8 * 1024 * 1024 + 1))
    assert r.status == 413


def test_sustained_load_has_no_5xx_and_bounded_memory(demo_server, test_images):
    seconds = float(os.environ.get("MRL_LOAD_SECONDS", 10))
    client, [pid] = demo_server.client(), demo_server.worker_pids()
    run_load(client, test_images, concurrency=32, duration=min(5.0, seconds / 2))  # warm-up
    rss_before = rss_kib(pid)
    results = run_load(client, test_images, concurrency=32, duration=seconds, count=200_000)
    rss_after = rss_kib(pid)
    lat = np.array([r.seconds for r in results]) * 1000
    fig = {"seconds": seconds, "clients": 32, "requests": len(results),
           "status_5xx": sum(r.status >= 500 or r.status == 0 for r in results),
           "non_200": sum(r.status != 200 for r in results), "p50_ms": float(np.percentile(lat, 50)),
           "p99_ms": float(np.percentile(lat, 99)), "rss_before_mib": rss_before / 1024,
           "rss_after_mib": rss_after / 1024, "rss_growth": rss_after / rss_before - 1}
    FIGURES["load"] = fig
    print(json.dumps(fig))
    assert fig["status_5xx"] == 0 and fig["non_200"] == 0
    assert fig["rss_growth"] < 0.10


def test_killed_worker_is_restarted_and_nothing_hangs(demo_server, test_images):
    """One worker (the suite's servers run one): its in-flight batch fails, the rest waits for the
    restarted worker, whose graph comes from the first one's cache."""
    client = demo_server.client(timeout=60)
    expected = [(b["label"], b["embedding_dim"]) for b in (client.predict(x).body for x in test_images)]
    logs = demo_server.root / "logs"
    offsets = {"model": (logs / "model_log.log").stat().st_size, "ts": (logs / "ts_log.log").stat().st_size}
    row = recovery.one_kill(client, demo_server.keys["management"], test_images, expected, 8, 20.0, logs,
                            offsets, demo_server.management)
    print(json.dumps(row))
    assert row["recovery_s"] is not None, "no request sent after the kill was answered"
    assert all(s >= 500 for s in map(int, row["failed_statuses"])), row["failed_statuses"]
    assert row["failed"] <= 8  # the batch in flight on the dead worker, no more
    assert row["wrong_answers"] == 0
    assert row["slowest_s"] < 30 + 5  # the response timeout, plus slack: nothing hung
    assert row["new_worker"]["graph_cached"]  # the restart loaded the frozen graph, traced nothing
    FIGURES["fault"] = {key: row[key] for key in ("recovery_s", "longest_gap_s", "requests", "failed", "slowest_s")}


def test_ports_are_bound_to_loopback_only(demo_server):
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # Java listens on IPv6 sockets
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A":  # LISTEN
                addr, port = local.split(":")
                listening.setdefault(int(port, 16), set()).add(addr)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::ffff:127.0.0.1
    for port in PORTS.values():
        assert listening.get(port) and listening[port] <= loopback, (port, listening.get(port))


def test_model_registration_api_is_off(demo_server):
    req = urllib.request.Request(f"{demo_server.management}/models?url=evil.mar", method="POST",
                                 headers={"Authorization": f"Bearer {demo_server.keys['management']}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert 400 <= err.value.code < 500


def test_logs_hold_no_request_bodies_or_tokens(demo_server):
    marker = "SECRET-BODY-MARKER-7f3a"
    demo_server.client().predict(marker.encode(), {"Content-Type": "text/plain"})
    demo_server.client().predict(json.dumps({"data": marker}).encode(), {"Content-Type": "application/json"})
    time.sleep(1)
    logs = "".join(p.read_text(errors="replace") for p in (demo_server.root / "logs").glob("*.log"))
    assert marker not in logs
    for token in demo_server.keys.values():
        assert token not in logs


def test_whole_server_restart_gives_the_same_answers(demo_server, test_images):
    """Stop TorchServe entirely and start it again from the same archive and config (last in this
    module: the other tests share the server). New tokens, new worker; the same answers."""
    before = [demo_server.client().predict(b).body for b in test_images[:32]]
    [old_pid] = demo_server.worker_pids()
    stop(demo_server.root)
    t0 = time.monotonic()
    start(demo_server.model, 240, root=demo_server.root, config=demo_server.root / "config.properties",
          model_store=demo_server.root / "model_store", management=demo_server.management)
    ready = time.monotonic() - t0
    assert demo_server.worker_pids() != [old_pid]
    after = [demo_server.client().predict(b).body for b in test_images[:32]]
    for a, b in zip(after, before):
        assert (a["label"], a["embedding_dim"], a["sizes_tried"]) == (b["label"], b["embedding_dim"], b["sizes_tried"])
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)
    FIGURES["restart"] = {"ready_s": ready, "requests_compared": len(after)}
    print(json.dumps(FIGURES["restart"]))
