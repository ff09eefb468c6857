"""Numerics: which one a worker serves (fp32, bf16, int8; ``auto`` by the CPU's flags and what passed
parity), and which engine runs int8 (our PT2E program or OpenVINO's).
"""
from __future__ import annotations

import time

import torch

from handler.cpus import cpu_isa, isa_name


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_numerics(numerics: str, device: torch.device | str = "cpu") -> str:
    """The numerics a worker serves: the card's, or fp32 where the card asks for bf16 and the
    device has no bf16 support (e.g. an AVX2-only CPU: no AVX512-BF16, no AMX), where bf16 would
    run emulated at about a tenth of the fp32 speed. The caller logs the fallback."""
    if numerics == "bf16" and not bf16_supported(torch.device(device)):
        return "fp32"
    return numerics


# ``auto``'s preference per CPU class, fastest first. AMX: int8 188 > bf16 131 img/s > fp32 for the
# ResNet50 backbone at 224x224 (a probe on an AMX Xeon, ../shared/NOTES.md); AVX2: int8 with 7-bit
# activations 559 against fp32 305 img/s at batch 8 on the demo (docs/results/graph_modes_demo.json) and
# 1.54x at the server (docs/results/numerics_demo.json). AVX512-BF16 without AMX: int8 (VNNI) first, then
# whichever of fp32 and bf16 this CPU runs faster, which its flags do not tell: on an Intel Xeon
# bf16 matmuls ran at half the fp32 rate (ImageNet-size server 17.7 against 25.7 img/s), on an AMD
# EPYC Zen 5 at four times it (62.0 against 31.9; docs/benchmarks.md), so a worker measures it
# (``bf16_matmul_speedup``). The order below is the one used when it is not measured.
AUTO_ORDER = {"amx": ("int8", "bf16", "fp32"), "avx512_bf16": ("int8", "fp32", "bf16"),
              "vnni": ("int8", "fp32"), "avx2": ("int8", "fp32")}


# bf16 goes before fp32 where its measured matmul rate is at least this many times fp32's (room for
# a noisy probe; the two CPUs above sit at 0.5x and 4x).
BF16_FASTER = 1.3


