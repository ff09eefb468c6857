"""Slow clients against TorchServe directly, bounded (the figures come from `python -m bench.slowloris`,
docs/reliability.md). 200 connections that never finish a request head are held open by the
frontend; normal clients beside them are all answered.
"""
import pytest

from bench import slowloris

pytestmark = pytest.mark.integration


def test_slow_request_heads_do_not_stop_normal_clients(tmp_path):
    report = slowloris.main(["--connections", "200", "--phase-s", "5", "--targets", "direct",
                             "--port", "18480", "--out", str(tmp_path / "slowloris.json")])
    [row] = report["targets"]
    assert row["attack"]["failed_connects"] == 0
    assert row["attack"]["open_at_end"] == 200  # TorchServe itself never cuts them: the gateway does
    assert row["attack"]["frontend_fds_during"] >= row["fds_before"] + 200
    for name in ("quiet", "attacked", "quiet_again"):
        assert row[name]["requests"] > 0 and row[name]["failed"] == 0, (name, row[name])
