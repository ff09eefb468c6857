"""Recovery with the default worker count: two workers per model (docs/reliability.md has the
figures behind the choice, from bench/recovery.py). A module of its own: it starts its own
server, which the other modules' servers must not share a TorchServe pid file with.
"""
import json

import pytest

from bench import recovery
from tests.integration.server import ROOT, running_server

pytestmark = pytest.mark.integration
DEMO = ROOT / "model_store" / "fashion_mnist"


def test_with_two_workers_a_killed_worker_costs_only_its_in_flight_requests(tmp_path, test_images):
    """The default archive runs two workers (docs/reliability.md): the other one answers on."""
    with running_server(tmp_path, DEMO / "mrl_resnet50_fp16.pt", thresholds=DEMO / "thresholds.json",
                        batch_size=8, batch_delay=5, graph="jit", workers=2) as server:
        client = server.client(timeout=60)
        expected = [(b["label"], b["embedding_dim"]) for b in (client.predict(x).body for x in test_images)]
        assert len(server.worker_pids()) == 2
        logs = server.root / "logs"
        row = recovery.one_kill(client, server.keys["management"], test_images, expected, 8, 12.0, logs,
                                {"model": 0, "ts": 0}, server.management)
    print(json.dumps(row))
    assert row["failed"] <= 8 and all(s >= 500 for s in map(int, row["failed_statuses"]))
    assert all(t < 1.0 for t in row["failed_finished_after_kill_s"])  # at the kill, none later
    assert row["recovery_s"] is not None and row["recovery_s"] < 2.0  # the other worker answers
    assert row["wrong_answers"] == 0
    assert row["new_worker_ready_s"] is not None  # and the killed one is replaced
