"""int8 numerics: the quantized backbone (handler/quantize.py), the Engine that runs it, and how a
worker chooses its numerics (handler/numerics.py: choose_numerics)."""
import json

import numpy as np
import pytest
import torch

from calibration import int8
from handler import cpus, numerics, quantize
from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.cpus import cpu_isa
from handler.engine import Engine
from handler.numerics import AUTO_ORDER, choose_numerics
from handler.service import MRLService
from handler.thresholds import SCHEMA, SETS_SCHEMA

AMX = {"avx2": True, "avx512f": True, "vnni": True, "avx512_bf16": True, "amx": True}
AVX2 = {"avx2": True, "avx512f": False, "vnni": False, "avx512_bf16": False, "amx": False}
PASSED = {"meta": {"parity": {"passed": True}}}


def test_auto_takes_the_fastest_mode_this_cpu_runs_that_has_a_set():
    sets = {"fp32": {}, "bf16": {}, "int8": PASSED}
    assert choose_numerics("auto", "bf16", sets, True, isa=AMX)[0] == "int8"
    assert choose_numerics("auto", "bf16", sets, True, isa=AVX2)[0] == AUTO_ORDER["avx2"][0]
    # No int8 set, no int8 backbone, or an int8 set that failed parity: the next mode, and why.
    for s, has in (({"fp32": {}, "bf16": {}}, True), (sets, False),
                   ({**sets, "int8": {"meta": {"parity": {"passed": False}}}}, True)):
        mode, why = choose_numerics("auto", "bf16", s, has, isa=AMX)
        assert mode == "bf16" and "int8" in why
    # bf16 is never auto's choice on AVX2 (emulated, slow): a bf16-only file leaves it nothing to serve.
    with pytest.raises(ValueError, match="auto found no numerics to serve on avx2"):
        choose_numerics("auto", "bf16", {"bf16": {}}, False, isa=AVX2)
    # An int8 set fit with 8-bit activations: served where VNNI is, skipped (and why) where it is not.
    eight = {"fp32": {}, "int8": {"meta": {"parity": {"passed": True}, "int8_program": {"reduce_range": False}}}}
    VNNI = {**AVX2, "avx512f": True, "vnni": True}
    assert choose_numerics("auto", "fp32", eight, True, isa=VNNI)[0] == "int8"
    mode, why = choose_numerics("auto", "fp32", eight, True, isa=AVX2)
    assert mode == "fp32" and "8-bit activations, which saturate without VNNI" in why
    # A model without thresholds (fixed 2048): any float mode, never an unchecked int8.
    assert choose_numerics("auto", "fp32", None, True, isa=AVX2)[0] == "fp32"


def test_auto_orders_fp32_and_bf16_by_what_this_cpu_measures(monkeypatch):
    """AVX512-BF16 without AMX: bf16 ran at half fp32's rate on a Xeon and at four times it on a
    Zen 5, so the flags cannot order them; the worker measures, and only when it has to."""

    BF16 = {**AMX, "amx": False}
    floats = {"fp32": {}, "bf16": {}}
    mode, why = choose_numerics("auto", "fp32", floats, False, isa=BF16, bf16_speedup=4.0)
    assert mode == "bf16" and "bf16 matmuls at 4.00x fp32's here" in why
    assert choose_numerics("auto", "bf16", floats, False, isa=BF16, bf16_speedup=0.5)[0] == "fp32"
    assert choose_numerics("auto", "bf16", {"bf16": {}}, False, isa=BF16, bf16_speedup=0.5)[0] == "bf16"

    def no_probe():
        raise AssertionError("measured although int8 serves, or only one float mode could")

    monkeypatch.setattr(numerics, "bf16_matmul_speedup", no_probe)
    assert choose_numerics("auto", "fp32", {**floats, "int8": PASSED}, True, isa=BF16)[0] == "int8"
    assert choose_numerics("auto", "fp32", {"fp32": {}}, True, isa=BF16)[0] == "fp32"
    assert choose_numerics("auto", "fp32", floats, False, isa=AMX)[0] == "bf16"  # AMX: from the flags
    monkeypatch.setattr(numerics, "bf16_matmul_speedup", lambda: 2.0)
    assert choose_numerics("auto", "fp32", None, True, isa=BF16)[0] == "bf16"  # no thresholds: any float mode


