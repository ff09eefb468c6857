"""The bundled models as a user gets them: archives built as `make serve` builds them, served
somewhere that is not this checkout, asked with the README's curl."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from model_store.build_archive import archive
from model_store.serve import EXAMPLES, ROOT

MODELS = {  # name -> (checkpoint, thresholds), as the Makefile's archive and archive-han1000 targets
    "mrl_resnet50": (ROOT / "model_store/fashion_mnist/mrl_resnet50_fp16.pt",
                     ROOT / "model_store/fashion_mnist/thresholds.json"),
    "han1000": (ROOT / "model_store/han1000/mrl_resnet50_fp16.pt", ROOT / "model_store/han1000/thresholds.json"),
}
# What the printed curls answer (model_store/serve.py's EXAMPLES): the class of each example image.
EXPECTED_LABEL = {"mrl_resnet50": "Ankle boot"}


def build_bundled(store: Path) -> dict[str, Path]:
    """Both bundled archives in ``store``, with the Makefile's defaults (graph jit, the card's
    numerics, the archive's default workers)."""
    store.mkdir(parents=True, exist_ok=True)
    return {name: archive(ckpt, store, thresholds=thr, name=name, graph="jit", numerics="card")
            for name, (ckpt, thr) in MODELS.items()}


def server_files(dest: Path) -> dict[str, Path]:
    """Copies of what the frontend reads besides the archives (metrics declarations, log
    configuration, the OIP agent), so that a server started from ``dest`` reads nothing here."""
    from model_store import oip_agent

    dest.mkdir(parents=True, exist_ok=True)
    files = {"metrics_config": ROOT / "monitoring/ts_metrics.yaml", "log_config": ROOT / "monitoring/log4j2.xml",
             "agent": oip_agent.build()}
    return {k: Path(shutil.copy(src, dest / src.name)) for k, src in files.items()}


def curl(url: str, key: str | None, model: str, image: Path | None = None) -> tuple[int, dict]:
    """The README's curl (``-T image``) for ``model``: (HTTP status, JSON body)."""
    image = image or ROOT / "examples" / EXAMPLES[model]
    auth = ["-H", f"Authorization: Bearer {key}"] if key else []
    out = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *auth, "-T", str(image),
                          f"{url}/predictions/{model}"], capture_output=True, text=True, timeout=60, check=True)
    body, _, status = out.stdout.rpartition("\n")
    return int(status), json.loads(body)


def check_answer(model: str, status: int, body: dict) -> None:
    """What a user of the README's curl gets: 200, a label of the model's classes, the size that
    answered and the sizes tried (han1000's example escalates past the first size)."""
    assert status == 200, body
    assert body["embedding_dim"] == body["sizes_tried"][-1]
    if model in EXPECTED_LABEL:
        assert body["label"] == EXPECTED_LABEL[model]
    if model == "han1000":
        assert len(body["sizes_tried"]) > 1, body  # the escalating example escalates
