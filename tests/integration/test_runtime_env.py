"""The archives serve outside this checkout (issue #32, acceptance 1).

The bundled archives, built here as `make serve` builds them, are served by a TorchServe from a
fresh virtual environment that holds setup/runtime.txt's packages and nothing of this project (no
install, no checkout on the path), started in a folder outside the checkout. The README's curl
must answer for both models, and each worker must run the code its archive carries.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_store.serve import ROOT, read_keys, start, stop, wait_ready, write_config
from tests.integration.bundled import build_bundled, check_answer, curl, server_files
from tests.integration.server import PORTS

pytestmark = pytest.mark.integration
RUNTIME = ROOT / "setup" / "runtime.txt"


def runtime_venv() -> Path:
    """A virtual environment of setup/runtime.txt alone, kept under .cache/ between runs (keyed by
    the list's hash: an edit to the list makes a new one)."""
    key = hashlib.sha256(RUNTIME.read_bytes()).hexdigest()[:12]
    venv = ROOT / ".cache" / f"runtime-venv-{key}"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "-r", str(RUNTIME)], check=True)
        (venv / ".complete").touch()
    return venv


@pytest.fixture(scope="module")
def venv() -> Path:
    return runtime_venv()


def test_the_runtime_environment_has_nothing_of_the_checkout(venv, tmp_path):
    probe = ("import importlib.util, sys; "
             "print([m for m in ('handler', 'model_store', 'retrieval', 'training') if importlib.util.find_spec(m)])")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]}, check=True)
    assert out.stdout.strip() == "[]"
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.lower()
    assert "mrl-serve" not in listed and "mrl_serve" not in listed
    for line in RUNTIME.read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.lower().replace("_", "-") in listed.replace("_", "-"), line


def test_both_bundled_archives_answer_the_readme_curl_from_the_runtime_alone(venv, tmp_path):
    home = tmp_path / "server"  # outside the checkout: logs, key_file.json, the copied config
    store = tmp_path / "store"
    build_bundled(store)
    files = server_files(home / "conf")
    config = write_config(home / "config.properties", store, PORTS, agent=files["agent"],
                          overrides={"metrics_config": str(files["metrics_config"])})
    vmargs = next(line for line in config.read_text().splitlines() if line.startswith("vmargs="))
    assert f"-javaagent:{files['agent'].resolve()}" in vmargs.split(), vmargs  # the copy, not the checkout's
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
           **{k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "GOMP_"))}}
    stop(home, env=env)
    try:
        start("han1000", 600, root=home, config=config, model_store=store, env=env,
              management=f"http://127.0.0.1:{PORTS['management']}", log_config=files["log_config"],
              torchserve=str(venv / "bin" / "torchserve"))
        wait_ready("mrl_resnet50", 300, home, f"http://127.0.0.1:{PORTS['management']}")
        key = read_keys(home)["inference"]
        for model in ("mrl_resnet50", "han1000"):
            check_answer(model, *curl(f"http://127.0.0.1:{PORTS['inference']}", key, model))
        log = (home / "logs" / "model_log.log").read_text()
        code = [line.rsplit("code=", 1)[1] for line in log.splitlines() if "mrl handler ready" in line]
        # Every worker imported handler/ from its unpacked archive (TorchServe's temp folder).
        assert len(code) >= 2 and all(c.endswith("/handler") and str(ROOT) not in c for c in code), code
    finally:
        stop(home, env=env)
