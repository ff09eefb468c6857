"""How a worker runs comes from one channel, the archive's ``handler:`` block (handler/settings.py),
with each environment override listed in ENVIRONMENT and in docs/architecture.md's table."""
import zipfile
from pathlib import Path

import pytest
import yaml

from handler import cpus
from handler.settings import ENVIRONMENT, WorkerSettings
from model_store.build_archive import archive

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: None)  # no quota: the affinity decides


def test_workers_of_one_model_share_the_cores_unless_told(four_cores, monkeypatch):
    def threads(workers, env=None, openvino=False, **block):
        settings = WorkerSettings.from_config({"minWorkers": workers, "maxWorkers": workers, "handler": block},
                                              environ=env or {})
        return settings.openvino_threads if openvino else settings.threads
    assert threads(2) == 2 and threads(8) == 1 and threads(1) == 4  # all cores for one worker
    assert threads(2, threads=3) == 3  # the block's own count
    assert threads(2, {"MRL_THREADS": "1"}, threads=3) == 1  # the environment overrides it
    # OpenVINO's unpinned threads: every core for each worker, unless told
    assert threads(2, openvino=True) == 4 and threads(8, openvino=True) == 4
    assert threads(2, openvino=True, threads=3) == 3 and threads(2, {"MRL_THREADS": "1"}, openvino=True) == 1
    # a batch's images are decoded on every core the worker may use, whatever the threads
    assert WorkerSettings.from_config({"maxWorkers": 2, "handler": {"threads": 1}}).decode_threads == 4
    monkeypatch.setattr(cpus, "cpu_quota", lambda *a: 1.0)  # --cpus 1 on the 4-core node
    assert threads(2) == 1 and threads(1) == 1 and threads(2, openvino=True) == 1
    assert WorkerSettings.from_config({"maxWorkers": 2}).decode_threads == 1


def test_the_block_an_archive_writes_parses_to_what_build_archive_was_asked(tiny_checkpoint, tmp_path, four_cores):
    mar = archive(tiny_checkpoint, tmp_path, name="tiny", graph="jit", workers=2)
    config = yaml.safe_load(zipfile.ZipFile(mar).read("model-config.yaml"))
    settings = WorkerSettings.from_config(config, environ={})
    assert (settings.graph, settings.numerics, settings.threads, settings.channels_last) == ("jit", "card", 2, True)
    assert settings.capture is None and settings.gallery_dir is None


@pytest.mark.parametrize(("block", "message"), [
    ({"grpah": "jit"}, r"unknown handler setting\(s\) \['grpah'\]"),
    ({"jpeg_draft": "no"}, "jpeg_draft must be true or false, got 'no'"),
    ({"threads": -1}, "threads must be at least 0, got -1"),
    ({"threads": "many"}, "threads must be an integer, got 'many'"),
    ({"exact_max_items": -5}, "exact_max_items must be at least 0"),
    ({"capture_dir": "/tmp/c", "capture_max_mb": 1, "capture_file_mb": 2}, "capture_file_mb <= capture_max_mb"),
])
def test_a_bad_block_fails_the_start_naming_the_setting(block, message):
    with pytest.raises(ValueError, match=message):
        WorkerSettings.from_config({"handler": block}, environ={})


def test_every_environment_override_is_in_the_one_table():
    table = (ROOT / "docs" / "architecture.md").read_text()
    for name in ENVIRONMENT:
        assert f"| `{name}` |" in table, name


def test_every_environment_variable_the_code_reads_is_in_the_table():
    import re
    table = (ROOT / "docs" / "architecture.md").read_text()
    read = set()
    for package in ("handler", "imagedata", "calibration", "training", "retrieval", "model_store", "monitoring",
                    "client", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            read |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["']([A-Z_][A-Z0-9_]*)["']""", path.read_text()))
    assert read >= {"MRL_THREADS", "MRL_CACHE"}, read  # the scan finds what it is meant to
    assert sorted(n for n in read if f"| `{n}` |" not in table) == []
