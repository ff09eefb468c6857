"""The benchmark report's arithmetic: the ratios the performance issue reads come out of the run's
own figures, and the machine line states the ISA."""
from bench import report as rep
from bench.server_tuning import STAGE


def _row(raw1, raw8, sats, one_p50, raw1_ms, cold, auto=None):
    srv = {"one_client": {"concurrency": 1, "img_s": 1000 / one_p50, "p50_ms": one_p50, "p99_ms": one_p50 * 2},
           "first_answer_s": cold}
    for c, x in sats.items():
        srv[f"c{c}"] = {"concurrency": c, "img_s": x, "p50_ms": 100.0, "p99_ms": 200.0}
    row = {"raw": {"1": {"pipeline_img_s": raw1, "pipeline_ms_per_batch": raw1_ms, "backbone_gflops": 10.0},
                   "8": {"pipeline_img_s": raw8, "pipeline_ms_per_batch": 8000 / raw8, "backbone_gflops": 50.0}},
           "server": srv}
    if auto:
        row["auto"] = auto
    return row


REPORT = {
    "machine": {"cpu": "Test CPU", "cores": 2, "torch": "x", "avx2": True, "vnni": False, "avx512_bf16": False,
                "amx": False, "isa": "avx2", "busy_before": 0.02},
    "date": "d", "command": "python -m bench.run", "peak_gflops": {"fp32": 100.0, "bf16": None},
    "peak_sizes": [1024], "settings": {"batch_size": 8, "batch_delay_ms": 5},
    "results": {
        "imagenet/baseline": _row(8.0, 10.0, {4: 9.0, 16: 10.0}, 120.0, 110.0, 9.0),
        "imagenet/int8": _row(14.0, 25.0, {4: 20.0, 16: 23.0}, 74.0, 71.0, 14.0),
        "demo/fp32": _row(100.0, 200.0, {16: 150.0}, 10.0, 5.0, 6.0),
        "demo/auto": _row(120.0, 260.0, {16: 210.0}, 9.0, 4.0, 7.5,
                          auto={"chose": "int8", "why": "auto on avx2"}),
    },
}


def test_ratios_are_computed_from_the_run():
    lines = rep.ratios(REPORT)
    assert "imagenet: server at saturation against the baseline recipe's: int8 2.30x" in lines
    # best mode int8: 23 of a best raw 25 over b1 and b8; one client 74 ms against raw b1 71 ms
    assert any(line.startswith("imagenet: best mode int8: server 23.0 img/s = 0.92x its best raw pipeline (25.0")
               and "+3.0 ms" in line for line in lines), lines
    assert any(line.startswith("demo: auto chose int8 (auto on avx2): server 210.0 img/s, 1.40x fp32's 150.0")
               for line in lines), lines
    assert lines[-1].endswith("at most 14.0 s (imagenet/int8)")


def test_the_tables_state_the_isa_and_leave_int8_without_a_peak_share():
    text = rep.tables(REPORT)
    assert "ISA avx2 (avx2=True, vnni=False, avx512_bf16=False, amx=False)" in text
    assert "2% of the cores busy before the run" in text
    int8 = next(line for line in text.splitlines() if line.startswith("| imagenet/int8 |"))
    assert "| 50 |" in int8 and "%" not in int8  # no measured int8 peak: no share of one
    base = next(line for line in text.splitlines() if line.startswith("| imagenet/baseline |"))
    assert "| 50 (50%) |" in base and "| 10.0 (c=16) | 1.00 |" in base
    assert "| demo/auto (int8) |" in text


def test_the_stage_counters_parse_from_prometheus_text():
    lines = ['mrl_stage_seconds_sum{model_name="m",stage="forward"} 1.5',
             'mrl_stage_seconds_count{model_name="m",stage="forward"} 3.0',
             'mrl_batches_total{model_name="m"} 3.0',
             'mrl_stage_seconds_bucket{model_name="m",stage="forward",le="0.1"} 1.0',
             'ts_queue_latency_microseconds{model_name="m",model_version="default",hostname="h"} 1.234E7']
    parsed = [STAGE.match(line) for line in lines]
    assert [m.group(1) if m else None for m in parsed] == [
        "mrl_stage_seconds_sum", "mrl_stage_seconds_count", "mrl_batches_total", None,
        "ts_queue_latency_microseconds"]
    assert float(parsed[0].group(3)) == 1.5 and 'stage="forward"' in parsed[0].group(2)
    assert float(parsed[4].group(3)) == 1.234e7  # Java writes large counters with an exponent
