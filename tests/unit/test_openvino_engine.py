"""The OpenVINO engine option (issue #36): when it runs the int8 model (choose_runtime), its refusal
of a thresholds set that failed parity, the fallback without the openvino package, and a real
NNCF-quantized program served through MRLService with the cascade unchanged."""
import sys

import numpy as np
import pytest
import torch

from calibration import openvino_int8
from handler import quantize
from handler.engine import Engine
from handler.numerics import OPENVINO_SET, choose_runtime, openvino_versions

ZEN5 = {"avx2": True, "avx512f": True, "vnni": True, "avx512_bf16": True, "amx": False}
AVX2 = {"avx2": True, "avx512f": False, "vnni": False, "avx512_bf16": False, "amx": False}
DEMO = "model_store/fashion_mnist/mrl_resnet50_fp16.pt"


def _sets(passed=True, speed=1.6, isa="avx512_bf16"):
    meta = {"parity": {"passed": passed}, "speed": {isa: {"openvino_over_torch": speed}} if speed else {}}
    return {"fp32": {}, "int8": {"meta": {"parity": {"passed": True}}}, OPENVINO_SET: {"meta": meta}}


def test_torch_runs_int8_unless_openvino_is_asked_for():
    assert choose_runtime("torch", "int8", _sets(), True, ZEN5, openvino=True) == ("torch", "the default")
    assert choose_runtime("openvino", "int8", _sets(), True, ZEN5, openvino=True) == ("openvino", "asked for")
    with pytest.raises(ValueError, match="runtime must be one of"):
        choose_runtime("ov", "int8", _sets(), True, ZEN5, openvino=True)


def test_auto_picks_openvino_only_where_it_passed_parity_and_measured_faster_on_this_cpu():
    assert choose_runtime("auto", "int8", _sets(), True, ZEN5, openvino=True) == (
        "openvino", "auto: passed parity, measured 1.60x our int8 on avx512_bf16")
    # measured on another CPU class only: not this one's figure
    assert choose_runtime("auto", "int8", _sets(), True, AVX2, openvino=True) == (
        "torch", "auto (openvino: not measured on avx2)")
    assert choose_runtime("auto", "int8", _sets(speed=0.95), True, ZEN5, openvino=True) == (
        "torch", "auto (openvino: measured 0.95x our int8 on avx512_bf16, not faster)")
    assert choose_runtime("auto", "bf16", _sets(), True, ZEN5, openvino=True) == (
        "torch", "auto (openvino: serves int8 only)")
    assert choose_runtime("auto", "int8", _sets(), False, ZEN5, openvino=True) == (
        "torch", "auto (openvino: no OpenVINO program in the archive)")
    no_set = {k: v for k, v in _sets().items() if k != OPENVINO_SET}
    assert choose_runtime("auto", "int8", no_set, True, ZEN5, openvino=True) == (
        "torch", f"auto (openvino: no thresholds set '{OPENVINO_SET}')")


def test_auto_refuses_a_set_that_failed_parity_however_fast():
    assert choose_runtime("auto", "int8", _sets(passed=False, speed=2.0), True, ZEN5, openvino=True) == (
        "torch", "auto (openvino: its thresholds set did not pass parity with fp32)")


def test_without_the_openvino_package_auto_falls_back_and_a_request_for_it_is_refused(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    assert openvino_versions() is None
    assert choose_runtime("auto", "int8", _sets(), True, ZEN5) == (
        "torch", "auto (openvino: not installed (pip install openvino, setup/runtime.txt))")
    with pytest.raises(ValueError, match=r"not installed \(pip install openvino, setup/runtime.txt\)"):
        choose_runtime("openvino", "int8", _sets(), True, ZEN5)
    with pytest.raises(ValueError, match="needs openvino and nncf"):
        openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=8, cache=tmp_path)
    program = quantize.OpenVINOProgram(tmp_path / "p.xml", {"fingerprint": "x", "input_size": 32})
    from handler.checkpoint import load_mrl_resnet50
    model, _ = load_mrl_resnet50(DEMO, numerics="fp32")
    with pytest.raises(ValueError, match="runs on OpenVINO, which is not installed"):
        Engine(model, numerics="int8", int8_program=program, input_size=32, batch_sizes=(8,))


