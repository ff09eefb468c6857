"""The peer benchmark's report (bench/peers.py, bench/report.py): the table and the issue #36
ratios come out of the run's own figures, and a machine without the peer packages gets a note."""
import sys

from bench import peers
from bench import report as rep


def _peer_row(ours_ms, ov_ms, b, precision="f32"):
    return {"ours_ms": ours_ms, "openvino_ms": ov_ms, "ours_img_s": 1000 * b / ours_ms,
            "openvino_img_s": 1000 * b / ov_ms, "openvino_over_ours": ours_ms / ov_ms,
            "openvino_precision": precision, "openvino_agrees_with_our_fp32": 0.984375}


def _server(sat, one_p50):
    return {"server": {"one_client": {"concurrency": 1, "img_s": 1000 / one_p50, "p50_ms": one_p50, "p99_ms": 99.0},
                       "c16": {"concurrency": 16, "img_s": sat, "p50_ms": 100.0, "p99_ms": 200.0},
                       "first_answer_s": 5.0}}


REPORT = {
    "machine": {"cpu": "Test CPU", "cores": 2, "torch": "x", "avx2": True, "vnni": True, "avx512_bf16": True,
                "amx": False, "isa": "avx512_bf16", "flags": ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]},
    "settings": {"batch_size": 8},
    "results": {"imagenet/baseline": _server(300.0, 1.0),  # never the best mode, however fast
                "imagenet/bf16": _server(100.0, 12.0), "imagenet/int8": _server(140.0, 14.0)},
    "peers": {"versions": {"openvino": "2026.4.1", "nncf": "3.4.0"}, "threads": 2, "hint": "LATENCY",
              "rounds": 4, "repeat": 5, "models": {"imagenet": {
                  "input": [3, 224, 224], "classes": 1000, "skipped": [],
                  "calibration": {"data": "the benchmark's request images", "images": 32, "openvino_images": 32},
                  "batches": {"1": {"fp32": _peer_row(25.0, 20.0, 1), "int8": _peer_row(10.0, 5.0, 1, "bf16")},
                              "8": {"fp32": _peer_row(160.0, 160.0, 8), "int8": _peer_row(50.0, 40.0, 8, "bf16")}}}}},
}


def test_the_peer_table_gives_medians_and_ratios_with_the_cpu_flags():
    text = rep.peer_table(REPORT)
    assert "ISA flags: avx2, avx512f, avx512_vnni, avx512_bf16." in text
    assert "| imagenet (224x224, 1000) | int8 (rest bf16) | 1 | 100.0 | 200.0 | **2.00x** | 10.0 | 5.0 | 98.4% |" in text
    assert "| imagenet (224x224, 1000) | fp32 | 8 | 50.0 | 50.0 | **1.00x** | 160.0 | 160.0 | 98.4% |" in text
    assert "calibrated on the benchmark's request images (32 images)" in text
    assert "OpenVINO engine / ours" not in text  # no pipeline rows in this run
    piped = {**REPORT, "peers": {**REPORT["peers"], "models": {"imagenet": {
        **REPORT["peers"]["models"]["imagenet"], "pipeline_int8": {"8": {
            "ours_img_s": 150.0, "openvino_engine_img_s": 180.0, "ours_ms": 53.3, "openvino_engine_ms": 44.4,
            "openvino_engine_over_ours": 1.2}}}}}}
    assert "| imagenet | 8 | 150.0 | 180.0 | **1.20x** | 53.3 | 44.4 |" in rep.peer_table(piped)


def test_the_acceptance_lines_compare_our_best_server_mode_with_openvinos_best_raw():
    (line,) = rep.peers_against_server(REPORT)
    # best served mode int8 (140 > 100; the baseline recipe never counts); OpenVINO's best at b8 is
    # int8, 8 / 40 ms = 200 img/s: 0.70x. One client 14.0 ms against OpenVINO's best b1 5.0 ms + 3.
    # Three decimals: 0.895 is not met, and must not read 0.90.
    assert line == ("imagenet: server in int8 140.0 img/s = 0.700x OpenVINO int8's raw 200.0 img/s at batch 8 "
                    "(target 0.9x: NOT met); one client p50 14.0 ms against OpenVINO's best raw batch-1 5.0 ms "
                    "+ 3 ms (NOT met)")
    faster = {**REPORT, "results": {"imagenet/int8": _server(181.0, 8.0)}}
    assert rep.peers_against_server(faster)[0].split(": ", 1)[1].startswith(
        "server in int8 181.0 img/s = 0.905x OpenVINO int8's raw 200.0 img/s at batch 8 (target 0.9x: met)")
    assert rep.peers_against_server(faster)[0].endswith("+ 3 ms (met)")


