"""int8 numerics, built offline: the backbone quantized statically with PT2E (torchao's
X86InductorQuantizer), calibrated on holdout images through the server's own preprocessing; heads
and softmax stay fp32. Also its ahead-of-time compiled package, and OpenVINO's int8 program.

    python -m calibration.int8 --checkpoint CKPT --data SPEC [--images 512]   # build (or find) it
    python -m calibration.int8 --checkpoint CKPT --record-scales THRESHOLDS   # an old record made portable

The quantized backbone is an exported program (``.pt2``: int8 weights, a graph, no Python code)
built once per checkpoint, calibration data and activation range, and cached by that key under
``~/.cache/mrl-serve/int8/`` (``MRL_CACHE``). ``fit_thresholds.py --numerics int8`` calibrates
thresholds on exactly that program: its fingerprint and its activation scales go in the set's meta.
A rebuild from that record uses the recorded scales, so it computes the same program on any CPU
(the calibration pass runs in floats whose last bits differ between AVX2 and AVX-512 kernels; the
weights' scales are exact min/max and agree everywhere), and checks them against its own
calibration. ``build_archive.py`` puts the program in the archive; a worker loads it with
``handler/quantize.py`` (this module's other half, all a worker needs).

Activations are quantized to 7 bits (``reduce_range``) on CPUs without VNNI: there oneDNN's int8
kernels multiply u8 x s8 pairs into saturating int16 sums, and the 8-bit range measurably loses
accuracy (a probe outside the project's commands, on the demo model, 2,000 Fashion-MNIST test
images, AVX2: 95.3 % of 2048-d answers agreed with fp32 at 8 bits, 99.65 % at 7; torchao's own
docstring gives the same advice). A program built with the 8-bit range is refused on such a CPU.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.cpus import cpu_has_vnni
from handler.engine import configure_threads
from handler.preprocess import Normalizer, crop_image
from handler.quantize import (
    Program,
    import_torchao,
    package_batches,
    package_files,
    package_key,
)
from handler.thresholds import numerics_sets
from imagedata import CACHE_ROOT
from imagedata.specs import load_spec

log = logging.getLogger(__name__)


CACHE = CACHE_ROOT / "int8"


CALIBRATION_IMAGES = 512


CALIBRATION_BATCH = 8


MAX_BATCH = 64  # the exported program's batch dimension is dynamic up to this


# What a thresholds set records of the program it was fit on: enough to rebuild it anywhere.
RECORD = ("fingerprint", "data", "images", "reduce_range", "activation_qparams")


class _Backbone(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def _versions() -> dict:
    return {"torch": str(torch.__version__), "torchao": import_torchao().__version__}


def program_key(checkpoint_sha256: str, spec: str, images: int, reduce_range: bool,
                activation_qparams: dict | None = None) -> str:
    what = [checkpoint_sha256, spec, images, reduce_range, _versions()]
    if activation_qparams is not None:  # else the scales this machine's calibration gives
        what.append(activation_qparams)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


QPARAMS_RTOL = 1e-2  # a recorded scale this far from this machine's calibration is another calibration


def _pin_activation_qparams(prepared: torch.fx.GraphModule, recorded: dict | None) -> dict:
    """The activation (per-tensor) observers' scale and zero point, by observer name, after the
    calibration pass; with ``recorded``, those values are what convert uses, each checked against
    this calibration's (float rounding moves a scale by an ulp or so and a zero point by at most
    one, not a scale by a percent)."""
    observed = {}
    for name, obs in prepared.named_modules():
        if getattr(obs, "qscheme", None) not in (torch.per_tensor_affine, torch.per_tensor_symmetric) \
                or not hasattr(obs, "calculate_qparams"):
            continue
        scale, zero = obs.calculate_qparams()
        observed[name] = [float(scale.reshape(-1)[0]), int(zero.reshape(-1)[0])]
        if recorded is not None:
            if name not in recorded:
                raise ValueError(f"the recorded activation scales have no entry for observer {name}")
            s, z = recorded[name]
            if abs(z - observed[name][1]) > 1 or abs(s - observed[name][0]) > QPARAMS_RTOL * abs(s):
                raise ValueError(f"observer {name}: recorded scale {s} / zero point {z}, this calibration "
                                 f"gives {observed[name][0]} / {observed[name][1]}: not the same calibration")
            pinned = (torch.tensor([s], dtype=scale.dtype), torch.tensor([z], dtype=zero.dtype))
            obs.calculate_qparams = lambda pinned=pinned: pinned
    if recorded is not None and set(recorded) - set(observed):
        raise ValueError(f"the recorded activation scales name observers this graph lacks: "
                         f"{sorted(set(recorded) - set(observed))[:3]}")
    return observed if recorded is None else dict(recorded)


def _strip_unused(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e folds the int8 weights into new constants but leaves the fp32 originals
    registered; drop what no node reads (a ResNet50's program: 113 MiB -> about 25)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and not any(u.startswith(name + ".") for u in used):
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


def fingerprint(program: torch.export.ExportedProgram) -> str:
    h = hashlib.sha256(program.graph_module.code.encode())
    for name in sorted(program.state_dict):
        t = program.state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def quantize_backbone(model, batches: Iterable[torch.Tensor], reduce_range: bool,
                      activation_qparams: dict | None = None) -> tuple[torch.export.ExportedProgram, dict]:
    """PT2E static quantization of ``model.embed``: export, insert observers, run ``batches``
    (normalized, channels_last), convert (with ``activation_qparams`` where given); returned as a
    program with a dynamic batch dimension, and the activation scales it uses."""
    import_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batches = iter(batches)
    first = next(batches)
    dynamic = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)}
    with torch.no_grad():
        # strict=True: with strict=False the quantizer fails ("Input partition has more than one
        # output node"; ../shared/NOTES.md).
        graph = torch.export.export(_Backbone(model.eval()), (first,), strict=True, **dynamic).module()
        quantizer = xiq.X86InductorQuantizer().set_global(
            xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
        prepared = prepare_pt2e(graph, quantizer)
        prepared(first)
        for x in batches:
            prepared(x)
        qparams = _pin_activation_qparams(prepared, activation_qparams)
        converted = convert_pt2e(prepared)
        _strip_unused(converted)
        return torch.export.export(converted, (first,), strict=False, **dynamic), qparams


def calibration_batches(card, spec: str, images: int):
    """``images`` images of ``spec`` through the server's preprocessing, in batches."""
    data = load_spec(spec, card.classes, limit=images)
    normalize = Normalizer(card.preprocessing)
    for start in range(0, len(data), CALIBRATION_BATCH):
        idx = range(start, min(start + CALIBRATION_BATCH, len(data)))
        yield normalize([crop_image(data[i][0], card.preprocessing) for i in idx])


