import io
import json

import numpy as np
import pytest

from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.service import MRLService
from handler.thresholds import SCHEMA, OperatingPoints
from imagedata.specs import FASHION_MNIST_DIR, fashion_mnist
from retrieval.gallery import build
from tests import deps
from tests.integration.server import running_server

pytestmark = pytest.mark.integration


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def test_images() -> list[bytes]:
    deps.need_file(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", "dataset-fashion-mnist")
    data = fashion_mnist("test")
    return [png(data[i][0]) for i in range(200)]


@pytest.fixture(scope="session")
def tiny_thresholds(tiny_checkpoint, tmp_path_factory):
    """Thresholds for the tiny random model, at levels that spread exits over several sizes."""
    keys = ["8", "16", "32", "64", "128", "256", "512", "1024"]
    doc = {"schema": SCHEMA, "default": "balanced",
           "operating_points": {"balanced": {"thresholds": dict(zip(keys, [0.2, 0.18, 0.16, 0.15, 0.14, 0.13, 0.12, 0.11])),
                                             "alert_disagreement": 0.05},
                                "exact": {"thresholds": dict.fromkeys(keys)}},
           "meta": {"nesting": [8, 16, 32, 64, 128, 256, 512, 1024, 2048],
                    "checkpoint_sha256": file_sha256(tiny_checkpoint), "numerics": "fp32"}}
    path = tmp_path_factory.mktemp("thr") / "thresholds.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="session")
def tiny_gallery(tiny_checkpoint, test_images, tmp_path_factory):
    """A gallery of the tiny model's embeddings of the 200 test images (ids 0-199)."""
    model, card = load_mrl_resnet50(tiny_checkpoint)
    svc = MRLService(model, card, OperatingPoints.fixed(card.nesting))
    emb = np.array([b["embedding"] for _, b in svc.handle([{"body": img, "return_embedding": b"1"}
                                                            for img in test_images])], dtype=np.float32)
    folder = tmp_path_factory.mktemp("gallery")
    build(folder, emb, np.arange(len(emb)) % 10, np.arange(len(emb)),
          {"checkpoint_sha256": file_sha256(tiny_checkpoint), "spec": "fashion-mnist:test (200)"}, hnsw_m=None)
    return folder


@pytest.fixture(scope="module")
def tiny_server(tiny_checkpoint, tiny_thresholds, tiny_gallery, tmp_path_factory):
    """The tiny model with thresholds, a gallery (neighbors requests) and traffic capture on."""
    tmp = tmp_path_factory.mktemp("ts")
    with running_server(tmp, tiny_checkpoint, thresholds=tiny_thresholds, batch_size=8, batch_delay=50,
                        gallery_dir=tiny_gallery, capture_dir=tmp / "capture") as server:
        yield server
