"""int8 numerics in a worker: the PT2E-quantized backbone (int8 weights, a graph, no Python code)
that ``calibration/int8.py`` builds offline and ``build_archive.py`` puts in the archive, loaded
here with the fp32 heads beside it, as its AOTInductor package where one was compiled for this
CPU class (``Engine`` compiles the program with torch.compile otherwise); and OpenVINO's int8 IR.

A program whose activations use the full 8-bit range is refused on a CPU without VNNI: there
oneDNN's int8 kernels multiply u8 x s8 pairs into saturating int16 sums (calibration/int8.py says
what it costs).
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from handler.checkpoint import file_sha256
from handler.cpus import cpu_has_vnni, cpu_isa, isa_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Program:
    """A quantized backbone on disk and what it was built from; ``package``: the same program
    compiled ahead of time for this kind of CPU (AOTInductor), when there is one."""

    path: Path
    meta: dict
    package: Path | None = None

    @property
    def fingerprint(self) -> str:
        """What the program computes: its graph's code (activation scales included) and every
        tensor. Two builds from the same inputs match here though their files' bytes differ."""
        return self.meta["fingerprint"]


def import_torchao():
    """Import torchao without its warnings about its CUDA-only kernels (mxfp8, cutlass), which a
    CPU build cannot load and int8 on CPU does not use."""
    logger = logging.getLogger("torchao")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torchao
        importlib.import_module("torchao.quantization.pt2e")  # registers the quantize/dequantize ops
    finally:
        logger.setLevel(level)
    return torchao


def open_program(path: str | Path, package: str | Path | None = None) -> Program:
    """A program file and the meta beside it (``backbone.json``), checked against each other;
    ``package``: its AOTInductor package, if any (checked for this CPU when loaded)."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    if file_sha256(path) != meta.get("sha256"):
        raise ValueError(f"{path} does not match its meta {path.with_suffix('.json')} (sha256 differs)")
    return Program(path, meta, Path(package) if package and Path(package).with_suffix(".json").exists() else None)


def _check_range(program: Program) -> None:
    if not program.meta.get("reduce_range") and not cpu_has_vnni():
        raise ValueError(f"{program.path} quantizes activations to 8 bits, which saturates on a CPU "
                         "without VNNI; rebuild it here (python -m calibration.int8) or serve another numerics")


def load_backbone(program: Program) -> torch.nn.Module:
    """The quantized backbone as a module, refused where its activation range would saturate."""
    import_torchao()
    _check_range(program)
    return torch.export.load(str(program.path)).module()


def package_key(program: Program) -> dict:
    """What an ahead-of-time compiled package depends on: the program, torch, the CPU's ISA class
    (inductor generates code for the vector ISA it finds; AVX2 code is not AVX-512 code)."""
    return {"fingerprint": program.fingerprint, "torch": str(torch.__version__), "isa": isa_name(cpu_isa())}


def package_batches(batch_size: int) -> tuple[int, ...]:
    """The static batch sizes a worker of ``batch_size`` gets compiled: the powers of two below
    it, and it (a batch of 3 runs padded to 4)."""
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return (*sizes, batch_size)


def package_files(package: Path, batches) -> dict[int, Path]:
    """A package's compiled graphs, one file per static batch size, beside its meta (``.json``)."""
    return {b: package.with_name(f"{package.stem}-b{b}.pt2") for b in batches}


def usable_package(program: Program) -> Path | None:
    """The program's package if it was compiled for this program, torch and CPU class, else None."""
    if program.package is None or not program.package.with_suffix(".json").exists():
        return None
    meta = json.loads(program.package.with_suffix(".json").read_text())
    want = package_key(program)
    if {k: meta.get(k) for k in want} != want:
        log.warning("int8 package %s was compiled for %s, this worker is %s: compiling instead",
                    program.package, {k: meta.get(k) for k in want}, want)
        return None
    missing = [str(f) for f in package_files(program.package, meta.get("batches", ())).values() if not f.exists()]
    if not meta.get("batches") or missing:
        log.warning("int8 package %s lacks its graphs %s: compiling instead", program.package, missing or "(none listed)")
        return None
    return program.package


