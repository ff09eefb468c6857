"""A few large-but-small-file images must not pin a worker's memory (issue #33 item 1, acceptance 2).

A real TorchServe worker under SERVER_ENV's malloc settings (freed memory stays in the process),
serving a model with the ImageNet preprocessing (RGB, resize 256, crop 224): a 40 MP 16-bit PNG,
a 40 MP RGBA PNG and a 40 MP JPEG with an EXIF rotation, each sent 5 times (each file is under
1 MB). The worker's RSS afterwards stays within 150 MiB of its RSS before them, and its peak
(VmHWM, reset before the images) stays under 600 MiB above it."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from handler.checkpoint import IMAGENET_PREPROCESSING, ModelCard, save_checkpoint
from handler.model import MRLResNet50
from model_store.serve import SERVER_ENV
from tests.conftest import CLASSES
from tests.integration.server import running_server

pytestmark = pytest.mark.integration
W, H = 8000, 5000  # 40 MP, the server's MAX_PIXELS
MiB = 2**20


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def large_images() -> dict[str, bytes]:
    ramp = (np.add.outer(np.arange(H) * 7, np.arange(W) * 3) % 65536).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    return {"png_16bit": encode(Image.fromarray(ramp), "PNG"),
            "png_rgba": encode(Image.new("RGBA", (W, H), (10, 200, 30, 128)), "PNG"),
            "jpeg_exif_rotated": encode(Image.new("RGB", (W, H), (120, 30, 200)), "JPEG", quality=90,
                                        exif=exif.tobytes())}


def status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def test_large_images_leave_the_workers_memory_as_they_found_it(tmp_path):
    torch.manual_seed(0)
    card = ModelCard(name="rgb224", classes=CLASSES, preprocessing=IMAGENET_PREPROCESSING, numerics="fp32")
    ckpt = tmp_path / "rgb224.pt"
    save_checkpoint(ckpt, MRLResNet50(num_classes=10), card)
    images = large_images()
    assert max(len(b) for b in images.values()) < 1 * MiB
    small = encode(Image.new("RGB", (640, 480), (90, 60, 30)), "JPEG")
    with running_server(tmp_path / "ts", ckpt, batch_size=1, batch_delay=1) as server:
        client = server.client()
        [pid] = server.worker_pids()
        environ = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            assert environ.get(key) == SERVER_ENV[key], key  # the worker runs under SERVER_ENV
        for _ in range(5):  # warm: the forward pass's own memory is in place
            assert client.predict(small).status == 200
        before = status(pid)["VmRSS"]
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        report = {}
        for name, body in images.items():
            for _ in range(5):
                r = client.predict(body)
                assert r.status == 200, (name, r.body)
            now = status(pid)
            report[name] = ((now["VmHWM"] - before) / MiB, (now["VmRSS"] - before) / MiB)
        assert client.predict(small).status == 200
        after = status(pid)
        assert server.worker_pids() == [pid]
    print(f"\nworker RSS before {before / MiB:.0f} MiB; per image (peak above, held above): "
          f"{ {k: (round(p), round(h)) for k, (p, h) in report.items()} }")
    assert (after["VmHWM"] - before) / MiB < 600, report
    assert abs(after["VmRSS"] - before) / MiB <= 150, (after["VmRSS"] - before) / MiB
