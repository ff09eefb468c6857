"""The PromQL in the committed dashboard and rules, for tests that evaluate it against Prometheus.

    dashboard_queries("monitoring/grafana/dashboards/mrl-serve.json")  # ['sum by (model_name) (...)', ...]
    rule_expressions("monitoring/alerts.yml")  # [('mrl:mean_dims:rate5m', '...'), ('MRLMeanDimsDrift', ...)]
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parent
DASHBOARD = MONITORING / "grafana" / "dashboards" / "mrl-serve.json"
RULES = MONITORING / "alerts.yml"

# Grafana's built-in interval variables, replaced by values that fit a 5 s scrape.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # collapsed rows nest their panels


def dashboard_variables(dashboard: dict) -> dict[str, str]:
    """Each template variable's value when "All" is selected (its allValue), by name."""
    return {v["name"]: v["allValue"] for v in dashboard.get("templating", {}).get("list", [])
            if v.get("includeAll") and v.get("allValue")}


def dashboard_queries(path: str | Path = DASHBOARD, variables: Mapping[str, str] | None = None) -> list[str]:
    """Every panel target's PromQL ``expr`` in a Grafana dashboard JSON, ready to send to Prometheus.

    Template variables are replaced by ``variables`` where given, else by their "All" value (e.g.
    ``$model_name`` becomes ``.+``), and Grafana's interval built-ins by ``GRAFANA_BUILTINS``. A
    variable with no value raises ValueError naming it, since Prometheus would not parse the query.
    """
    dashboard = json.loads(Path(path).read_text())
    values = {**GRAFANA_BUILTINS, **dashboard_variables(dashboard), **(variables or {})}

    def substitute(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise ValueError(f"dashboard {path} uses template variable ${name}, which has no value; "
                             f"pass it in variables= (known: {sorted(values)})")
        return values[name]

    return [_VARIABLE.sub(substitute, target["expr"])
            for panel in _panels(dashboard.get("panels", []))
            for target in panel.get("targets", []) if target.get("expr")]


def rule_expressions(path: str | Path = RULES) -> list[tuple[str, str]]:
    """(name, expr) for every recording rule (its ``record`` name) and alert in a rules file."""
    doc = yaml.safe_load(Path(path).read_text())
    return [(rule.get("record") or rule["alert"], rule["expr"].strip())
            for group in doc["groups"] for rule in group["rules"]]