def bf16_matmul_speedup(n: int = 512, repeat: int = 7) -> float:
    """bf16 matmul rate over fp32's on this CPU: best of ``repeat`` (n x n) products each, about
    20 ms on two cores. Decides fp32 against bf16 for ``auto`` where the flags cannot."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # oneDNN/MKL pick and cache their kernel on the first call
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(torch.float32) / best(torch.bfloat16)


REQUESTS = ("card", "fp32", "bf16", "int8", "auto")


def choose_numerics(requested: str, card_numerics: str, sets: dict[str, dict] | None, has_int8: bool,
                    device: torch.device | str = "cpu", isa: dict[str, bool] | None = None,
                    bf16_speedup: float | None = None) -> tuple[str, str]:
    """(the numerics a worker serves, why). ``requested``: 'card' (the card's, bf16 falling back to
    fp32 without bf16 instructions), a mode, or 'auto': the first of ``AUTO_ORDER`` for this CPU
    that the thresholds hold a set for (``sets``: mode -> set; None when the model has no
    thresholds), that the device runs natively, and, for int8, whose set passed parity with fp32
    (fit_thresholds.py records it), whose activation range this CPU runs without saturating (8-bit
    needs VNNI or AMX) and whose quantized backbone is in the archive. On an AVX512-BF16 CPU without
    AMX, bf16 goes before fp32 where ``bf16_speedup`` is at least ``BF16_FASTER``; None measures it
    (``bf16_matmul_speedup``), only when int8 is out and both float modes could serve."""
    if requested not in REQUESTS:
        raise ValueError(f"numerics must be one of {REQUESTS}, got {requested!r}")
    if requested == "card":
        mode = resolve_numerics(card_numerics, device)
        return mode, "the card's" if mode == card_numerics else f"the card's {card_numerics} without bf16 here"
    if requested == "int8":
        if not has_int8:
            raise ValueError("numerics 'int8' needs the quantized backbone in the archive (build_archive.py --numerics int8)")
        return "int8", "asked for"
    if requested in ("fp32", "bf16"):
        mode = resolve_numerics(requested, device)
        return mode, "asked for" if mode == requested else "bf16 asked for, no bf16 here"
    if torch.device(device).type != "cpu":
        return resolve_numerics(card_numerics, device), "auto on a non-CPU device: the card's"
    isa = cpu_isa() if isa is None else isa

    def skip_reason(mode: str) -> str | None:
        if sets is not None and mode not in sets:
            return f"{mode}: no thresholds set"
        if mode == "bf16" and not (isa["amx"] or isa["avx512_bf16"]):
            return "bf16: no bf16 instructions"
        if mode == "int8" and not has_int8:
            return "int8: no quantized backbone in the archive"
        if mode == "int8" and not (sets or {}).get("int8", {}).get("meta", {}).get("parity", {}).get("passed"):
            return "int8: its thresholds set did not pass parity with fp32"
        if mode == "int8" and (sets or {}).get("int8", {}).get("meta", {}).get("int8_program", {}).get(
                "reduce_range") is False and not (isa["vnni"] or isa["amx"]):
            return "int8: its set was fit with 8-bit activations, which saturate without VNNI"
        return None

    order, skipped, measured = AUTO_ORDER[isa_name(isa)], [], ""
    if isa_name(isa) == "avx512_bf16" and skip_reason("int8") is not None and \
            skip_reason("fp32") is None and skip_reason("bf16") is None:
        # int8 is out and both float modes could serve: the faster one on this CPU first.
        speedup = bf16_matmul_speedup() if bf16_speedup is None else bf16_speedup
        order = ("bf16", "fp32") if speedup >= BF16_FASTER else ("fp32", "bf16")
        skipped.append(skip_reason("int8"))
        measured = f"; bf16 matmuls at {speedup:.2f}x fp32's here"
    for mode in order:
        reason = skip_reason(mode)
        if reason is None:
            return mode, f"auto on {isa_name(isa)}" + (f" ({'; '.join(skipped)})" if skipped else "") + measured
        skipped.append(reason)
    raise ValueError(f"auto found no numerics to serve on {isa_name(isa)}: {'; '.join(skipped)}")


RUNTIMES = ("torch", "openvino", "auto")


OPENVINO_SET = "openvino-int8"  # the thresholds set fit on the OpenVINO int8 program's outputs


def choose_runtime(requested: str, numerics: str, sets: dict[str, dict] | None, has_program: bool,
                   isa: dict[str, bool] | None = None, openvino: bool | None = None) -> tuple[str, str]:
    """(what runs the int8 model: 'torch' or 'openvino', why). 'torch' is the default. 'openvino'
    asked for: a ValueError where it cannot serve (numerics not int8, the package or the program
    missing, thresholds without a set of its own). 'auto': OpenVINO only where all of that holds and its
    set (``OPENVINO_SET``) passed parity with fp32 and records OpenVINO measured faster than our
    int8 on this CPU class (``meta.speed[isa].openvino_over_torch`` above 1, bench/peers.py); else
    torch, with the reason. ``openvino``: whether the package imports (None: try it)."""
    if requested not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {requested!r}")
    if requested == "torch":
        return "torch", "the default"
    if openvino is None:
        openvino = openvino_versions() is not None
    isa = cpu_isa() if isa is None else isa
    meta = (sets or {}).get(OPENVINO_SET, {}).get("meta", {})
    missing = ("openvino: serves int8 only" if numerics != "int8" else
               "openvino: not installed (pip install openvino, setup/runtime.txt)" if not openvino else
               "openvino: no OpenVINO program in the archive" if not has_program else
               f"openvino: no thresholds set '{OPENVINO_SET}'" if sets is not None and OPENVINO_SET not in sets else None)
    if requested == "openvino":  # without thresholds at all it serves the fixed 2048-d point, as int8 does
        if missing:
            raise ValueError(f"runtime 'openvino' asked for, but {missing.split(': ', 1)[1]}")
        return "openvino", "asked for"
    if sets is None:
        missing = missing or f"openvino: no thresholds set '{OPENVINO_SET}'"
    speed = meta.get("speed", {}).get(isa_name(isa), {}).get("openvino_over_torch")
    reason = missing or (
        "openvino: its thresholds set did not pass parity with fp32" if not meta.get("parity", {}).get("passed") else
        f"openvino: not measured on {isa_name(isa)}" if speed is None else
        f"openvino: measured {speed:.2f}x our int8 on {isa_name(isa)}, not faster" if speed <= 1 else None)
    if reason is not None:
        return "torch", f"auto ({reason})"
    return "openvino", f"auto: passed parity, measured {speed:.2f}x our int8 on {isa_name(isa)}"


def threshold_numerics(numerics: str, device: torch.device | str = "cpu") -> tuple[str, ...]:
    """The numerics a thresholds file may have been fit in to serve a card of ``numerics``: the
    card's, or what this device serves it in (a refit here, or one from traffic captured here)."""
    return tuple(dict.fromkeys((numerics, resolve_numerics(numerics, device))))


def openvino_versions() -> dict | None:
    """OpenVINO's version, or None where it is not installed (setup/runtime.txt pins it; a worker
    needs only the runtime, calibration/openvino_int8.py's build also needs NNCF)."""
    try:
        import openvino
    except ImportError:
        return None
    return {"openvino": openvino.__version__.split("-")[0]}