def test_explicit_numerics():
    assert choose_numerics("card", "fp32", None, False)[0] == "fp32"
    assert choose_numerics("fp32", "bf16", None, False)[0] == "fp32"
    with pytest.raises(ValueError, match="needs the quantized backbone"):
        choose_numerics("int8", "fp32", None, False)
    with pytest.raises(ValueError, match="numerics must be one of"):
        choose_numerics("fp16", "fp32", None, False)


@pytest.fixture(scope="module")
def program(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    data = root / "calib"
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(32):
        (data / str(i % 10)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(data / str(i % 10) / f"{i}.png")
    return int8.build(tiny_checkpoint, str(data), images=32, cache=root / "cache")


def test_the_quantized_backbone_runs_close_to_fp32_and_is_cached(tiny_checkpoint, program, tmp_path):
    assert program.meta["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    assert program.meta["reduce_range"] == (not cpus.cpu_has_vnni())  # 7-bit activations without VNNI
    assert program.path.stat().st_size < 40 * 2**20  # int8 weights only: the fp32 originals are dropped
    again = int8.build(tiny_checkpoint, program.meta["data"], images=32, cache=program.path.parent)
    assert again.path == program.path and again.fingerprint == program.fingerprint  # from the cache
    model, card = load_mrl_resnet50(tiny_checkpoint)
    x = torch.randn(5, 3, 32, 32)
    fp32 = Engine(model, numerics="fp32", input_size=32, batch_sizes=(5,))
    served = Engine(model, numerics="int8", int8_program=program, input_size=32, batch_sizes=(1, 5),
                    graph_cache=tmp_path / "gc")
    assert served.graph == "compile"
    (p32, e32), (p8, e8) = fp32(x), served(x)
    assert p8.shape == p32.shape and e8.shape == e32.shape and p8.dtype == torch.float32
    assert torch.allclose(p8.sum(-1), torch.ones(5, p8.shape[1]), atol=1e-4)
    # Quantization noise, not another function: embeddings correlate closely with fp32's.
    cos = torch.nn.functional.cosine_similarity(e8, e32, dim=-1)
    assert cos.min() > 0.95, cos
    assert (p8[:1] - served(x[:1])[0]).abs().max() < 1e-4  # batch 1 (its own graph) gives the same rows


def test_an_8_bit_record_is_not_rebuilt_on_a_cpu_without_vnni(tiny_checkpoint, program, tmp_path, monkeypatch):
    record = {k: program.meta[k] for k in int8.RECORD}
    doc = {"schema": SETS_SCHEMA, "sets": {"int8": {"meta": {"numerics": "int8",
                                                              "int8_program": {**record, "reduce_range": False}}}}}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    monkeypatch.setattr(int8, "cpu_has_vnni", lambda: False)
    with pytest.raises(ValueError, match="8-bit activations, which saturate on a CPU without VNNI"):
        int8.for_thresholds(tiny_checkpoint, tmp_path / "t.json")


def test_a_rebuild_from_a_record_uses_its_activation_scales(tiny_checkpoint, program):
    # The record's scales, not this machine's calibration, make the program: a scale moved by a
    # rounding-sized amount is what the rebuild computes (so another CPU's record reproduces here).
    recorded = program.meta["activation_qparams"]
    assert len(recorded) > 10 and all(s > 0 and isinstance(z, int) for s, z in recorded.values())
    name = sorted(recorded)[0]
    nudged = {**recorded, name: [recorded[name][0] * 1.001, recorded[name][1]]}
    again = int8.build(tiny_checkpoint, program.meta["data"], images=32, activation_qparams=nudged,
                           cache=program.path.parent)
    assert again.path != program.path and again.fingerprint != program.fingerprint
    assert again.meta["activation_qparams"] == nudged
    code = int8.torch.export.load(str(again.path)).graph_module.code
    assert repr(nudged[name][0]) in code or repr(float(torch.tensor(nudged[name][0]))) in code
    same = int8.build(tiny_checkpoint, program.meta["data"], images=32, activation_qparams=recorded,
                          cache=program.path.parent / "other")
    assert same.fingerprint == program.fingerprint  # the recorded scales are this calibration's
    # A record from another calibration (a scale 5 % off, or an observer this graph lacks) is refused.
    for bad, match in (({**recorded, name: [recorded[name][0] * 1.05, recorded[name][1]]}, "not the same calibration"),
                       ({**recorded, "activation_post_process_9999": [0.1, 0]}, "observers this graph lacks")):
        with pytest.raises(ValueError, match=match):
            int8.build(tiny_checkpoint, program.meta["data"], images=32, activation_qparams=bad,
                           cache=program.path.parent)


def test_an_8_bit_program_is_refused_on_a_cpu_without_vnni(program, tmp_path):
    meta = {**program.meta, "reduce_range": False}
    eight = quantize.Program(program.path, meta)
    if cpus.cpu_has_vnni():
        assert quantize.load_backbone(eight) is not None
    else:
        with pytest.raises(ValueError, match="saturates on a CPU without VNNI"):
            quantize.load_backbone(eight)
    # A program file that does not match its meta is refused.
    (tmp_path / "int8.pt2").write_bytes(program.path.read_bytes()[:-1])
    (tmp_path / "int8.json").write_text(json.dumps(program.meta))
    with pytest.raises(ValueError, match="does not match its meta"):
        quantize.open_program(tmp_path / "int8.pt2")


def test_a_worker_refuses_int8_thresholds_fit_on_another_backbone(tiny_checkpoint, program, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "checkpoint.pt").symlink_to(tiny_checkpoint)
    (folder / "int8.pt2").symlink_to(program.path)
    (folder / "int8.json").write_text(json.dumps(program.meta))
    keys = ["8", "16", "32", "64", "128", "256", "512", "1024"]
    doc = {"schema": SCHEMA, "default": "balanced",
           "operating_points": {"balanced": {"thresholds": dict.fromkeys(keys, 0.5)}},
           "meta": {"nesting": [8, 16, 32, 64, 128, 256, 512, 1024, 2048],
                    "checkpoint_sha256": file_sha256(tiny_checkpoint), "numerics": "int8",
                    "int8_program": {"fingerprint": "0" * 64}}}
    (folder / "thresholds.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="fit on quantized backbone 0+ but"):
        MRLService.from_dir(folder, numerics="int8", graph_cache=False)
    # auto does not take an int8 set without a parity record; this file has no other set.
    with pytest.raises(ValueError, match="auto found no numerics to serve.*int8: its thresholds set did not pass"):
        MRLService.from_dir(folder, numerics="auto", graph_cache=False)


def test_cpu_isa_reads_the_flags():
    isa = cpu_isa()
    assert set(isa) == set(AMX) and all(isinstance(v, bool) for v in isa.values())


def test_static_batch_graphs_pad_up_and_chunk():
    seen = []

    def runner(x):
        seen.append(len(x))
        assert x.is_contiguous(memory_format=torch.channels_last)
        return x.flatten(1).sum(1, keepdim=True)

    assert quantize.package_batches(8) == (1, 2, 4, 8) and quantize.package_batches(6) == (1, 2, 4, 6)
    module = quantize._StaticBatches({b: runner for b in (1, 2, 4)})
    x = torch.randn(11, 3, 4, 4)
    out = module(x)
    assert seen == [4, 4, 4]  # 4 + 4 + 3 padded to 4
    torch.testing.assert_close(out, x.flatten(1).sum(1, keepdim=True))
    seen.clear()
    assert module(x[:3]).shape == (3, 1) and seen == [4]
    seen.clear()
    assert module(x[:1]).shape == (1, 1) and seen == [1]
