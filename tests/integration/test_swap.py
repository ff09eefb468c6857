"""The last step of the recalibration loop: put refit thresholds into service without a restart.

TorchServe can hot swap a model when its model API is on: register a new version of the archive
beside the running one, make it the default, unregister the old. ``model_store.serve.swap`` does
that; this test runs it under load and checks that no request fails and that answers move to the
new thresholds. (config.properties keeps the model API off, and swap then refuses clearly:
tests/integration/test_capture.py.)"""
import json
import shutil
import threading
import zipfile

import pytest

from client.http import run_load
from model_store.serve import swap
from tests.integration.server import build_archive, running_server

pytestmark = pytest.mark.integration


def _replace_in_zip(path, name: str, data: bytes) -> None:
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    assert name in [info.filename for info, _ in entries]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, content in entries:
            dst.writestr(info, data if info.filename == name else content)


@pytest.fixture(scope="module")
def refit_thresholds(tiny_thresholds, tmp_path_factory):
    doc = json.loads(tiny_thresholds.read_text())
    doc["operating_points"] = {"refit": doc["operating_points"]["balanced"], "exact": doc["operating_points"]["exact"]}
    doc["default"] = "refit"
    path = tmp_path_factory.mktemp("refit") / "thresholds.json"
    path.write_text(json.dumps(doc))
    return path


def test_swap_under_load_moves_answers_to_the_new_version_and_fails_nothing(tiny_checkpoint, tiny_thresholds,
                                                                          refit_thresholds, test_images, tmp_path):
    with running_server(tmp_path / "ts", tiny_checkpoint, thresholds=tiny_thresholds, name="tiny",
                        config_extra="enable_model_api=true\n") as server:
        staging = tmp_path / "v2"
        build_archive(tiny_checkpoint, staging, thresholds=refit_thresholds, name="tiny", version="2.0")
        shutil.copy(staging / "tiny.mar", tmp_path / "ts" / "model_store" / "tiny-v2.mar")
        # Version 2's handler code differs from 1's by one line: the swap must swap code too, since
        # each worker imports the handler package its own archive carries (issue #32).
        _replace_in_zip(tmp_path / "ts" / "model_store" / "tiny-v2.mar", "handler/__init__.py",
                        b'print("archive code: tiny 2.0", flush=True)\n')
        client = server.client()
        assert client.predict(test_images[0]).body["operating_point"] == "balanced"
        done, results = threading.Event(), []

        def load():
            while not done.is_set():
                results.extend(run_load(client, test_images[:20], concurrency=2, count=20))

        t = threading.Thread(target=load)
        t.start()
        try:
            new = swap("tiny", "tiny-v2.mar", root=server.root, management=server.management)
        finally:
            done.set()
            t.join()
        assert new == "2.0"
        assert results and {r.status for r in results} == {200}, [(r.status, r.body, r.seconds) for r in results if r.status != 200]
        points = [r.body["operating_point"] for r in results]
        after = client.predict(test_images[0]).body
        print(f"{len(results)} requests during the swap: {points.count('balanced')} by 1.0, "
              f"{points.count('refit')} by 2.0")
        assert after["operating_point"] == "refit"
        log = (server.root / "logs" / "model_log.log").read_text()
        assert "archive code: tiny 2.0" in log  # version 2's workers ran version 2's code
