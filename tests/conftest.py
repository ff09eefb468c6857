"""Shared fixtures: small real artefacts (tiny checkpoints, images), never downloads."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from handler.checkpoint import ModelCard, save_checkpoint  # noqa: E402
from handler.model import MRLResNet50  # noqa: E402
from imagedata.specs import FASHION_MNIST_DIR  # noqa: E402
from tests import deps  # noqa: E402
from training.train_mrl import demo_preprocessing  # noqa: E402

DISK_NEEDED_GIB = 8  # a fresh clone's whole suite on a fresh machine, measured (README)

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised 10-class MRL ResNet50 in our format, with a demo-style card."""
    torch.manual_seed(0)
    model = MRLResNet50(num_classes=10)
    # Give BN non-trivial statistics so that eval-mode outputs differ per image.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    card = ModelCard(name="tiny", classes=CLASSES, preprocessing=demo_preprocessing(32), numerics="fp32")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, model, card)
    return path


@pytest.fixture(scope="session")
def promtool_installed() -> str:
    return deps.need_binary("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus_installed() -> str:
    return deps.need_binary("prometheus", "prometheus")


@pytest.fixture(scope="session")
def fashion_mnist_installed() -> Path:
    return deps.need_file(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz", "dataset-fashion-mnist")


@pytest.fixture
def gray_png() -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L"))


def pytest_sessionstart(session):
    """Free disk where the suite writes, printed even under -q: a full disk fails tests far from its
    cause (an empty model log, SIGBUS in a mapped write)."""
    import shutil
    import tempfile
    free = {where: shutil.disk_usage(where).free / 2**30 for where in (str(ROOT), tempfile.gettempdir())}
    line = "disk free: " + ", ".join(f"{where} {gib:.1f} GiB" for where, gib in free.items())
    if min(free.values()) < DISK_NEEDED_GIB:
        line += f" (the suite wants {DISK_NEEDED_GIB} GiB free: expect failures)"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)
