"""The backbone path: normalized batch in, per-size probabilities and embedding out, fast.

``Engine`` owns the numerics (fp32, bf16 autocast, or int8: a PT2E-quantized backbone built by
calibration/int8.py and loaded by handler/quantize.py, with fp32 heads), the memory format
(channels_last) and the graph mode:

* ``eager``   plain PyTorch;
* ``jit``     traced and frozen TorchScript (BN folded), any batch size; on CPU with oneDNN Graph
              fusion (conv + add + relu partitions; docs/benchmarks.md has its effect);
* ``compile`` torch.compile with inductor freezing, compiled for each serving batch size at start;
* ``aoti``    int8 only: the quantized backbone compiled ahead of time (AOTInductor), loaded;
* ``openvino`` int8 only, given a ``handler.quantize.OpenVINOProgram``: the whole serving module
              (NNCF int8 backbone, float heads, softmax) run by OpenVINO, one static graph per batch
              size, taking the uint8 crops and normalizing them in its graph where given the
              preprocessing (issue #36; ``handler.numerics.choose_runtime`` says when; off unless
              asked for).

The same code runs on CUDA when given a CUDA device. Calibration and evaluation use ``Engine``
too, so thresholds are fit with the numerics that serve.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from handler import numerics as numerics_mod
from handler.model import MRLResNet50
from handler.preprocess import Normalizer, Preprocessing
from handler.quantize import load_backbone, load_package, package_batches, usable_package

log = logging.getLogger(__name__)
GRAPH_MODES = ("eager", "jit", "compile")


class Serving(nn.Module):
    """What runs per batch: backbone, all nested heads, softmax in fp32."""

    def __init__(self, model: MRLResNet50) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.model.embed(x)                      # (B, 2048)
        logits = self.model.fc(emb)                    # (B, S, C)
        return F.softmax(logits.float(), dim=-1), emb.float()


class _QuantizedServing(nn.Module):
    """int8: the quantized backbone (handler/quantize.py), then the nested heads and softmax in fp32."""

    def __init__(self, backbone: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.backbone, self.heads = backbone, heads

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.backbone(x).float()
        return F.softmax(self.heads(emb).float(), dim=-1), emb


# The LATENCY hint (one stream of ``threads``), and no pinning: OpenVINO's CPU plugin otherwise pins
# its stream's threads to the first cores of the process's affinity, the same cores in every worker,
# so two single-thread workers ran on one core (2026-12-07, AMD EPYC: 24 + 24 img/s pinned, 49 + 49
# unpinned, batch 8, ImageNet size); the workers share the cores with each other and with decoding.
# What NNCF left in float runs in f32 (heads, and what accuracy control put back), as in our int8:
# OpenVINO's default on a CPU with bf16 is bf16, so the parity a set records would depend on the CPU.
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False, "INFERENCE_PRECISION_HINT": "f32"}


class _OpenVINOServing:
    """An OpenVINO program compiled once per static batch size in ``sizes`` (``threads``, the
    LATENCY hint); a batch runs on the smallest graph that holds it, zero-padded, and a batch above
    the largest in chunks, as the AOTInductor package does.

    With ``preprocessing`` the graphs take the uint8 crops as decoded, (B, H, W, 3), and normalize
    them in OpenVINO's own preprocessing steps, on its threads: no float batch is built in Python
    and no channels_last-to-NCHW copy is made (the IR and its fingerprint stay as built)."""

    def __init__(self, program, sizes: Sequence[int], input_size: int, threads: int,
                 preprocessing: Preprocessing | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(program.path))
        shape = [3, input_size, input_size]
        if preprocessing is not None:
            from openvino.preprocess import PrePostProcessor

            ppp = PrePostProcessor(model)
            ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
            ppp.input().model().set_layout(ov.Layout("NCHW"))
            # (x - 255 mean) / (255 std) == (x / 255 - mean) / std, as Normalizer computes it
            ppp.input().preprocess().convert_element_type(ov.Type.f32) \
                .mean([255.0 * m for m in preprocessing.mean]).scale([255.0 * s for s in preprocessing.std])
            model = ppp.build()
            shape = [input_size, input_size, 3]
        self.sizes, self.requests = sorted(set(sizes)), {}
        for b in self.sizes:
            m = model.clone()
            m.reshape({m.inputs[0]: [b, *shape]})
            compiled = core.compile_model(m, "CPU", {**OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": threads})
            self.requests[b] = (compiled.create_infer_request(), compiled.outputs)

    def _run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        request, outputs = self.requests[len(x)]
        out = request.infer(x, share_inputs=True, share_outputs=True)  # no copy of the input
        # copies: the request reuses its output buffers on the next call
        return out[outputs[0]].copy(), out[outputs[1]].copy()

    def __call__(self, x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch in NumPy from end to end (a CPU tensor is viewed, not copied), torch only for
        the answer: after a forward that has swept the caches, each torch op on the way costs tens
        of microseconds, 0.14 ms of a lone request's (docs/benchmarks.md, "Server tuning")."""
        x = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x)
        n, top = len(x), self.sizes[-1]
        probs, embs = [], []
        for start in range(0, n, top):
            chunk = x[start:start + top]
            m = len(chunk)
            b = next(s for s in self.sizes if s >= m)
            if b > m:
                chunk = np.concatenate([chunk, np.zeros((b - m, *chunk.shape[1:]), dtype=chunk.dtype)])
            p, e = self._run(chunk)
            probs.append(p[:m])
            embs.append(e[:m])
        if len(probs) == 1:
            return torch.from_numpy(probs[0]), torch.from_numpy(embs[0])
        return torch.from_numpy(np.concatenate(probs)), torch.from_numpy(np.concatenate(embs))


