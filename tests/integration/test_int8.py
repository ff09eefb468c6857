"""int8 in a real TorchServe: an archive built with --numerics int8 carries the quantized backbone and
its AOTInductor package; its worker loads the package, says so (log lines and mrl_numerics_info),
and answers as the same program does in process under torch.compile."""
import tempfile
from pathlib import Path

import numpy as np
import pytest

from calibration import int8, openvino_int8
from client.http import run_load
from handler.checkpoint import load_mrl_resnet50
from handler.service import MRLService
from handler.thresholds import OperatingPoints
from tests.integration.server import running_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory, test_images):
    root = tmp_path_factory.mktemp("calib")
    for i, body in enumerate(test_images[:40]):
        (root / str(i % 10)).mkdir(exist_ok=True)
        (root / str(i % 10) / f"{i}.png").write_bytes(body)
    return root


def test_an_int8_archive_serves_its_quantized_backbone(tiny_checkpoint, calibration_folder, test_images, tmp_path):
    extracted = set(Path(tempfile.gettempdir()).glob("aotinductor_*"))
    with running_server(tmp_path, tiny_checkpoint, numerics="int8", int8_data=str(calibration_folder),
                        batch_size=4, batch_delay=5, workers=1) as server:
        log = (server.root / "logs" / "model_log.log").read_text(errors="replace")
        assert "numerics int8, requested int8" in log
        assert "graph=aoti numerics=int8" in log  # the package, not a compile at start
        images = test_images[:24]
        served = run_load(server.client(), images, concurrency=4, count=len(images), headers={"X-MRL-Dim": "2048"})
        assert {r.status for r in served} == {200}
        scrape = server.scrape()
        assert 'mrl_numerics_info{' in scrape and 'numerics="int8"' in scrape
    # torch's loader leaves its extraction of each package in the temp dir when a signal ends the
    # worker (~26 MB a package per worker start); ours is gone once the package is loaded.
    assert set(Path(tempfile.gettempdir()).glob("aotinductor_*")) == extracted
    # The same program in process (int8.build finds the one the archive builder made).
    answers_as_in_process(served, tiny_checkpoint, int8.build(tiny_checkpoint, str(calibration_folder)), images)


def test_an_openvino_archive_serves_int8_on_openvino_with_torch_on_one_thread(
        tiny_checkpoint, calibration_folder, test_images, tmp_path):
    """--runtime openvino: the archive carries OpenVINO's int8 IR beside our program; its worker
    runs it (graph=openvino), leaves torch one thread, and answers as the IR does in process."""
    with running_server(tmp_path, tiny_checkpoint, numerics="int8", runtime="openvino",
                        int8_data=str(calibration_folder), batch_size=4, batch_delay=5, workers=1,
                        threads=2) as server:
        log = (server.root / "logs" / "model_log.log").read_text(errors="replace")
        assert "int8 runtime openvino, requested openvino: asked for" in log
        assert "threads=2 graph=openvino numerics=int8" in log
        images = test_images[:24]
        served = run_load(server.client(), images, concurrency=4, count=len(images), headers={"X-MRL-Dim": "2048"})
        assert {r.status for r in served} == {200}
    program = openvino_int8.build_openvino(tiny_checkpoint, str(calibration_folder))  # the archive builder's, cached
    answers_as_in_process(served, tiny_checkpoint, program, images)


def answers_as_in_process(served, checkpoint, program, images) -> None:
    """The server's answers are the int8 ``program``'s answers in process, image for image."""
    model, card = load_mrl_resnet50(checkpoint)
    svc = MRLService(model, card, OperatingPoints.fixed(card.nesting), numerics="int8", int8_program=program,
                     batch_sizes=(1, 4))
    local = [body for _, body in svc.handle([{"body": b} for b in images])]
    assert [r.body["class_index"] for r in served] == [b["class_index"] for b in local]
    np.testing.assert_allclose([r.body["confidence"] for r in served], [b["confidence"] for b in local], atol=2e-3)