def test_the_side_by_side_gate_reads_medians_over_alternating_pairs(monkeypatch):
    import bench.run as run

    class Args:
        concurrency, batch_size, beside_pairs, beside_repeat, low_s, sat_s = (4, 16), 8, 3, 5, 1, 1
    peer_times = iter([{1: 0.010, 8: 0.080}, {1: 0.012, 8: 0.100}, {1: 0.011, 8: 0.090},
                       {1: 0.020, 8: 0.160}, {1: 0.011, 8: 0.085}, {1: 0.011, 8: 0.088}])
    served = iter([{"p50_ms": 15.0}, {"img_s": 80.0}, {"p50_ms": 13.5}, {"img_s": 90.0},
                   {"p50_ms": 14.2}, {"img_s": 85.0}])
    calls = []

    def phase(tmp, bodies, c, duration):
        calls.append(c)
        return next(served)
    monkeypatch.setattr(run, "serve_phase", phase)
    b = run.beside_peer(None, [], lambda repeat: next(peer_times), Args)
    assert calls == [1, 16, 1, 16, 1, 16]  # one client, then saturation at the largest concurrency
    assert b["peer_b1_ms"] == 11.0  # median of the six batch-1 medians
    assert abs(b["peer_img_s"] - 8 / 0.089) < 1e-9  # median of 0.080 0.085 0.088 0.090 0.100 0.160
    assert (b["one_client_p50_ms"], b["saturation_img_s"]) == (14.2, 85.0)
    assert abs(b["throughput_ratio"] - 85.0 / (8 / 0.089)) < 1e-9 and abs(b["latency_margin_ms"] - 3.2) < 1e-9
    line = rep.beside_line("imagenet", "openvino", b)
    assert "3 pairs" in line and "server in openvino 85.0 img/s at c=16 = 0.946x OpenVINO int8's raw 89.9 img/s" in line
    assert line.endswith("(target 0.9x: met); one client p50 14.2 ms against its raw batch-1 11.0 ms + 3 ms (NOT met)")
    with_beside = {**REPORT, "results": {"imagenet/openvino": {"server": {
        **_server(85.0, 14.2)["server"], "beside_peer": b}}}}
    assert rep.peers_against_server(with_beside)[1] == line


def test_tables_carry_the_peer_section_only_when_the_run_has_one():
    base = {**REPORT, "peak_gflops": {"fp32": 100.0, "bf16": 200.0}, "date": "d", "command": "c",
            "settings": {"batch_size": 8, "batch_delay_ms": 5},
            "results": {"imagenet/int8": {**_server(140.0, 14.0), "raw": {
                "1": {"pipeline_img_s": 50.0, "pipeline_ms_per_batch": 20.0, "backbone_gflops": 10.0},
                "8": {"pipeline_img_s": 150.0, "pipeline_ms_per_batch": 53.3, "backbone_gflops": 50.0}}}}}
    assert "### Peers: OpenVINO on our checkpoint" in rep.tables(base)
    assert "Peers" not in rep.tables({k: v for k, v in base.items() if k != "peers"})
    skipped = {**base, "peers": {"skipped": "openvino/nncf not installed (pip install -e .[peers])"}}
    assert "Peers: not measured (openvino/nncf not installed" in rep.tables(skipped)


def test_without_openvino_the_peer_run_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    assert peers.peer_versions() is None
    assert peers.run(["imagenet"], {}, {}, None, 8, quick=True) == {
        "skipped": "openvino/nncf not installed (pip install -e .[peers])"}