def test_a_real_openvino_program_serves_through_the_same_service(tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from bench.harness import demo_inputs
    from handler.checkpoint import load_mrl_resnet50
    from handler.service import MRLService
    from handler.thresholds import OperatingPoints

    program = openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=16, cache=tmp_path)
    assert quantize.open_openvino(program.path).fingerprint == program.fingerprint
    assert openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=16, cache=tmp_path).path == program.path
    model, card = load_mrl_resnet50(DEMO, numerics="fp32")
    svc = MRLService(model, card, OperatingPoints.fixed(card.nesting), numerics="int8", int8_program=program,
                     batch_sizes=(8,))
    assert svc.engine.graph == "openvino" and svc.engine.module.sizes == [1, 2, 4, 8]
    # unpinned, on the threads asked for: pinned, every worker's threads went to the same first cores
    compiled = [request.get_compiled_model() for request, _ in svc.engine.module.requests.values()]
    assert [c.get_property("ENABLE_CPU_PINNING") for c in compiled] == [False] * 4
    assert {str(c.get_property("INFERENCE_PRECISION_HINT")) for c in compiled} == {"<Type: 'float32'>"}
    assert {c.get_property("INFERENCE_NUM_THREADS") for c in compiled} == {torch.get_num_threads()}
    one = MRLService(model, card, OperatingPoints.fixed(card.nesting), numerics="int8", int8_program=program,
                       batch_sizes=(1,), openvino_threads=1).engine.module.requests[1][0].get_compiled_model()
    assert one.get_property("INFERENCE_NUM_THREADS") == 1
    # the demo's crops are grayscale (H, W) uint8; OpenVINO takes them as (B, H, W, 3) and normalizes
    crops = [np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8) for i in range(11)]
    x = svc.engine.model_input(crops, svc.normalize)
    assert svc.engine.fused_input and x.dtype == np.uint8 and x.shape == (11, 32, 32, 3)
    probs, emb = svc.engine(x)
    assert probs.shape == (11, len(card.nesting), 10) and emb.shape == (11, 2048)
    assert probs.dtype == torch.float32 and emb.dtype == torch.float32
    # padding and chunks change nothing: 11 = 8 + 3 (run on the batch-4 graph, zero-padded)
    p8, _ = svc.engine(x[:8])
    p4, _ = svc.engine(np.concatenate([x[8:], np.zeros_like(x[:1])]))
    assert torch.equal(probs[:8], p8) and torch.equal(probs[8:], p4[:3])
    # a tensor of the same crops (the warm-up's examples are tensors) gives the same answer
    assert torch.equal(svc.engine(torch.from_numpy(x))[0], probs)
    # normalizing in OpenVINO's graph computes what Normalizer's floats give the same program
    floats = Engine(model, numerics="int8", int8_program=program, input_size=32, batch_sizes=(8,))
    assert not floats.fused_input and svc.engine.example(2, 32).shape == (2, 32, 32, 3)
    p_float, e_float = floats(floats.model_input(crops, svc.normalize))
    assert torch.allclose(p_float, probs, atol=1e-4) and torch.allclose(e_float, emb, rtol=1e-3, atol=1e-3)
    # the same request path as any engine: 8 test images answered at the fixed 2048-d point, and as
    # fp32 answers them (the demo model is sure of these; calibrated on only 16 images here)
    bodies = demo_inputs(8)
    answers = svc.handle([{"body": b} for b in bodies])
    assert [status for status, _ in answers] == [200] * 8
    assert {(body["embedding_dim"], body["operating_point"]) for _, body in answers} == {(2048, "fixed_2048")}
    fp32_model, _ = load_mrl_resnet50(DEMO, numerics="fp32")
    fp32 = MRLService(fp32_model, card, OperatingPoints.fixed(card.nesting), numerics="fp32", batch_sizes=(8,))
    assert [b["label"] for _, b in answers] == [b["label"] for _, b in fp32.handle([{"body": b} for b in bodies])]
    # a worker then leaves torch one thread (OpenVINO's own run the model); torch's graphs keep theirs
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fp32.engine.release_cores()
        assert torch.get_num_threads() == 2
        svc.engine.release_cores()
        assert torch.get_num_threads() == 1
        assert svc.handle([{"body": bodies[0]}])[0][1]["label"] == answers[0][1]["label"]
    finally:
        torch.set_num_threads(threads)


def _model_folder(tmp_path, program, *, fingerprint=None, speed=1.5, passed=True):
    """A model folder as an archive unpacks it: the demo checkpoint, its thresholds with an
    openvino-int8 set recording ``program`` (or ``fingerprint``), and OpenVINO's IR beside it."""
    import json
    import shutil

    from handler.cpus import cpu_isa, isa_name
    from handler.thresholds import numerics_sets

    folder = tmp_path / "model"
    folder.mkdir(parents=True)
    shutil.copy(DEMO, folder / "checkpoint.pt")
    for suffix in (".xml", ".bin", ".json"):
        shutil.copy(program.path.with_suffix(suffix), (folder / "openvino").with_suffix(suffix))
    (folder / "int8.pt2").write_bytes(b"our int8 program (not opened when OpenVINO serves)")
    doc = json.loads(open("model_store/fashion_mnist/thresholds.json").read())
    ov_set = json.loads(json.dumps(numerics_sets(doc)["int8"]))
    ov_set["meta"].update(numerics=OPENVINO_SET, parity={"passed": passed},
                          speed={isa_name(cpu_isa()): {"openvino_over_torch": speed}})
    ov_set["meta"]["int8_program"] = {**{k: program.meta[k] for k in ("data", "images", "reduce_range")},
                                      "fingerprint": fingerprint or program.fingerprint, "runtime": "openvino"}
    doc["sets"][OPENVINO_SET] = ov_set
    (folder / "thresholds.json").write_text(json.dumps(doc))
    return folder, ov_set


