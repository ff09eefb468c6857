"""Peers: OpenVINO on our checkpoint, side by side with our own engine, in one run.

    python -m bench.peers [--quick] [--models imagenet,demo,han1000]   # writes docs/results/peers.json
    python -m bench.run                                               # runs this too (--no-peers: not)

What a CPU user would pick instead of us (issue #36): the same MRL ResNet50 nn.Module, heads
included, converted with ``openvino.convert_model`` and compiled for this CPU in fp32, bf16 (the
inference precision hint, where the CPU has bf16) and int8 (NNCF post-training quantization,
calibrated on the images our int8 program is calibrated on: the thresholds' int8 record for a
bundled model, the benchmark's own request images for the ImageNet-size one). Ours is ``Engine``
in the mode of the same name (traced fp32, traced bf16 autocast, the int8 AOTInductor package).
Both sides get the same normalized tensors (decoded and preprocessed once, no decode timed), the
same threads, at batch 1 and at the serving batch; each side's graph is static per batch size.
OpenVINO's int8 model is the OpenVINO engine option's own program (calibration/openvino_int8.py:
build_openvino), and a second table runs our whole in-process pipeline (decode, preprocess, model,
cascade) with our int8 engine and with that engine option, on the benchmark's request bodies.
Rounds alternate between the runners, so a drift in the machine's load lands on every one; the
report gives per-runner medians and the ratios OpenVINO / ours from those medians.
Needs the ``peers`` extra (``pip install -e .[peers]``); without it the benchmark says so and skips.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import (
    BUNDLED,
    ROOT,
    calibration_folder,
    demo_inputs,
    header,
    imagenet_inputs,
    int8_for,
    int8_set_runs_here,
    make_checkpoints,
    save_report,
    times_of,
)
from handler.checkpoint import load_mrl_resnet50
from handler.engine import Engine, Serving, configure_threads
from handler.numerics import resolve_numerics
from handler.thresholds import numerics_sets

MODES = ("fp32", "bf16", "int8")


def peer_versions() -> dict | None:
    """The peer packages' versions, or None where OpenVINO or NNCF is not installed."""
    try:
        import nncf
        import openvino
    except ImportError:
        return None
    return {"openvino": openvino.__version__.split("-")[0], "nncf": nncf.__version__}


def request_tensors(card, bodies: list[bytes]) -> list[torch.Tensor]:
    """The benchmark's request bodies decoded and preprocessed as the server does, one (3, H, W)
    normalized tensor each: what both sides get."""
    from handler.preprocess import Normalizer, crop_image, decode_image

    normalize = Normalizer(card.preprocessing)
    return list(normalize([crop_image(decode_image(b), card.preprocessing) for b in bodies]))


def batch_of(tensors: list[torch.Tensor], b: int) -> torch.Tensor:
    return torch.stack([tensors[i % len(tensors)] for i in range(b)]).contiguous()  # NCHW


def openvino_models(model, size: int, int8_program) -> dict:
    """Our module, heads and softmax included, as OpenVINO models: 'fp32' (converted here) and
    'int8' (the OpenVINO engine's own program, calibration/openvino_int8.py: NNCF post-training
    quantization of the same conversion, heads left in floats)."""
    import openvino as ov

    example = torch.zeros(1, 3, size, size)
    fp32 = ov.convert_model(Serving(model.float().eval()), example_input=example)
    return {"fp32": fp32, "int8": ov.Core().read_model(str(int8_program.path))}


def compile_openvino(ov_model, batch: int, size: int, threads: int, precision: str | None):
    """One static-batch compiled model: ``threads`` inference threads, the LATENCY hint, and the
    inference precision hint where given (int8: left to OpenVINO's default, which runs what it did
    not quantize in bf16 on a CPU with bf16; the report names the precision it used)."""
    import openvino as ov

    m = ov_model.clone()
    m.reshape({m.inputs[0]: [batch, 3, size, size]})
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(m, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor):
        out = request.infer(x.numpy(), share_inputs=True)
        return out[compiled.outputs[0]], out[compiled.outputs[1]]
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")
    run.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    return run


