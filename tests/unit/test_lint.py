"""The house checks itself (docs/architecture.md): `make lint` passes on the tree, and an upward
import or a style fault planted in a scratch copy of it makes the same tools fail."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PACKAGES = ("handler", "imagedata", "calibration", "training", "retrieval", "model_store", "monitoring", "client",
            "bench")


def test_make_lint_passes_on_the_tree():
    done = subprocess.run(["make", "-s", "lint", f"VENV={VENV_BIN.parent}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Contracts: 4 kept, 0 broken." in done.stdout, done.stdout[-2000:]


@pytest.fixture
def scratch(tmp_path) -> Path:
    """The project's packages and pyproject.toml, copied: what the linters read."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The scratch copy first on the path, so the contracts read it and not the installed checkout.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(VENV_BIN / "lint-imports"), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def plant(path: Path, line: str) -> None:
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "\n" + rest)


def test_the_scratch_copy_passes_as_the_tree_does(scratch):
    done = lint_imports(scratch)
    assert done.returncode == 0 and "4 kept, 0 broken" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize(("where", "line", "contract"), [
    # the worker reaching up into the offline side: both the layers and handler's own contract break
    ("handler/cascade.py", "import training.train_mrl  # noqa", "handler/ (what an archive carries) imports nothing"),
    # a data spec reaching up into calibration
    ("imagedata/specs.py", "import calibration.methods  # noqa", "Every arrow points down"),
    # a cycle inside the worker
    ("handler/cpus.py", "import handler.engine  # noqa", "No import cycle between handler/'s modules"),
    # TorchServe imported outside the adapter
    ("handler/service.py", "import ts.context  # noqa", "ts_handler.py is the only module that imports TorchServe"),
])
def test_a_planted_violation_breaks_its_contract(scratch, where, line, contract):
    plant(scratch / where, line)
    done = lint_imports(scratch)
    assert done.returncode != 0, done.stdout[-2000:]
    broken = done.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, done.stdout[-3000:]


def test_ruff_fails_on_a_planted_fault(scratch):
    plant(scratch / "handler" / "cascade.py", "import os")  # unused
    done = subprocess.run([str(VENV_BIN / "ruff"), "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=scratch, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "handler/cascade.py" in done.stdout and "F401" in done.stdout, done.stdout


def test_loading_the_worker_imports_nothing_of_the_offline_side():
    """``python -X importtime`` of the TorchServe entry point: only handler/ of this project loads."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import handler.ts_handler"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    ours = {m.split(".")[0] for m in modules} & set(PACKAGES)
    assert "handler.service" in {m.strip() for m in modules} and ours == {"handler"}, sorted(ours)
