"""Metrics end to end: real TorchServe, real Prometheus, a scripted mix of requests.

Exact counts are read from TorchServe's endpoint (deltas over the mix); then every dashboard query
and rule is evaluated through Prometheus's HTTP API. The drift scenario, with real drifted images
on the demo model, is tests/integration/test_drift.py.
"""
import re
import time

import pytest

from client.http import run_load
from monitoring.queries import dashboard_queries, rule_expressions
from tests.integration.server import prom_query, running_prometheus

pytestmark = pytest.mark.integration
PROM_PORT = 19090
# (headers, body index or None for a corrupt body, expected status, expected error reason)
MIX = ([({}, i, 200, None) for i in range(24)]
       + [({"X-MRL-Dim": "64"}, i, 200, None) for i in range(6)]
       + [({"X-MRL-Operating-Point": "exact"}, i, 200, None) for i in range(4)]
       + [({"X-MRL-Neighbors": "3"}, i, 200, None) for i in range(3)]
       + [({"X-MRL-Neighbors": "0"}, 0, 400, "bad_option")]
       + [({}, None, 400, "decode")] * 3
       + [({"X-MRL-Top-K": "0"}, 0, 400, "bad_option")] * 2
       + [({"X-MRL-Dim": "7"}, 0, 400, "bad_option")]
       + [({"Content-Type": "application/x-www-form-urlencoded"}, 0, 415, "bad_request")])


def samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(1))))
        out[labels] = float(m.group(2))
    return out


def delta(after: str, before: str, name: str, by: str | None = None) -> dict:
    a, b = samples(after, name), samples(before, name)
    out: dict = {}
    for labels, v in a.items():
        key = dict(labels).get(by) if by else None
        out[key] = out.get(key, 0.0) + v - b.get(labels, 0.0)
    return {k: v for k, v in out.items() if v}


def query(expr: str) -> dict:
    return prom_query(PROM_PORT, expr)


@pytest.fixture(scope="module")
def prom(tmp_path_factory, tiny_server, prometheus_installed):
    with running_prometheus(tmp_path_factory.mktemp("prom"), PROM_PORT):
        yield


def wait_for(expr: str, timeout: float = 30.0) -> list:
    """Poll until ``expr`` has a result (scrapes and rule evaluations run on their own clocks)."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(expr)["data"]["result"]
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def send_mix(server, images):
    client = server.client()
    results = []
    for headers, idx, _, _ in MIX:
        body = images[idx] if idx is not None else images[0][:50]
        results.append(client.predict(body, {"Content-Type": "image/png", **headers}))
    return results


def test_counters_match_the_responses_exactly(tiny_server, test_images):
    before = tiny_server.scrape()
    results = send_mix(tiny_server, test_images)
    assert [r.status for r in results] == [m[2] for m in MIX]
    time.sleep(1.5)  # the frontend applies metric lines shortly after the response
    after = tiny_server.scrape()
    ok = [r.body for r in results if r.status == 200]
    exits = delta(after, before, "mrl_cascade_exits_total")
    assert sum(exits.values()) == len(ok)
    expected_errors: dict = {}
    for _, _, _status, reason in MIX:
        if reason:
            expected_errors[reason] = expected_errors.get(reason, 0) + 1
    assert delta(after, before, "mrl_request_errors_total", by="reason") == expected_errors
    dims = sum(delta(after, before, "mrl_embedding_dims_total").values())
    assert abs(dims / sum(exits.values()) - sum(b["embedding_dim"] for b in ok) / len(ok)) < 1e-9
    by_dim = delta(after, before, "mrl_cascade_exits_total", by="embedding_dim")
    assert by_dim.get("64") == 6


def test_every_dashboard_query_and_rule_returns_data(prom, tiny_server, test_images):
    # Traffic must span several scrapes for rate() to see the counters move.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        send_mix(tiny_server, test_images)
        run_load(tiny_server.client(), test_images, concurrency=4, count=40)
        if query("mrl:mean_dims:rate5m")["data"]["result"]:
            break
    empty = [q for q in dashboard_queries() if not wait_for(q, timeout=10)]
    assert not empty, f"dashboard queries with no data: {empty}"
    for name, expr in rule_expressions():
        res = query(expr)
        assert res["status"] == "success", (name, res)
        if name.startswith("mrl:"):  # recording rules must produce series
            assert res["data"]["result"], name