def beside(program_path: Path, card, bodies: list[bytes], batches, threads: int):
    """OpenVINO int8's raw time per batch at each of ``batches`` (the OpenVINO engine's own IR, as
    in the peer table: normalized NCHW tensors in, the LATENCY hint), as a function of ``repeat``
    returning median seconds per batch size. ``bench/run.py`` calls it between a server's phases,
    while the server is idle, so that both sides meet the machine in the same minutes."""
    import openvino as ov

    ov_model, tensors = ov.Core().read_model(str(program_path)), request_tensors(card, bodies)
    runs = {b: (compile_openvino(ov_model, b, card.preprocessing.crop, threads, None), batch_of(tensors, b))
            for b in batches}

    def measure(repeat: int) -> dict[int, float]:
        return {b: statistics.median(times_of(lambda: fn(x), repeat, warmup=1)) for b, (fn, x) in runs.items()}
    return measure


def openvino_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def ours(model, card, program, mode: str, batches, size: int):
    """Our Engine in ``mode`` (the serving graphs), as a function of a normalized NCHW batch."""
    m = load_copy(model)
    engine = Engine(m, numerics=mode, graph="jit", input_size=size, batch_sizes=batches,
                    int8_program=program if mode == "int8" else None)
    return lambda x: engine(x)


def load_copy(model):
    import copy
    return copy.deepcopy(model).float().eval()


def agreement(fn, ref, tensors: list[torch.Tensor], b: int) -> float:
    """Share of ``tensors`` whose full-size (last head) top-1 under ``fn`` equals ``ref``'s."""
    same = total = 0
    for start in range(0, len(tensors) - b + 1, b):
        x = torch.stack(tensors[start:start + b]).contiguous()
        p, q = np.asarray(fn(x)[0]), np.asarray(ref(x)[0])
        same += int((p[:, -1].argmax(-1) == q[:, -1].argmax(-1)).sum())
        total += len(x)
    return same / max(total, 1)


def measure(runners: dict, x: torch.Tensor, rounds: int, repeat: int) -> dict:
    """Median seconds per batch for each runner, over ``rounds`` alternating rounds of ``repeat``."""
    times = {name: [] for name in runners}
    for fn in runners.values():  # first calls: oneDNN / OpenVINO pick and cache their kernels
        times_of(lambda: fn(x), 0, warmup=2)
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name] += times_of(lambda: runners[name](x), repeat, warmup=1)
    return {name: statistics.median(t) for name, t in times.items()}


def model_setup(name: str, ckpt: Path, bodies: list[bytes], tmp: Path):
    """(fp32 model, card, our int8 program, OpenVINO's int8 program, what calibrated both)."""
    from calibration import openvino_int8

    model, card = load_mrl_resnet50(ckpt, numerics="fp32")
    thr = BUNDLED[name][0] / "thresholds.json" if name in BUNDLED else None
    if thr is not None and int8_set_runs_here(thr):
        fit = numerics_sets(json.loads(thr.read_text()))["int8"]["meta"]["int8_program"]
        spec, images = fit["data"], fit["images"]
    else:  # as bench/run.py does for a model without an int8 set: its own request images
        thr, spec, images = None, calibration_folder(tmp, name, bodies), len(bodies)
    program = int8_for(ckpt, None if thr is not None else spec, thr)
    ov_program = openvino_int8.build_openvino(ckpt, spec, images=images)  # the same calibration batches
    return model, card, program, ov_program, {"data": spec if thr is not None else "the benchmark's request images",
                                               "images": images}


def pipelines(model, card, program, ov_program, bodies: list[bytes], batches, rounds: int, repeat: int) -> dict:
    """Our whole in-process pipeline (decode, preprocess, int8 model, cascade: MRLService.handle)
    with our int8 engine against the same with the OpenVINO engine option, per batch size."""
    from handler.service import MRLService
    from handler.thresholds import OperatingPoints

    services = {name: MRLService(load_copy(model), card, OperatingPoints.fixed(card.nesting), graph="jit",
                                 batch_sizes=batches, numerics="int8", int8_program=p)
                for name, p in (("ours", program), ("openvino_engine", ov_program))}
    out = {}
    for b in batches:
        items = [{"body": bodies[i % len(bodies)]} for i in range(b)]
        med = measure({k: (lambda x, s=s: s.handle(items)) for k, s in services.items()}, None, rounds, repeat)
        out[str(b)] = {"ours_img_s": b / med["ours"], "openvino_engine_img_s": b / med["openvino_engine"],
                       "ours_ms": 1000 * med["ours"], "openvino_engine_ms": 1000 * med["openvino_engine"],
                       "openvino_engine_over_ours": med["ours"] / med["openvino_engine"]}
    return out