def build(checkpoint: str | Path, spec: str, *, images: int = CALIBRATION_IMAGES, reduce_range: bool | None = None,
          activation_qparams: dict | None = None, cache: Path = CACHE) -> Program:
    """The int8 program for ``checkpoint`` calibrated on ``spec`` (with a record's
    ``activation_qparams``, where given), from the cache or built now."""
    sha = file_sha256(checkpoint)
    reduce_range = (not cpu_has_vnni()) if reduce_range is None else reduce_range
    key = program_key(sha, spec, images, reduce_range, activation_qparams)
    path = Path(cache) / f"backbone-{key}.pt2"
    if path.exists() and path.with_suffix(".json").exists():
        meta = json.loads(path.with_suffix(".json").read_text())
        if "activation_qparams" in meta:  # else from an older build: built again
            return Program(path, meta)
    t0 = time.perf_counter()
    model, card = load_mrl_resnet50(checkpoint, numerics="fp32")
    program, qparams = quantize_backbone(model, calibration_batches(card, spec, images), reduce_range,
                                         activation_qparams)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.pt2")
    torch.export.save(program, str(tmp))
    meta = {"checkpoint_sha256": sha, "data": spec, "images": images, "reduce_range": reduce_range,
            "key": key, "fingerprint": fingerprint(program), "sha256": file_sha256(tmp),
            "build_s": round(time.perf_counter() - t0, 1), **_versions(), "activation_qparams": qparams}
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("int8 program %s built in %.1f s", path, meta["build_s"])
    return Program(path, meta)


def for_thresholds(checkpoint: str | Path, thresholds: str | Path) -> Program | None:
    """The program the int8 set of a thresholds file was fit on, rebuilt here from the set's record
    (or found in the cache) with the scales it records; None when the file has no int8 set. A
    rebuild that computes another program is refused: the set does not describe it. (A record
    without scales, from before they were kept, reproduces only on the kind of CPU it was fit on.)"""
    fit = numerics_sets(json.loads(Path(thresholds).read_text())).get("int8", {}).get("meta", {}).get("int8_program")
    if not fit:
        return None
    if not fit["reduce_range"] and not cpu_has_vnni():
        raise ValueError(f"the int8 set of {thresholds} was fit with 8-bit activations, which saturate on a CPU "
                         "without VNNI: refit it here (calibration/fit_thresholds.py --numerics int8 --add) "
                         "or serve another numerics")
    program = build(checkpoint, fit["data"], images=fit["images"], reduce_range=fit["reduce_range"],
                    activation_qparams=fit.get("activation_qparams"))
    if program.fingerprint != fit["fingerprint"]:
        raise ValueError(f"the int8 set of {thresholds} was fit on quantized backbone {fit['fingerprint'][:16]}, "
                         f"this machine builds {program.fingerprint[:16]} from the same record: refit it here "
                         "(calibration/fit_thresholds.py --numerics int8 --add)")
    return program