def test_from_dir_serves_openvino_under_auto_with_its_own_set_and_refuses_another_programs_set(tmp_path):
    from handler.service import MRLService

    program = openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=16, cache=tmp_path / "cache")
    folder, _ = _model_folder(tmp_path, program)
    svc = MRLService.from_dir(folder, numerics="int8", runtime="auto", graph_cache=False, batch_sizes=(1, 2))
    assert svc.engine.graph == "openvino" and svc.points.meta["numerics"] == OPENVINO_SET
    assert svc.points.meta["int8_program"]["fingerprint"] == program.fingerprint
    with pytest.raises(ValueError, match="runtime 'openvino' runs int8 only"):
        MRLService.from_dir(folder, numerics="fp32", runtime="openvino", graph_cache=False)
    other, _ = _model_folder(tmp_path / "other", program, fingerprint="0" * 64)
    with pytest.raises(ValueError, match=f"the {OPENVINO_SET} thresholds were fit on OpenVINO program 0000"):
        MRLService.from_dir(other, numerics="int8", runtime="openvino", graph_cache=False)


def test_an_accuracy_controlled_build_is_its_own_program_and_its_record_rebuilds_it(tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    import functools
    import json

    from handler.thresholds import numerics_sets

    cache = tmp_path / "cache"
    plain = openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=16, cache=cache)
    control = openvino_int8.accuracy_control("fashion-mnist:train", images=32, max_drop=0.004)
    program = openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=16, cache=cache, accuracy=control)
    assert program.path != plain.path and "accuracy_control" not in plain.meta
    record = program.meta["accuracy_control"]
    assert {k: record[k] for k in control} == control and 0 < record["fake_quantize_ops"]
    assert isinstance(record["float_ops"], dict)  # what the search left in float (on 32 sure images: maybe none)
    # a plain rebuild ignores the recorded ops: with the stem convolution in float, fewer quantizers
    stem = openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=16, cache=cache,
                                        accuracy={**control, "float_ops": {"Convolution": [0]}})
    plain_fq = plain.path.read_text().count('type="FakeQuantize"')
    assert stem.meta["accuracy_control"]["fake_quantize_ops"] < plain_fq and stem.fingerprint != plain.fingerprint
    # built again after all those conversions (OpenVINO's op counter moved on): the same bytes
    again = openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=16, cache=tmp_path / "again")
    assert again.fingerprint == plain.fingerprint
    with pytest.raises(ValueError, match="no op at some of the recorded float positions"):
        openvino_int8.build_openvino(DEMO, "fashion-mnist:holdout", images=16, cache=cache,
                                     accuracy={**control, "float_ops": {"Convolution": [999]}})
    # a thresholds set that records it rebuilds this program, not the plain one
    doc = json.loads(open("model_store/fashion_mnist/thresholds.json").read())
    ov_set = numerics_sets(doc)[OPENVINO_SET]
    ov_set["meta"]["int8_program"] = {"data": "fashion-mnist:holdout", "images": 16, "fingerprint": program.fingerprint,
                                      "runtime": "openvino", "accuracy_control": record}
    (tmp_path / "thresholds.json").write_text(json.dumps(doc))
    monkeypatch.setattr(openvino_int8, "build_openvino", functools.partial(openvino_int8.build_openvino, cache=cache))
    assert openvino_int8.for_thresholds(DEMO, tmp_path / "thresholds.json").path == program.path
    with pytest.raises(ValueError, match="max_drop"):
        openvino_int8.accuracy_control("fashion-mnist:train", max_drop=0)


def test_fit_thresholds_refuses_accuracy_control_on_the_parity_holdout():
    from calibration import fit_thresholds

    with pytest.raises(SystemExit):
        fit_thresholds.main(["--checkpoint", str(DEMO), "--data", "fashion-mnist:holdout", "--out", "/nonexistent/t.json",
                             "--numerics", OPENVINO_SET, "--openvino-validation", "fashion-mnist:holdout"])
    with pytest.raises(SystemExit):
        fit_thresholds.main(["--checkpoint", str(DEMO), "--data", "fashion-mnist:holdout", "--out", "/nonexistent/t.json",
                             "--numerics", "int8", "--openvino-validation", "fashion-mnist:train"])
