"""Turn bench/run.py's JSON into docs/benchmarks.md tables and a plot.

    python -m bench.report docs/results/benchmarks.json      # writes docs/results/benchmarks_tables.md and benchmarks.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _saturation(srv: dict) -> dict:
    return max((v for k, v in srv.items() if k.startswith("c") and k[1:].isdigit()), key=lambda v: v["img_s"])


def machine_line(m: dict) -> str:
    flags = ", ".join(f"{f}={m[f]}" for f in ("avx2", "vnni", "avx512_bf16", "amx") if f in m)
    busy = f", {m['busy_before']:.0%} of the cores busy before the run" if "busy_before" in m else ""
    line = f"Machine: {m['cpu']}, {m['cores']} cores, ISA {m.get('isa', '?')} ({flags}), torch {m['torch']}{busy}."
    return line + (" " + cpu_flags_line(m) if "flags" in m else "")


def batching_line(settings: dict) -> str:
    """The server's batching as a run recorded it (runs before greedy batching recorded none)."""
    if settings.get("batching") == "greedy":
        return f"greedy batching (a worker never waits; maxBatchDelay {settings['batch_delay_ms']} ms unused)"
    return f"maxBatchDelay {settings['batch_delay_ms']} ms"


def tables(report: dict) -> str:
    m, peak = report["machine"], report["peak_gflops"]
    lines = [machine_line(m) + f" Run {report['date']} with `{report['command']}`.",
             f"Measured matmul peak (best run over {report.get('peak_sizes', [2048])} square matmuls): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 "
             + (f"{peak['bf16']:.0f} GFLOP/s." if peak['bf16'] else "not measured (no bf16 on this CPU)."),
             f"Server: batchSize {report['settings']['batch_size']}, {batching_line(report['settings'])}, one worker.",
             ""]
    bs = str(report["settings"]["batch_size"])
    lines += [f"| model / mode | raw pipeline b1 (img/s) | raw pipeline b{bs} (img/s) | backbone b{bs} GFLOP/s (share of peak) "
              "| server saturation (img/s) | server / raw | 1 client p50 (ms) | raw b1 latency (ms) | cold start to first answer (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, res in report["results"].items():
        raw, srv = res["raw"], res["server"]
        mode = res["auto"]["chose"] if "auto" in res else key.rsplit("/", 1)[1]
        numerics = "fp32" if mode == "baseline" else mode
        sat = _saturation(srv)
        gf = raw[bs]["backbone_gflops"]
        share = f" ({gf / peak[numerics]:.0%})" if peak.get(numerics) else ""  # int8 has no measured peak
        name = f"{key} ({res['auto']['chose']})" if "auto" in res else key
        lines.append(
            f"| {name} | {raw['1']['pipeline_img_s']:.1f} | {raw[bs]['pipeline_img_s']:.1f} | {gf:.0f}{share} "
            f"| {sat['img_s']:.1f} (c={sat['concurrency']}) | "
            f"{sat['img_s'] / raw[bs]['pipeline_img_s']:.2f} | {srv['one_client']['p50_ms']:.1f} | "
            f"{raw['1']['pipeline_ms_per_batch']:.1f} | {srv['first_answer_s']:.1f} |")
    if report.get("skipped"):
        lines += ["", "Not run on this machine: " + "; ".join(report["skipped"]) + "."]
    lines += ["", "Server, every concurrency (img/s, p50 / p99 ms):", "",
              "| model / mode | " + " | ".join(k for k in _conc_keys(report)) + " |",
              "|---|" + "---|" * len(_conc_keys(report))]
    for key, res in report["results"].items():
        cells = []
        for k in _conc_keys(report):
            v = res["server"].get(k)
            cells.append("-" if v is None else f"{v['img_s']:.1f} ({v['p50_ms']:.0f} / {v['p99_ms']:.0f})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    for key, res in report["results"].items():
        srv = res["server"]
        if "cascade" in srv:
            c, f = srv["cascade"], srv["fixed_2048"]
            pairs = f" (medians of {len(c['runs'])} alternating pairs)" if "runs" in c else ""
            lines += ["", f"Cascade overhead ({key}, c={c['concurrency']}): cascade {c['img_s']:.1f} img/s vs fixed "
                      f"2048-d head {f['img_s']:.1f} img/s{pairs}: overhead {1 - c['img_s'] / f['img_s']:+.1%}."]
    lines += ["", "Ratios within this run:", ""] + [f"- {r}" for r in ratios(report)]
    if "peers" in report:
        lines += ["", peer_table(report).rstrip("\n")]
    return "\n".join(lines) + "\n"


def cpu_flags_line(m: dict) -> str:
    """The lscpu flags that decide int8 and bf16 speed, as this CPU reports them."""
    flags = m.get("flags")
    if flags is None:
        return ""
    return "ISA flags: " + (", ".join(flags) or "none of avx512_vnni, avx_vnni, avx512_bf16, amx_*") + "."


def peer_table(report: dict) -> str:
    """The peer section (bench/peers.py): ours and OpenVINO per model, mode and batch, medians from
    alternating rounds of one run, and what the issue's acceptance reads against our server."""
    peers, m = report["peers"], report["machine"]
    if "skipped" in peers and "models" not in peers:
        return f"Peers: not measured ({peers['skipped']}).\n"
    lines = ["### Peers: OpenVINO on our checkpoint", "",
             machine_line(m),
             f"OpenVINO {peers['versions']['openvino']}, NNCF {peers['versions']['nncf']}; {peers['threads']} threads "
             f"both sides, OpenVINO hint {peers['hint']}; the same normalized tensors (no decode), static batch "
             f"graphs; medians over {peers['rounds']} alternating rounds of {peers['repeat']} batches per runner.", "",
             "| model (input, classes) | mode | batch | ours (img/s) | OpenVINO (img/s) | OpenVINO / ours "
             "| ours (ms/batch) | OpenVINO (ms/batch) | OpenVINO's top-1 = our fp32's |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in peers["models"].items():
        label = f"{name} ({r['input'][1]}x{r['input'][2]}, {r['classes']})"
        for b, row in r["batches"].items():
            for mode, v in row.items():
                prec = "" if mode != "int8" else f" (rest {v['openvino_precision']})"
                lines.append(f"| {label} | {mode}{prec} | {b} | {v['ours_img_s']:.1f} | {v['openvino_img_s']:.1f} | "
                             f"**{v['openvino_over_ours']:.2f}x** | {v['ours_ms']:.1f} | {v['openvino_ms']:.1f} | "
                             f"{v['openvino_agrees_with_our_fp32']:.1%} |")
    pipes = {name: r["pipeline_int8"] for name, r in peers["models"].items() if "pipeline_int8" in r}
    if pipes:
        lines += ["", "Our whole in-process pipeline (decode, preprocess, int8 model, cascade: `MRLService.handle` on the "
                  "request bodies) with our int8 engine and with the OpenVINO engine option (handler/engine.py):", "",
                  "| model | batch | our int8 engine (img/s) | OpenVINO engine (img/s) | OpenVINO engine / ours "
                  "| ours (ms/batch) | OpenVINO engine (ms/batch) |", "|---|---|---|---|---|---|---|"]
        for name, rows in pipes.items():
            for b, v in rows.items():
                lines.append(f"| {name} | {b} | {v['ours_img_s']:.1f} | {v['openvino_engine_img_s']:.1f} | "
                             f"**{v['openvino_engine_over_ours']:.2f}x** | {v['ours_ms']:.1f} | {v['openvino_engine_ms']:.1f} |")
    for name, r in peers["models"].items():
        c = r["calibration"]
        lines.append("")
        lines.append(f"{name}: int8 on both sides calibrated on {c['data']} ({c['images']} images); "
                     + ("; ".join(r["skipped"]) + "." if r["skipped"] else "bf16 measured."))
    against = peers_against_server(report)
    if against:
        lines += ["", "Against our server in this run (issue #36, acceptance 2):", ""] + [f"- {a}" for a in against]
    return "\n".join(lines) + "\n"


# Issue #36's gate: the best server mode at saturation against OpenVINO's best raw throughput at the
# serving batch, and one client's median against OpenVINO's raw batch-1 latency plus a margin.
GATE_RATIO, GATE_MARGIN_MS = 0.9, 3


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def peers_against_server(report: dict) -> list[str]:
    """Our server's best mode at saturation against OpenVINO's best raw throughput at the serving
    batch, and one client's median latency against OpenVINO's raw batch-1 latency + 3 ms."""
    out, bs = [], str(report.get("settings", {}).get("batch_size", 8))
    for name, r in report["peers"].get("models", {}).items():
        rows = {k.split("/")[1]: v for k, v in report.get("results", {}).items() if k.startswith(name + "/")}
        rows = {k: v for k, v in rows.items() if k != "baseline"}
        if not rows or bs not in r["batches"]:
            continue
        best = max(rows, key=lambda k: _saturation(rows[k]["server"])["img_s"])
        sat = _saturation(rows[best]["server"])["img_s"]
        ov_mode = max(r["batches"][bs], key=lambda k: r["batches"][bs][k]["openvino_img_s"])
        ov = r["batches"][bs][ov_mode]["openvino_img_s"]
        ov1 = min(v["openvino_ms"] for v in r["batches"]["1"].values())
        p50 = rows[best]["server"]["one_client"]["p50_ms"]
        out.append(f"{name}: server in {best} {sat:.1f} img/s = {sat / ov:.3f}x OpenVINO {ov_mode}'s raw {ov:.1f} img/s "
                   f"at batch {bs} (target {GATE_RATIO}x: {_met(sat >= GATE_RATIO * ov)}); one client p50 "
                   f"{p50:.1f} ms against OpenVINO's best raw batch-1 {ov1:.1f} ms + {GATE_MARGIN_MS} ms "
                   f"({_met(p50 <= ov1 + GATE_MARGIN_MS)})")
        for mode, row in rows.items():
            if "beside_peer" in row["server"]:
                out.append(beside_line(name, mode, row["server"]["beside_peer"]))
    return out


def beside_line(name: str, mode: str, b: dict) -> str:
    """The gate measured side by side (bench/run.py: beside_peer)."""
    return (f"{name}, side by side ({len(b['pairs'])} pairs, each the peer's raw batches then a server phase, "
            f"in the same minutes): server in {mode} {b['saturation_img_s']:.1f} img/s at c={b['concurrency']} "
            f"= {b['throughput_ratio']:.3f}x OpenVINO int8's raw {b['peer_img_s']:.1f} img/s at batch "
            f"{b['batch_size']} (target {GATE_RATIO}x: {_met(b['throughput_ratio'] >= GATE_RATIO)}); one client p50 "
            f"{b['one_client_p50_ms']:.1f} ms against its raw batch-1 {b['peer_b1_ms']:.1f} ms + {GATE_MARGIN_MS} ms "
            f"({_met(b['latency_margin_ms'] <= GATE_MARGIN_MS)})")


def ratios(report: dict) -> list[str]:
    """The figures the performance issue's acceptance reads, computed from this run's results."""
    res, out = report["results"], []
    models = list(dict.fromkeys(k.split("/")[0] for k in res))
    for model in models:
        rows = {k.split("/")[1]: v for k, v in res.items() if k.startswith(model + "/")}
        sat = {mode: _saturation(v["server"])["img_s"] for mode, v in rows.items()}
        if "baseline" in sat:
            out.append(f"{model}: server at saturation against the baseline recipe's: " + ", ".join(
                f"{mode} {x / sat['baseline']:.2f}x" for mode, x in sat.items() if mode != "baseline"))
        if "auto" in sat and "fp32" in sat:
            out.append(f"{model}: auto chose {rows['auto']['auto']['chose']} ({rows['auto']['auto']['why']}): "
                       f"server {sat['auto']:.1f} img/s, {sat['auto'] / sat['fp32']:.2f}x fp32's {sat['fp32']:.1f}")
        best = max((mode for mode in sat if mode not in ("baseline", "auto")), key=sat.get, default=None)
        if best is not None:
            r = rows[best]
            raw_best = max(v["pipeline_img_s"] for v in r["raw"].values())
            lat = r["server"]["one_client"]["p50_ms"] - r["raw"]["1"]["pipeline_ms_per_batch"]
            out.append(f"{model}: best mode {best}: server {sat[best]:.1f} img/s = {sat[best] / raw_best:.2f}x its best raw "
                       f"pipeline ({raw_best:.1f} img/s over the serving batch sizes); one client p50 "
                       f"{r['server']['one_client']['p50_ms']:.1f} ms = raw batch-1 {r['raw']['1']['pipeline_ms_per_batch']:.1f} ms {lat:+.1f} ms")
    cold = {k: v["server"]["first_answer_s"] for k, v in res.items()}
    if cold:
        worst = max(cold, key=cold.get)
        out.append(f"cold start, `torchserve --start` to the first answer: at most {cold[worst]:.1f} s ({worst})")
    return out


def _conc_keys(report: dict) -> list[str]:
    keys = []
    for res in report["results"].values():
        for k in res["server"]:
            if (k == "one_client" or (k.startswith("c") and k[1:].isdigit())) and k not in keys:
                keys.append(k)
    return keys


def plot(report: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for key, res in report["results"].items():
        pts = sorted((v["concurrency"], v) for k, v in res["server"].items()
                     if (k == "one_client" or (k.startswith("c") and k[1:].isdigit())))
        xs = [c for c, _ in pts]
        ax1.plot(xs, [v["img_s"] for _, v in pts], "o-", label=key)
        ax2.plot(xs, [v["p50_ms"] for _, v in pts], "o-", label=f"{key} p50")
        ax2.plot(xs, [v["p99_ms"] for _, v in pts], "x--", alpha=0.6, label=f"{key} p99")
    ax1.set(xscale="log", xlabel="concurrent clients", ylabel="images/s", title="Server throughput")
    ax2.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)", title="Server latency")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results/benchmarks.json")
    rep = json.loads(src.read_text())
    src.with_name(src.stem + "_tables.md").write_text(tables(rep))
    plot(rep, src.with_suffix(".png"))
    print(tables(rep))
