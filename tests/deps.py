"""System dependencies of the suite: a missing one fails the test, naming the set-up step.

Nothing the product needs is skipped quietly: a green run has touched the real data, the real
TorchServe and the real Prometheus. The set-up step installs every Debian package the suite needs.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SETUP = ("run the set-up step: `make setup` (setup/system.sh installs every package of "
         "setup/debian-packages.txt; make test runs it first)")


def need_binary(name: str, package: str, path: str | None = None) -> str:
    """The path of ``name`` on PATH (or ``path``), or a test failure naming package and set-up step."""
    found = shutil.which(name, path=path)
    if found is None:
        pytest.fail(f"`{name}` is not on PATH (Debian package {package}): {SETUP}", pytrace=False)
    return found


def need_file(path: Path, package: str) -> Path:
    if not Path(path).exists():
        pytest.fail(f"{path} does not exist (Debian package {package}): {SETUP}", pytrace=False)
    return Path(path)
