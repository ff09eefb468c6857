"""The Grafana dashboards against Grafana's own schema: the TypeScript types @grafana/schema 13.2.3
generates from Grafana's CUE schema (tests/data/grafana-schema-13.2.3, pinned), checked by the
TypeScript compiler. No Grafana server can be had here; the queries themselves run against a real
Prometheus in tests/integration/test_monitoring_static.py. A broken dashboard must fail: the
check bites."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import deps

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "data" / "grafana-schema-13.2.3" / "dashboard_types.gen.d.ts"
SCHEMA_SHA256 = "8170498f7e60c9876824b9088e6ec6c82cc6c64a53934ef6172cfaa8ee007183"
DASHBOARDS = sorted((ROOT / "monitoring" / "grafana" / "dashboards").glob("*.json"))


def schema_errors(dashboard: dict, workdir: Path) -> list[str]:
    """tsc's errors for ``dashboard`` typed as Grafana's Dashboard ([] when it conforms)."""
    tsc = deps.need_binary("tsc", "node-typescript")
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(SCHEMA, workdir / "dashboard_types.gen.d.ts")
    (workdir / "check.ts").write_text("import type { Dashboard } from './dashboard_types.gen';\n"
                                      f"export const dashboard: Dashboard = {json.dumps(dashboard, indent=1)};\n")
    run = subprocess.run([tsc, "--strict", "--noEmit", "--target", "es2020", "check.ts"], cwd=workdir,
                         capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stdout.splitlines() if "error TS" in line]
    assert (run.returncode == 0) == (not errors), run.stdout + run.stderr
    return errors


def test_the_pinned_schema_is_the_published_one():
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_each_dashboard_conforms_to_grafanas_schema(path, tmp_path):
    assert schema_errors(json.loads(path.read_text()), tmp_path) == []


def test_the_check_fails_a_broken_dashboard(tmp_path):
    good = json.loads(DASHBOARDS[0].read_text())
    faults = {
        "unknown key": lambda d: d.__setitem__("refreshEvery", "5s"),
        "gridPos.w a string": lambda d: d["panels"][0]["gridPos"].__setitem__("w", "half"),
        "editable not a boolean": lambda d: d.__setitem__("editable", "yes"),
        "unit a number": lambda d: d["panels"][0]["fieldConfig"]["defaults"].__setitem__("unit", 1),
        "schemaVersion (required) missing": lambda d: d.pop("schemaVersion"),
    }
    for i, (name, plant) in enumerate(faults.items()):
        broken = copy.deepcopy(good)
        plant(broken)
        assert len(schema_errors(broken, tmp_path / str(i))) == 1, name
