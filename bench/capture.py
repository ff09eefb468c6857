"""What traffic capture costs a request: the same model served twice by one TorchServe, with
capture off and on, measured in alternating phases (ABBA) in one run.

    python -m bench.capture [--pairs 4] [--phase-s 12] [--model demo|han1000]   # docs/results/capture.json

Two archives of one checkpoint and thresholds, ``plain`` (capture off) and ``captured`` (capture
on, into a temporary folder), are loaded side by side, one worker each; phases alternate between
them so that a drifting machine lands on both. Per phase: one client's p50/p99, and saturation
throughput with 8 clients. The report gives medians over the phases and the on/off ratios, the
records and bytes the capture wrote, and the CPU it ran on. Traffic goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.harness import BUNDLED, ROOT, demo_inputs, header, save_report, serve_phase, server
from handler.capture import FLUSH_S, read_capture
from handler.checkpoint import file_sha256

NAMES = ("plain", "captured")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo", choices=tuple(BUNDLED))
    p.add_argument("--pairs", type=int, default=4, help="ABBA pairs of phases per setting")
    p.add_argument("--phase-s", type=float, default=12.0)
    p.add_argument("--concurrency", type=int, default=8, help="clients in the saturation phases")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "capture.json"))
    args = p.parse_args(argv)
    folder, spec = BUNDLED[args.model]
    ckpt, thresholds = folder / "mrl_resnet50_fp16.pt", folder / "thresholds.json"
    bodies = demo_inputs(spec=spec)
    report = {**header("bench.capture", argv), "model": args.model,
              "phase_s": args.phase_s, "concurrency": args.concurrency, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        capture_dir = tmp / "capture"
        archives = {n: dict(thresholds=thresholds, batch_size=args.batch_size, workers=1,
                            capture_dir=capture_dir if n == "captured" else None) for n in NAMES}
        with server(tmp, ckpt, archives, timeout=240, load_models=True):
            phases = {n: {"one_client": [], "saturation": []} for n in NAMES}
            for i in range(args.pairs):
                for name in (NAMES if i % 2 == 0 else NAMES[::-1]):
                    phases[name]["one_client"].append(serve_phase(tmp, bodies, 1, args.phase_s, model=name))
                    phases[name]["saturation"].append(
                        serve_phase(tmp, bodies, args.concurrency, args.phase_s, model=name))
                    print(name, json.dumps({k: v[-1] for k, v in phases[name].items()}), flush=True)
            time.sleep(2 * FLUSH_S)  # the writer appends at least once a second
        summary = {n: {"one_client_p50_ms": statistics.median(r["p50_ms"] for r in ph["one_client"]),
                       "one_client_p99_ms": statistics.median(r["p99_ms"] for r in ph["one_client"]),
                       "saturation_img_s": statistics.median(r["img_s"] for r in ph["saturation"]),
                       "errors": sum(r["errors"] for k in ph for r in ph[k])}
                   for n, ph in phases.items()}
        answered = sum(r["requests"] - r["errors"] for k in phases["captured"] for r in phases["captured"][k])
        got = read_capture(capture_dir, checkpoint_sha256=file_sha256(ckpt))
        size = sum(f.stat().st_size for f in capture_dir.glob("capture-*.jsonl*"))  # .part: still open
    report.update(phases=phases, summary=summary, ratios={
        "one_client_p50": summary["captured"]["one_client_p50_ms"] / summary["plain"]["one_client_p50_ms"],
        "saturation_img_s": summary["captured"]["saturation_img_s"] / summary["plain"]["saturation_img_s"]},
        capture={"answered": answered, "records": len(got.conf), "bytes": size,
                 "bytes_per_record": size / max(len(got.conf), 1)})
    return save_report(report, args.out, {"summary": summary, "ratios": report["ratios"], "capture": report["capture"]})


if __name__ == "__main__":
    main()
