"""A gallery rebuilt in place under load (issue #33 item 3, acceptance 4): 8 clients ask for
neighbours while retrieval/gallery.py rebuilds the served folder with another size, ids and labels.
No 5xx, no worker restart, and every answer comes whole from the old gallery or from the new one."""
import threading
import time

import numpy as np
import pytest

from handler.checkpoint import file_sha256
from handler.gallery import Gallery
from retrieval.gallery import build
from tests.integration.server import running_server

pytestmark = pytest.mark.integration
OLD_N, NEW_N, NEW_ID0 = 200, 120, 10_000
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def old_label(item_id: int) -> int:
    return item_id % 10


def new_label(item_id: int) -> int:  # the new gallery labels every item one class further
    return (item_id - NEW_ID0 + 1) % 10


def test_a_rebuild_under_load_serves_old_or_new_never_a_mix(tiny_checkpoint, tiny_gallery, test_images,
                                                            tmp_path):
    sha = file_sha256(tiny_checkpoint)
    emb = np.asarray(Gallery.open(tiny_gallery).vectors, dtype=np.float32)  # the 200 test images' embeddings
    folder = tmp_path / "gallery"
    build(folder, emb, np.arange(OLD_N) % 10, np.arange(OLD_N), {"checkpoint_sha256": sha, "spec": "old"},
          hnsw_m=None)
    with running_server(tmp_path / "ts", tiny_checkpoint, batch_size=8, batch_delay=20, gallery_dir=folder) as server:
        assert [c for c in server.client().predict(test_images[0]).body["top_k"]]  # up and answering
        pids = server.worker_pids()
        answers, stop = [], threading.Event()

        def ask(worker: int) -> None:
            client, j = server.client(), worker
            while not stop.is_set():
                sent = time.monotonic()
                r = client.predict(test_images[j % NEW_N], headers={"X-MRL-Neighbors": "5"})
                answers.append((j % NEW_N, r.status, r.body, sent))
                j += 8

        threads = [threading.Thread(target=ask, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        time.sleep(3)
        build(folder, emb[:NEW_N], (np.arange(NEW_N) + 1) % 10, np.arange(NEW_N) + NEW_ID0,
              {"checkpoint_sha256": sha, "spec": "new"}, hnsw_m=None)
        switched = time.monotonic()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert server.worker_pids() == pids  # no worker died or restarted

    assert answers and not [(s, b) for _, s, b, _ in answers if s != 200][:3]
    seen = {"old": 0, "new": 0}
    for j, _, body, sent in answers:
        ids = [n["id"] for n in body["neighbors"]]
        which = "new" if ids[0] >= NEW_ID0 else "old"
        seen[which] += 1
        label = new_label if which == "new" else old_label
        assert all((i >= NEW_ID0) == (which == "new") for i in ids), ids            # ids of one gallery
        assert [n["label"] for n in body["neighbors"]] == [CLASSES[label(i)] for i in ids], body  # its labels
        assert ids[0] == (NEW_ID0 + j if which == "new" else j), (j, ids)              # its vectors
        assert body["neighbors"][0]["score"] == pytest.approx(1.0, abs=2e-3)
        if sent > switched:  # its batch began after meta.json was replaced: the new gallery
            assert which == "new", (j, ids)
    assert seen["old"] > 20 and seen["new"] > 20, seen
