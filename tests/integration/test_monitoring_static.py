"""Prometheus config, rules and the Grafana dashboard, checked without TorchServe.

promtool validates config and rule syntax and runs the rule unit tests (monitoring/alerts_test.yml);
the dashboard is checked for house style (stable uid, datasource variable, a unit on every panel)
and for PromQL that parses and names only metrics TorchServe exports. The last test starts a real
Prometheus through monitoring.prometheus and evaluates every query against it.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from monitoring import prometheus
from monitoring.queries import dashboard_queries, rule_expressions

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "mrl-serve.json"
RULES = MONITORING / "alerts.yml"
DATASOURCE = "${datasource}"
METRIC_NAME = re.compile(r"\b(mrl_[a-z_]+|ts_[a-z_]+|Requests[2-5]XX)\b")
RECORDED_NAME = re.compile(r"\bmrl:[a-z0-9_:]+")

needs_promtool = pytest.mark.usefixtures("promtool_installed")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def exported_metrics() -> set[str]:
    """Counter and histogram names declared to TorchServe: what it exports on :8082/metrics."""
    doc = yaml.safe_load((MONITORING / "ts_metrics.yaml").read_text())
    return {m["name"] for section in ("ts_metrics", "model_metrics")
            for kind in ("counter", "histogram", "gauge") for m in doc[section].get(kind, [])}


def referenced_metrics(exprs: list[str]) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", name) for e in exprs for name in METRIC_NAME.findall(e)}


@needs_promtool
def test_promtool_accepts_the_config():
    result = promtool("check", "config", "monitoring/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", "monitoring/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


@needs_promtool
def test_rule_unit_tests_pass():
    result = promtool("test", "rules", "monitoring/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_parse(tmp_path):
    # promtool has no "check expression"; recording rules are the cheapest way to get its parser.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(dashboard_queries(DASHBOARD))]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_has_stable_uid_and_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert (dashboard["uid"], dashboard["title"]) == ("mrl-serve", "mrl-serve")
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")


def test_every_panel_has_unit_description_and_datasource_variable():
    assert len(panels()) == 15
    for panel in panels():
        title = panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {title!r} has no unit"
        assert panel.get("description", "").endswith("."), f"panel {title!r} has no one-sentence description"
        assert panel["datasource"]["uid"] == DATASOURCE, title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, f"{title} {target['refId']}"


def test_panel_units():
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in panels()}
    assert units == {
        "Requests per second": "reqps",
        "Requests answered per embedding size": "percentunit",
        "Mean embedding dims": "none",
        "Cascade escalations per second": "ops",
        "Exit confidence": "reqps",
        "Errors by reason": "reqps",
        "Latency": "s",
        "Queue time": "s",
        "Mean batch size": "short",
        "Requests per second by instance": "reqps",
        "Disagreement with the 2048-d head": "percentunit",
        "Traffic capture records by outcome": "cps",
        "Neighbors queries per second by funnel": "reqps",
        "Gallery items scored per query, by stage": "short",
        "Numerics served, by instance": "none",
    }


def test_every_query_follows_the_instance_variable():
    """Replicas (make serve REPLICAS=N): each panel shows one instance or the sum over the chosen
    ones. The drift threshold line is the exception: the alert compares the fleet with its past."""
    raw = [t["expr"] for p in panels() for t in p["targets"]]
    fleet = [e for e in raw if "avg_over_time(mrl:mean_dims:rate5m" in e]
    assert len(fleet) == 1
    for expr in raw:
        if expr not in fleet:
            selectors = re.findall(r"\{[^}]*\}", expr)
            assert selectors and all('instance=~"$instance"' in s for s in selectors), expr
    assert 'instance=~"127.0.0.1:8182"' in dashboard_queries(DASHBOARD, {"instance": "127.0.0.1:8182"})[0]


def test_dashboard_queries_substitute_every_variable(tmp_path):
    exprs = dashboard_queries(DASHBOARD)
    assert all("$" not in e for e in exprs), exprs
    assert 'model_name=~".+"' in exprs[0]
    assert 'model_name=~"mrl_resnet50"' in dashboard_queries(DASHBOARD, {"model_name": "mrl_resnet50"})[0]
    broken = json.loads(DASHBOARD.read_text())
    broken["panels"][0]["targets"][0]["expr"] = 'sum(rate(mrl_batches_total{model_name=~"$undefined"}[5m]))'
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"\$undefined"):
        dashboard_queries(tmp_path / "broken.json")


def test_handler_metrics_are_declared_to_torchserve_in_order():
    """TorchServe drops undeclared metrics silently and matches label values by position."""
    from handler.metrics import METRICS

    doc = yaml.safe_load((MONITORING / "ts_metrics.yaml").read_text())["model_metrics"]
    declared = {m["name"]: (kind, m["dimensions"]) for kind, ms in doc.items() for m in ms}
    assert declared == {m.name: (m.kind, list(m.labels)) for m in METRICS}


def test_queries_name_only_exported_metrics():
    exported = exported_metrics()
    assert {"mrl_cascade_exits_total", "ts_inference_latency_microseconds", "Requests2XX"} <= exported
    dashboard = referenced_metrics(dashboard_queries(DASHBOARD))
    rules = referenced_metrics([expr for _, expr in rule_expressions(RULES)])
    assert dashboard - exported == set()
    assert rules - exported == set()
    # Every metric the handler exports is looked at somewhere.
    assert {m for m in exported if m.startswith("mrl_")} <= dashboard | rules


def test_recorded_series_used_by_the_dashboard_are_recorded():
    recorded = {name for name, _ in rule_expressions(RULES) if ":" in name}
    used = {name for expr in dashboard_queries(DASHBOARD) for name in RECORDED_NAME.findall(expr)}
    assert used == {"mrl:mean_dims:rate5m"}
    assert used <= recorded


def test_every_alert_has_severity_summary_and_description():
    doc = yaml.safe_load(RULES.read_text())
    alerts = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
    assert {a["alert"] for a in alerts} == {"MRLMeanDimsDrift", "MRLDisagreementAboveEpsilon", "MRLHighErrorRatio",
                                            "MRLForwardLatencyHigh", "MRLNoTraffic", "MRLCaptureLosingRecords"}
    for alert in alerts:
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, path: str, **params) -> dict:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


@pytest.mark.integration
@pytest.mark.usefixtures("prometheus_installed")
def test_prometheus_loads_the_rules_and_evaluates_every_query(tmp_path):
    port = free_port()
    proc = prometheus.start(MONITORING / "prometheus.yml", tmp_path, port=port)
    try:
        assert (tmp_path / "prometheus.pid").read_text().strip() == str(proc.pid)
        exprs = dashboard_queries(DASHBOARD) + [expr for _, expr in rule_expressions(RULES)]
        for expr in exprs:
            assert query(port, "/api/v1/query", query=expr)["status"] == "success", expr
        loaded = query(port, "/api/v1/rules")["data"]["groups"]
        assert [r["name"] for g in loaded for r in g["rules"]] == [name for name, _ in rule_expressions(RULES)]
    finally:
        assert prometheus.stop(tmp_path) is True
    assert proc.wait(timeout=5) == 0
    assert not prometheus.is_ready(port)
    assert not (tmp_path / "prometheus.pid").exists()
    assert prometheus.stop(tmp_path) is False