def run_model(name: str, ckpt: Path, bodies: list[bytes], tmp: Path, batch_size: int, rounds: int, repeat: int,
              threads: int) -> dict:
    t0 = time.perf_counter()
    model, card, program, ov_program, calib_meta = model_setup(name, ckpt, bodies, tmp)
    size = card.preprocessing.crop
    tensors = request_tensors(card, bodies)
    ov_models = openvino_models(model, size, ov_program)
    setup_s = time.perf_counter() - t0
    has_bf16 = resolve_numerics("bf16") == "bf16" and openvino_bf16()
    modes = [m for m in MODES if m != "bf16" or has_bf16]
    batches = (1, batch_size)
    out = {"input": [3, size, size], "classes": len(card.classes), "calibration": calib_meta,
           "openvino_program": ov_program.fingerprint[:16], "setup_s": round(setup_s, 1),
           "skipped": [] if has_bf16 else ["bf16: this CPU has no bf16"], "batches": {}}
    engines = {m: ours(model, card, program, m, batches, size) for m in modes}
    for b in batches:
        runners = {}
        for m in modes:
            precision = {"fp32": "f32", "bf16": "bf16", "int8": None}[m]
            runners[f"ours/{m}"] = engines[m]
            runners[f"openvino/{m}"] = compile_openvino(ov_models["int8" if m == "int8" else "fp32"], b, size,
                                                        threads, precision)
        med = measure(runners, batch_of(tensors, b), rounds, repeat)
        row = {}
        for m in modes:
            o, p = med[f"ours/{m}"], med[f"openvino/{m}"]
            row[m] = {"ours_ms": 1000 * o, "openvino_ms": 1000 * p, "ours_img_s": b / o, "openvino_img_s": b / p,
                      "openvino_over_ours": o / p, "openvino_precision": runners[f"openvino/{m}"].precision,
                      # sanity: the peer computes our model (full-size top-1 against our fp32)
                      "openvino_agrees_with_our_fp32": agreement(runners[f"openvino/{m}"], engines["fp32"],
                                                                 tensors, b)}
        out["batches"][str(b)] = row
        print(name, "batch", b, json.dumps({m: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
                                            for m, r in row.items()}), flush=True)
    out["pipeline_int8"] = pipelines(model, card, program, ov_program, bodies, batches, rounds, repeat)
    print(name, "pipeline int8", json.dumps(out["pipeline_int8"]), flush=True)
    return out


def run(models: list[str], ckpts: dict, inputs: dict, tmp: Path, batch_size: int, quick: bool) -> dict:
    """The peer section of a benchmark report: per model, per batch, per mode, ours and OpenVINO."""
    versions = peer_versions()
    if versions is None:
        return {"skipped": "openvino/nncf not installed (pip install -e .[peers])"}
    threads = torch.get_num_threads()
    rounds, repeat = (2, 3) if quick else (4, 5)
    res = {"versions": versions, "threads": threads, "rounds": rounds, "repeat": repeat,
           "hint": "LATENCY", "models": {}}
    for name in models:
        ckpt = BUNDLED[name][0] / "mrl_resnet50_fp16.pt" if name in BUNDLED else ckpts[name]["fp32"]
        res["models"][name] = run_model(name, ckpt, inputs[name], tmp, batch_size, rounds, repeat, threads)
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=",".join(["imagenet", *BUNDLED]))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "peers.json"))
    args = p.parse_args(argv)
    configure_threads()
    report = {**header("bench.peers", argv, busy=True), "settings": {"batch_size": args.batch_size}}
    models = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        ckpts = make_checkpoints(tmp) if "imagenet" in models else {}
        inputs = {"imagenet": imagenet_inputs(), **{m: demo_inputs(spec=spec) for m, (_, spec) in BUNDLED.items()}}
        report["peers"] = run(models, ckpts, inputs, tmp, args.batch_size, args.quick)
    from bench.report import peer_table
    print(peer_table(report))
    return save_report(report, args.out, {"peers": "see table above"})


if __name__ == "__main__":
    main()