class Engine:
    """Runs an MRL model with the card's numerics, in channels_last, in one of ``GRAPH_MODES``."""

    def __init__(self, model: MRLResNet50, *, numerics: str = "fp32", device: str | torch.device = "cpu",
                 graph: str = "eager", input_size: int = 224, batch_sizes: Sequence[int] = (1,),
                 channels_last: bool = True, onednn_fusion: bool = True,
                 graph_cache: str | os.PathLike | None = None, cache_key: str = "", emulate: bool = False,
                 int8_program=None, openvino_threads: int | None = None,
                 preprocessing: Preprocessing | None = None) -> None:
        """``emulate``: run bf16 even where the device has no bf16 instructions (same rounding of
        weights and activations to bf16, fp32 accumulation, about 5x slower than fp32 on an AVX2
        CPU). For calibrating a bf16 set of thresholds on such a machine, never for serving.

        ``numerics='int8'`` needs ``int8_program`` (a ``handler.quantize.Program``): the quantized
        backbone runs as its AOTInductor package where it has one for this CPU (graph 'aoti'), else
        under torch.compile with inductor freezing (graph 'compile'), whatever ``graph`` says. Given
        a ``handler.quantize.OpenVINOProgram`` instead, OpenVINO runs it (graph 'openvino'): a
        ValueError where the openvino package is not installed. It runs on ``openvino_threads``
        threads (default: torch's, as configured for this process), and with ``preprocessing`` it
        normalizes the uint8 crops itself: ``model_input`` gives each engine its batch."""
        if numerics not in ("fp32", "bf16", "int8"):
            raise ValueError(f"numerics must be 'fp32', 'bf16' or 'int8', got {numerics!r}")
        if numerics == "int8":
            if int8_program is None:
                raise ValueError("numerics 'int8' needs the quantized backbone (handler/quantize.py)")
            if torch.device(device).type != "cpu":
                raise ValueError("numerics 'int8' runs on CPU (X86InductorQuantizer)")
            graph = "compile"
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {GRAPH_MODES}, got {graph!r}")
        self.device = torch.device(device)
        if numerics == "bf16" and not emulate and not numerics_mod.bf16_supported(self.device):
            raise ValueError(f"numerics 'bf16' is not supported on {self.device}; serve with 'fp32'")
        self.numerics, self.graph, self.nesting = numerics, graph, model.nesting
        self.onednn_fusion = False
        self.graph_cached = False  # the frozen graph came from ``graph_cache`` (no trace this start)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast = numerics == "bf16"
        self.fused_input = False  # OpenVINO with ``preprocessing``: uint8 crops in (model_input)
        module = Serving(model.eval().to(self.device, memory_format=self.memory_format)).eval()
        example = torch.zeros(max(batch_sizes), 3, input_size, input_size, device=self.device
                              ).to(memory_format=self.memory_format)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if numerics == "int8" and getattr(int8_program, "runtime", "torch") == "openvino":
                module = self._openvino_module(int8_program, batch_sizes, input_size,
                                               openvino_threads or torch.get_num_threads(), preprocessing)
            elif numerics == "int8":
                module = self._int8_module(model, int8_program)
            elif graph == "jit":
                # A process-wide switch, read when the profiling executor optimizes the graph
                # (during warm-up below); one Engine per worker process, so setting it is safe.
                self.onednn_fusion = onednn_fusion and self.device.type == "cpu"
                torch.jit.enable_onednn_fusion(self.onednn_fusion)
                # Autocast's weight cache would be baked into the trace as constants of the
                # wrong dtype; the notes in torch.jit's autocast docs ask for cache_enabled=False.
                cached = self._cached_graph(graph_cache, cache_key, example)
                if cached is not None:
                    module = cached
                else:
                    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast,
                                        cache_enabled=False):
                        traced = torch.jit.trace(module, example, check_trace=False)
                    module = torch.jit.freeze(traced)
                    self._save_graph(module, graph_cache, cache_key, example)
            elif graph == "compile":
                import torch._inductor.config as inductor_config
                inductor_config.freezing = True  # fold weights and BN into the graph
                module = torch.compile(module, dynamic=False)
        self.module = module
        t1 = time.perf_counter()
        # int8's package: every static graph once (a batch of 3 runs on the graph for 4).
        self.warm_up(sorted({*batch_sizes, *getattr(getattr(module, "backbone", None), "sizes", ()),
                             *getattr(module, "sizes", ())}), input_size)
        # Where a worker's start goes (logged by the TorchServe handler; bench/recovery.py reads it).
        self.timings = {"graph_s": t1 - t0, "warm_up_s": time.perf_counter() - t1}

    def _openvino_module(self, program, batch_sizes: Sequence[int], input_size: int, threads: int,
                         preprocessing: Preprocessing | None) -> _OpenVINOServing:
        if numerics_mod.openvino_versions() is None:
            raise ValueError("this int8 program runs on OpenVINO, which is not installed: pip install openvino (setup/runtime.txt)")
        if program.meta.get("input_size", input_size) != input_size:
            raise ValueError(f"the OpenVINO program {program.path} takes {program.meta['input_size']}px "
                             f"inputs, this model {input_size}px")
        self.graph = "openvino"
        sizes = {*package_batches(max(batch_sizes)), *batch_sizes}
        self.fused_input = preprocessing is not None
        return _OpenVINOServing(program, sizes, input_size, threads, preprocessing)

    def _int8_module(self, model: MRLResNet50, program) -> nn.Module:
        """The program's AOTInductor package where it was compiled for this CPU (loads in about a
        second), else the program under torch.compile (two compiles at every start)."""
        import torch._inductor.config as inductor_config

        package = usable_package(program)
        if package is not None:
            self.graph = "aoti"
            return _QuantizedServing(load_package(program, package), model.fc.float().eval())

        # Measured: a start with inductor's cache warm compiles as long as a cold one (the package
        # above is the remedy).
        inductor_config.freezing = True
        # No .eval() on the wrapper: an exported module refuses train(); it holds no BN or dropout.
        module = _QuantizedServing(load_backbone(program), model.fc.float().eval())
        # Dynamic batch: one graph for batch 1 (specialized) and one for every other size.
        return torch.compile(module, dynamic=True)

    def _graph_file(self, folder, key: str, example: torch.Tensor) -> Path | None:
        """Where the frozen graph for this model and these settings lives in ``folder``: a name
        that changes with anything that changes the graph (the model's ``key``, e.g. its
        checkpoint's sha256, torch's version, numerics, device, memory format, input shape)."""
        if folder is None or not key:
            return None
        what = json.dumps([key, torch.__version__, self.numerics, str(self.device), str(self.memory_format),
                           list(example.shape)])
        return Path(folder) / f"frozen-{hashlib.sha256(what.encode()).hexdigest()[:16]}.pt"

    def _cached_graph(self, folder, key: str, example: torch.Tensor):
        path = self._graph_file(folder, key, example)
        if path is None or not path.exists():
            return None
        try:
            module = torch.jit.load(str(path), map_location=self.device)
        except (RuntimeError, OSError) as exc:  # a damaged file: trace again, and overwrite it
            log.warning("cached graph %s could not be loaded (%s): tracing again", path, exc)
            return None
        self.graph_cached = True
        return module

    def _save_graph(self, module, folder, key: str, example: torch.Tensor) -> None:
        path = self._graph_file(folder, key, example)
        if path is None:
            return
        try:  # written whole, then renamed: a worker starting beside this one never reads half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            torch.jit.save(module, str(tmp))
            os.replace(tmp, path)
        except OSError as exc:  # a read-only folder costs the next start a trace, nothing else
            log.warning("could not cache the frozen graph in %s: %s", folder, exc)

    def _autocast(self):
        # A traced graph already holds its casts; autocast applies to eager and compiled modules.
        enabled = self.autocast and self.graph != "jit"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def release_cores(self) -> None:
        """For a process that runs this engine alone (a worker), once it is built: where OpenVINO
        runs the whole model on its own threads, torch, left with preprocessing, keeps one thread,
        so that its OpenMP team does not spin after each op (GOMP_SPINCOUNT, SERVER_ENV) on the
        cores OpenVINO needs (docs/benchmarks.md). Nothing changes for torch's own graphs."""
        if self.graph == "openvino":
            torch.set_num_threads(1)

    def warm_up(self, batch_sizes: Sequence[int], input_size: int) -> None:
        """Run each serving batch size once (twice for jit: its profiling executor optimizes on
        the second call), so that no user request pays for compilation."""
        for b in batch_sizes:
            x = self.example(b, input_size, random=False)
            for _ in range(2 if self.graph == "jit" else 1):
                self(x)

    def model_input(self, crops: list[np.ndarray], normalize: Normalizer) -> torch.Tensor | np.ndarray:
        """A batch of uint8 crops (``crop_image``) as this engine takes it: normalized floats in
        ``memory_format`` (``normalize``), or, where OpenVINO normalizes in its graph
        (``fused_input``), the crops stacked as a uint8 array (B, H, W, 3), grayscale replicated."""
        if not self.fused_input:
            return normalize(crops)
        batch = np.stack(crops)
        if batch.ndim == 3:  # grayscale (B, H, W): the same pixel in each channel, as Normalizer
            batch = np.repeat(batch[..., None], 3, axis=-1)
        return batch

    def example(self, batch: int, input_size: int, *, random: bool = True) -> torch.Tensor:
        """A batch of ``batch`` inputs of this engine's kind (random or zeros), for warm-up and timing."""
        if self.fused_input:
            shape = (batch, input_size, input_size, 3)
            return torch.randint(0, 256, shape, dtype=torch.uint8) if random else torch.zeros(shape, dtype=torch.uint8)
        x = torch.randn(batch, 3, input_size, input_size) if random else torch.zeros(batch, 3, input_size, input_size)
        return x.to(self.device, memory_format=self.memory_format)

    def __call__(self, x: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) normalized images -> ((B, S, C) probabilities, (B, 2048) embedding), fp32;
        with ``fused_input`` (B, H, W, 3) uint8 crops (``model_input``: an array or a tensor)."""
        if self.fused_input:  # OpenVINO's graph: no torch op on the way (_OpenVINOServing)
            return self.module(x)
        return self._forward(x)

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            probs, emb = self.module(x.to(self.device, memory_format=self.memory_format, non_blocking=True))
        return probs, emb


def configure_threads(threads: int | None = None) -> int:
    """Pin intra-op threads to the cores we have (or ``threads``); one inter-op thread.

    Called once by a worker at start, never at import time.
    """
    n = threads or int(os.environ.get("MRL_THREADS", 0)) or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process: keep it
        pass
    return n