class _StaticBatches(nn.Module):
    """A package's static-batch graphs as one module: a batch runs on the smallest graph that
    holds it, zero-padded, and a batch above the largest runs in chunks."""

    def __init__(self, runners: dict[int, object]) -> None:
        super().__init__()
        self.runners, self.sizes = runners, sorted(runners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, top = [], self.sizes[-1]
        for start in range(0, len(x), top):
            chunk = x[start:start + top]
            b = next(s for s in self.sizes if s >= len(chunk))
            if b > len(chunk):
                chunk = torch.cat([chunk, chunk.new_zeros(b - len(chunk), *chunk.shape[1:])])
            y = self.runners[b](chunk.contiguous(memory_format=torch.channels_last))
            out.append(y[:min(top, len(x) - start)])
        return out[0] if len(out) == 1 else torch.cat(out)


def load_package(program: Program, path: Path) -> nn.Module:
    """The program's compiled package, loaded; refused where its activation range would saturate."""
    import_torchao()
    _check_range(program)
    batches = json.loads(Path(path).with_suffix(".json").read_text())["batches"]
    return _StaticBatches({b: _load_graph(f) for b, f in package_files(Path(path), batches).items()})


def _load_graph(package: Path):
    """One AOTInductor package (a zip), loaded from an extraction of our own that is gone once it
    has loaded (the library is mapped by then). torch's loader extracts into $TMPDIR/aotinductor_*
    and removes that only when the runner is destroyed, which a worker ended by a signal never is:
    each worker start would leave its graphs (~26 MB each) in the temp dir."""
    from torch._inductor.package.package import AOTICompiledModel

    with tempfile.TemporaryDirectory(prefix="mrl-aoti-") as tmp:
        with zipfile.ZipFile(package) as z:
            z.extractall(tmp)
        # A folder is loaded in place and left to its owner (torch's loader, folder mode).
        return AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(tmp, "model", False, 1, -1))


@dataclass(frozen=True)
class OpenVINOProgram:
    """The peer engine's int8 (issue #36): the whole serving module (backbone, nested heads,
    softmax) converted to OpenVINO and quantized by NNCF post-training quantization, heads left in
    floats; an IR on disk (``.xml`` + ``.bin``) and what it was built from. ``Engine`` runs it in
    place of a ``Program`` (same ``numerics='int8'``, ``graph`` 'openvino')."""

    path: Path
    meta: dict
    runtime = "openvino"

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def ir_fingerprint(xml: Path) -> str:
    """What an OpenVINO IR computes: its weights (.bin) and its graph (.xml) without op names and
    runtime info. OpenVINO names the ops a conversion creates from a process-wide counter (and NNCF
    keeps some of those names in the runtime info), so the same program built in another process,
    after other conversions, differs in those bytes only."""
    text = xml.read_text()
    text = re.sub(r"<rt_info>.*?</rt_info>", "", text, flags=re.S)
    text = re.sub(r'(<net|<layer [^>]*?) name="[^"]*"', r"\1", text)
    h = hashlib.sha256(text.encode())
    h.update(xml.with_suffix(".bin").read_bytes())
    return h.hexdigest()


def open_openvino(xml: str | Path) -> OpenVINOProgram:
    """An OpenVINO program's IR and the meta beside it, checked against each other."""
    xml = Path(xml)
    meta = json.loads(xml.with_suffix(".json").read_text())
    if ir_fingerprint(xml) != meta.get("fingerprint"):
        raise ValueError(f"{xml} does not match its meta {xml.with_suffix('.json')} (fingerprint differs)")
    return OpenVINOProgram(xml, meta)