def _input_shape(exported: torch.export.ExportedProgram) -> tuple[int, ...]:
    name = exported.graph_signature.user_inputs[0]
    node = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name == name)
    return tuple(int(d) for d in node.meta["val"].shape[1:])


def compile_package(program: Program, batches: Iterable[int] = package_batches(8), cache: Path = CACHE) -> Program:
    """``program`` with its AOTInductor package, compiled here or found in the cache: one graph per
    static batch size in ``batches`` (about 20 s each for a ResNet50 on two cores). A worker loads
    a package in well under a second where torch.compile spends about 40 s at every start. Static
    shapes, because oneDNN prepacks int8 weights for the shape it is given: at 224x224 on an AMD
    Zen 5 with VNNI, one graph with a dynamic batch dimension ran batch 1 in 73 ms and batch 8 in
    124, static graphs in 10.8 and 55.8 (fp32's traced graph: 26.4 and 229; a probe outside the
    project's commands, docs/benchmarks.md). The served package answers as the compiled program
    does (tests/integration/test_int8.py)."""
    key = {**package_key(program), "batches": sorted(set(batches))}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache) / f"aoti-{name}.pt2"
    files = package_files(path, key["batches"])
    if not (path.with_suffix(".json").exists() and all(f.exists() for f in files.values())):
        import_torchao()
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # weights folded and prepacked for oneDNN's int8 kernels
        t0 = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        exported = torch.export.load(str(program.path))
        shape, module = _input_shape(exported), exported.module()
        with torch.no_grad():
            for b, f in files.items():
                x = torch.zeros(b, *shape).contiguous(memory_format=torch.channels_last)
                tmp = f.with_name(f".{f.stem}.{os.getpid()}.pt2")
                torch._inductor.aoti_compile_and_package(torch.export.export(module, (x,), strict=False),
                                                         package_path=str(tmp))
                os.replace(tmp, f)
        path.with_suffix(".json").write_text(json.dumps({**key, "build_s": round(time.perf_counter() - t0, 1)}) + "\n")
        log.info("int8 package %s (batches %s) compiled in %.1f s", path, key["batches"], time.perf_counter() - t0)
    return Program(program.path, program.meta, path)


def record_scales(checkpoint: str | Path, thresholds: str | Path) -> dict:
    """Add to a thresholds file's int8 record, from before scales were kept, the activation scales
    of the program it was fit on: rebuilt here from the record, which must reproduce its
    fingerprint, so run it on the kind of CPU the set was fit on. (An AVX-512 CPU reproduces an
    AVX2 one's rounding under ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2.)"""
    doc = json.loads(Path(thresholds).read_text())
    fit = numerics_sets(doc).get("int8", {}).get("meta", {}).get("int8_program")
    if not fit:
        raise SystemExit(f"{thresholds} has no int8 set")
    if "activation_qparams" in fit:
        return fit
    program = build(checkpoint, fit["data"], images=fit["images"], reduce_range=fit["reduce_range"])
    if program.fingerprint != fit["fingerprint"]:
        raise SystemExit(f"this machine builds {program.fingerprint[:16]}, the set was fit on {fit['fingerprint'][:16]}: "
                         "run this on the kind of CPU the set was fit on")
    fit["activation_qparams"] = program.meta["activation_qparams"]
    Path(thresholds).write_text(json.dumps(doc, indent=2) + "\n")
    return fit


def main(argv: list[str] | None = None) -> Program | dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", help="calibration images: a holdout spec or folder")
    p.add_argument("--record-scales", metavar="THRESHOLDS",
                   help="add the activation scales to the int8 record of THRESHOLDS (record_scales)")
    p.add_argument("--images", type=int, default=CALIBRATION_IMAGES)
    p.add_argument("--reduce-range", choices=("auto", "yes", "no"), default="auto",
                   help="7-bit activations (auto: where the CPU has no VNNI)")
    args = p.parse_args(argv)
    configure_threads()
    if args.record_scales:
        fit = record_scales(args.checkpoint, args.record_scales)
        print(f"{args.record_scales}: int8 record {fit['fingerprint'][:16]} holds "
              f"{len(fit['activation_qparams'])} activation scales")
        return fit
    if not args.data:
        p.error("--data is required to build a program")
    rr = {"auto": None, "yes": True, "no": False}[args.reduce_range]
    program = build(args.checkpoint, args.data, images=args.images, reduce_range=rr)
    print(json.dumps({"path": str(program.path), **program.meta}, indent=2))
    return program


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
