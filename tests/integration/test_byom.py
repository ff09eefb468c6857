"""Bring your own model, end to end: the fenced block of docs/models.md ("Bring your own model, end
to end") run verbatim with bash, on a small official-layout checkpoint and image folder made here.

Only the block's two placeholder paths are replaced (PLACEHOLDERS). The block runs `make serve`,
which serves on the fixed ports 8080-8082 and writes model_store/, logs/ and key_file.json under
the repository root, so it runs in a copy of the working tree (its tracked and untracked files,
without docs/, tests/ and the checkpoints: han1000 is not built there) with this .venv linked, in
a network namespace of its own (`unshare --net`, its own loopback) so that those ports cannot
collide with a server already running on this machine, and with its own TMPDIR, where TorchServe
keeps its pid file, so that `make stop` stops this server only. The page asks for the project's
environment to be active; here its bin/ is first on PATH, as `source .venv/bin/activate` puts it."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handler.checkpoint import file_sha256, imagenet_classes
from tests import deps
from tests.unit.test_checkpoint import official_state

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "models.md"
SECTION = "## Bring your own model, end to end"
PLACEHOLDERS = {"checkpoint": "/path/to/mrl_r50.pt", "holdout": "/path/to/holdout"}
N_CLASSES, PER_CLASS = 5, 4  # 20 holdout images: the fit is about the path, not the thresholds


def documented_block() -> str:
    """The first ```bash block of the section, as the page has it."""
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    m = re.search(r"^```bash\n(.*?)^```$", section, re.M | re.S)
    assert m, f"{DOC.name}: no bash block under {SECTION!r}"
    return m.group(1)


def working_copy(dest: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) without docs/, tests/ and
    checkpoints, and a .venv that is this one's (linked) with its install marker up to date."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for rel in files:
        src = ROOT / rel
        if rel.split("/")[0] in ("docs", "tests") or rel.endswith(".pt") or not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    venv = dest / ".venv"
    venv.mkdir()
    for entry in (ROOT / ".venv").iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()  # newer than pyproject.toml: make does not reinstall into this copy
    return dest


def holdout_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(N_CLASSES * PER_CLASS):
        folder = root / str(i % N_CLASSES)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")
    return root


def test_the_documented_bring_your_own_model_block_serves_an_official_checkpoint(tmp_path):
    unshare = deps.need_binary("unshare", "util-linux")
    deps.need_binary("ip", "iproute2")
    block = documented_block()
    for placeholder in PLACEHOLDERS.values():
        assert block.count(placeholder) == 1, f"{DOC.name}'s block should name {placeholder} once"

    checkpoint = tmp_path / "official" / "mrl_r50.pt"
    checkpoint.parent.mkdir()
    torch.save(official_state("mrl"), checkpoint)  # module. prefix, BlurPool keys, nine heads
    holdout = holdout_folder(tmp_path / "holdout")
    block = block.replace(PLACEHOLDERS["checkpoint"], str(checkpoint)).replace(PLACEHOLDERS["holdout"], str(holdout))
    repo = working_copy(tmp_path / "repo")
    (repo / "block.sh").write_text("set -euo pipefail\n" + block)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = {"PATH": f"{repo / '.venv' / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": str(tmp_path), "TMPDIR": str(tmpdir), "LANG": "C.UTF-8"}
    # The block ends with make stop; the trap stops the server too when a command of it fails.
    script = ("ip link set lo up && trap '.venv/bin/python -m model_store.serve stop >/dev/null 2>&1' EXIT && "
              "bash block.sh")
    run = subprocess.run([unshare, "--net", "bash", "-c", script], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=900)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]

    thresholds = json.loads((repo / "thresholds.json").read_text())
    sets = thresholds.get("sets", {"": thresholds})
    assert {s["meta"]["checkpoint_sha256"] for s in sets.values()} == {file_sha256(checkpoint)}
    # curl prints no newline after the body: make stop's echo of its command follows on that line.
    answers = [json.JSONDecoder().raw_decode(line)[0] for line in run.stdout.splitlines() if line.startswith('{"label"')]
    assert len(answers) == 1, output[-6000:]
    (answer,) = answers
    assert answer["label"] in imagenet_classes()
    assert answer["operating_point"] in {s["default"] for s in sets.values()}  # the fitted thresholds serve
    assert answer["sizes_tried"][-1] == answer["embedding_dim"] and len(answer["top_k"]) == 5
    assert "TorchServe is up: mrl_resnet50 READY" in run.stdout
