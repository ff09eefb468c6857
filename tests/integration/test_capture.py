"""Traffic capture in a real TorchServe: one server, two archives of the tiny model, one capturing
into a folder and one pointed at a folder that cannot exist. Every request is answered either way;
the records match the answers; the lost ones are counted, not hidden."""
import time

import numpy as np
import pytest

from client.http import run_load
from handler.capture import FLUSH_S, read_capture
from handler.cascade import exit_indices, threshold_rows
from handler.checkpoint import file_sha256
from handler.thresholds import load_thresholds
from model_store.serve import start, stop, swap, wait_ready, write_config
from tests.integration.server import PORTS, Server, build_archive
from tests.integration.test_metrics import delta

pytestmark = pytest.mark.integration
NAMES = ("tiny_capture", "tiny_unwritable")


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tiny_thresholds, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("capture-ts")
    store, folder = tmp / "model_store", tmp / "capture"
    store.mkdir()
    blocker = tmp / "a-file"
    blocker.write_text("")  # a folder beneath a regular file cannot be created, not even by root
    for name, where in zip(NAMES, (folder, blocker / "capture")):
        build_archive(tiny_checkpoint, store, thresholds=tiny_thresholds, name=name, capture_dir=where,
                      batch_size=8, batch_delay=20)
    config = write_config(tmp / "config.properties", store, PORTS,
                          extra="\nload_models=" + ",".join(f"{n}.mar" for n in NAMES) + "\n")
    stop(tmp)
    management = f"http://127.0.0.1:{PORTS['management']}"
    try:
        start(NAMES[0], 240, root=tmp, config=config, model_store=store, management=management)
        wait_ready(NAMES[1], 240, tmp, management)
        yield {n: Server(tmp, n, *(f"http://127.0.0.1:{PORTS[k]}" for k in ("inference", "management", "metrics")))
               for n in NAMES}, folder
    finally:
        stop(tmp)


def test_captured_records_are_the_answers(servers, tiny_checkpoint, tiny_thresholds, test_images):
    by_name, folder = servers
    results = run_load(by_name[NAMES[0]].client(), test_images[:120], concurrency=4, count=120)
    assert [r.status for r in results] == [200] * 120
    time.sleep(3 * FLUSH_S)
    got = read_capture(folder, checkpoint_sha256=file_sha256(tiny_checkpoint))
    assert len(got.conf) == 120 and got.header["model"] == NAMES[0]
    # Each answer is one record: its answering size's argmax and confidence, by the server's rule
    # (records come in batch order, so compare them as multisets).
    points = load_thresholds(tiny_thresholds, nesting=got.header["nesting"], checkpoint_sha256=None, numerics=None)
    at = exit_indices(got.conf, threshold_rows(points.points["balanced"], 1)[0])
    rows = np.arange(len(at))
    recorded = sorted((int(p), float(c)) for p, c in zip(got.pred[rows, at], got.conf[rows, at]))
    answers = sorted((r.body["class_index"], r.body["confidence"]) for r in results)
    assert [p for p, _ in recorded] == [p for p, _ in answers]
    np.testing.assert_array_equal(np.float32([c for _, c in recorded]), np.float32([c for _, c in answers]))


def test_an_unwritable_capture_folder_answers_every_request_and_counts_the_loss(servers, test_images):
    by_name, _ = servers
    server = by_name[NAMES[1]]
    before = server.scrape()
    results = run_load(server.client(), test_images[:40], concurrency=4, count=40)
    assert [r.status for r in results] == [200] * 40
    time.sleep(3 * FLUSH_S)
    server.client().predict(test_images[0])  # counts surface with the next batch
    time.sleep(1.5)
    lost = delta(server.scrape(), before, "mrl_capture_records_total", by="outcome")
    assert lost.get("written", 0) == 0 and 40 <= lost.get("failed", 0) <= 41, lost
    log = (server.root / "logs" / "model_log.log").read_text()
    assert "traffic capture lost" in log and "requests are still answered" in log


def test_hot_swap_refuses_clearly_when_the_model_api_is_off(servers):
    by_name, _ = servers
    server = by_name[NAMES[0]]
    with pytest.raises(SystemExit, match="the model API is off"):
        swap(NAMES[0], f"{NAMES[1]}.mar", root=server.root, management=server.management)
