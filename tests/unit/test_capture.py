"""Traffic capture: what is written, rotation and its bound, failures that never fail a request,
reading it back, and refitting thresholds from it (fit_thresholds --unlabeled --data capture:DIR)."""
import errno
import fcntl
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from calibration import fit_thresholds, split_experiment
from calibration.outputs import collect
from handler import capture as capture_mod
from handler.capture import CaptureConfig, TrafficCapture, read_capture
from handler.checkpoint import file_sha256, load_mrl_resnet50
from handler.service import MRLService
from handler.thresholds import OperatingPoints, load_thresholds
from tests.conftest import encode

S = 9
HEADER = {"checkpoint_sha256": "abc", "numerics": "fp32", "nesting": [8, 16, 32, 64, 128, 256, 512, 1024, 2048]}


def batch(rng, n):
    return rng.random((n, S), dtype=np.float32), rng.integers(0, 1000, (n, S), dtype=np.int64)


def unwritable(tmp_path):
    """A folder no process can create, root included: its parent is a regular file."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    return blocker / "capture"


def test_records_round_trip_with_header_and_no_request_data(tmp_path):
    rng = np.random.default_rng(0)
    cap = TrafficCapture(CaptureConfig(tmp_path), model="m", header=HEADER)
    batches = [batch(rng, n) for n in (1, 8, 3)]
    for conf, pred in batches:
        cap.record(conf, pred)
    cap.close()
    assert cap.take_counts() == {"written": 12}
    got = read_capture(tmp_path, checkpoint_sha256="abc")
    conf = np.concatenate([c for c, _ in batches])
    pred = np.concatenate([p for _, p in batches])
    np.testing.assert_array_equal(got.conf, conf)  # float32 written exactly
    np.testing.assert_array_equal(got.pred, pred)
    assert got.header["model"] == "m" and got.header["nesting"] == HEADER["nesting"]
    [f] = tmp_path.glob("capture-m-*.jsonl")
    rows = [json.loads(line) for line in f.read_text().splitlines()[1:]]
    assert {tuple(sorted(r)) for r in rows} == {("conf", "pred", "t")}  # nothing else per request


def test_rotation_keeps_the_folder_within_its_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_mod, "FLUSH_S", 0.0)
    rng = np.random.default_rng(1)
    config = CaptureConfig(tmp_path, max_bytes=40_000, file_bytes=10_000)
    cap = TrafficCapture(config, model="m", header=HEADER)
    for _ in range(60):  # ~150 bytes a record: about 90 kB in all, 9 files' worth
        conf, pred = batch(rng, 10)
        cap.record(conf, pred)
    cap.close()
    files = sorted(tmp_path.glob("capture-m-*.jsonl"))
    assert len(files) >= 3
    assert sum(f.stat().st_size for f in files) <= config.max_bytes
    assert all(f.stat().st_size <= config.file_bytes for f in files)
    got = read_capture(tmp_path)
    assert 0 < len(got.conf) < 600  # the oldest files went, the newest records stayed
    np.testing.assert_array_equal(got.pred[-10:], pred)


def test_a_dead_workers_open_file_is_adopted_and_pruned(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_mod, "FLUSH_S", 0.0)
    dead = tmp_path / "capture-m-20260101T000000000000Z-999999999.jsonl.part"  # no such pid
    dead.write_text(json.dumps({"schema": capture_mod.SCHEMA, **HEADER}) + "\n" + "x" * 20_000 + "\n")
    cap = TrafficCapture(CaptureConfig(tmp_path, max_bytes=20_000, file_bytes=10_000), model="m", header=HEADER)
    cap.record(*batch(np.random.default_rng(6), 2))
    cap.close()
    assert not dead.exists() and not dead.with_name(dead.name.removesuffix(".part")).exists()


def test_an_orphaned_part_file_is_adopted_even_when_the_pid_in_its_name_lives(tmp_path, monkeypatch):
    """Issue #33 item 6: a PID is no proof of life (reused after a restart on a persistent volume,
    or another pod's on a shared one). Nobody holds this file's lock, so it is adopted and pruned."""
    monkeypatch.setattr(capture_mod, "FLUSH_S", 0.0)
    orphan = tmp_path / "capture-m-20260101T000000000000Z-1.jsonl.part"  # PID 1 always lives
    orphan.write_text(json.dumps({"schema": capture_mod.SCHEMA, **HEADER}) + "\n" + "x" * 20_000 + "\n")
    starting = tmp_path / f".capture-m-20260101T000000000001Z-{os.getpid()}.jsonl.part"  # died before its rename
    starting.write_text(json.dumps({"schema": capture_mod.SCHEMA, **HEADER}) + "\n")
    cap = TrafficCapture(CaptureConfig(tmp_path, max_bytes=20_000, file_bytes=10_000), model="m", header=HEADER)
    cap.record(*batch(np.random.default_rng(6), 2))
    cap.close()
    assert not orphan.exists() and not orphan.with_name(orphan.name.removesuffix(".part")).exists()
    assert not starting.exists()


def test_a_file_another_writer_holds_is_counted_and_never_touched(tmp_path, monkeypatch):
    """Another pod's open file on a shared volume: its PID means nothing here (no such process),
    but it holds the file's lock. It stays as it is, and its size counts against the bound."""
    monkeypatch.setattr(capture_mod, "FLUSH_S", 0.0)
    other = tmp_path / "capture-m-20260101T000000000000Z-999999999.jsonl.part"
    other.write_text(json.dumps({"schema": capture_mod.SCHEMA, **HEADER}) + "\n" + "x" * 15_000 + "\n")
    config = CaptureConfig(tmp_path, max_bytes=40_000, file_bytes=10_000)
    with open(other, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        cap = TrafficCapture(config, model="m", header=HEADER)
        rng = np.random.default_rng(7)
        for _ in range(60):  # about 90 kB of records
            cap.record(*batch(rng, 10))
        cap.close()
        assert other.exists()
        closed = sum(f.stat().st_size for f in tmp_path.glob("capture-m-*.jsonl"))
        assert closed + other.stat().st_size <= config.max_bytes


FULL_DISK = """
import json, resource, signal, sys, time
from pathlib import Path
import numpy as np
from handler import capture
from handler.capture import CaptureConfig, TrafficCapture

capture.RETRY_S, capture.FLUSH_S = 0.05, 0.0
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails (EFBIG), as on a full disk
folder, header = Path(sys.argv[1]), json.loads(sys.argv[2])
cap = TrafficCapture(CaptureConfig(folder, max_bytes=20_000, file_bytes=10_000), model="m", header=header)
rng = np.random.default_rng(0)
parts = []

def phase(limit, batches):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    for _ in range(batches):
        cap.record(rng.random((4, 9), dtype=np.float32), rng.integers(0, 10, (4, 9)))
        time.sleep(0.03)
        parts.append(len(list(folder.glob("*.part"))))

phase(3_000, 25)   # every file fills up at 3 kB: writes fail mid-file, and close() fails again
phase(0, 10)       # nothing can be written, not even a new file's header
phase(resource.RLIM_INFINITY, 10)  # space again
cap.close()
print(json.dumps({"most_parts": max(parts), "counts": cap.take_counts()}))
"""


def test_a_full_disk_leaves_no_part_file_behind_and_the_bound_holds(tmp_path):
    """Issue #33 item 6: after a failed write, close() fails too; the file must still get its
    final name (and so be counted and pruned), and a retry that cannot even write a header
    must not leave an empty file each time."""
    folder = tmp_path / "capture"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(folder), json.dumps(HEADER)], check=True,
                         capture_output=True, text=True, timeout=60)
    report = json.loads(out.stdout)
    assert report["most_parts"] <= 1  # only the file being written
    assert not list(folder.glob("*.part"))
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 20_000
    assert report["counts"]["failed"] > 0 and report["counts"]["written"] > 0
    assert len(read_capture(folder).conf) >= 40  # the last phase's records, all of them


def test_unwritable_folder_counts_failures_and_never_raises(tmp_path):
    cap = TrafficCapture(CaptureConfig(unwritable(tmp_path)), model="m", header=HEADER)
    cap.record(*batch(np.random.default_rng(2), 5))
    cap.close()
    assert cap.take_counts() == {"failed": 5}


def test_full_disk_fails_records_then_recovers(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_mod, "RETRY_S", 0.0)
    cap = TrafficCapture(CaptureConfig(tmp_path), model="m", header=HEADER)
    real_rotate, full = cap._rotate, [True]

    def rotate():
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_rotate()

    monkeypatch.setattr(cap, "_rotate", rotate)
    rng = np.random.default_rng(3)
    cap.record(*batch(rng, 4))
    while not cap._counts["failed"]:
        threading.Event().wait(0.05)
    full[0] = False
    cap.record(*batch(rng, 6))
    cap.close()
    assert cap.take_counts() == {"failed": 4, "written": 6}
    assert len(read_capture(tmp_path).conf) == 6


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path, monkeypatch):
    monkeypatch.setattr(capture_mod, "QUEUE_BATCHES", 2)
    monkeypatch.setattr(capture_mod, "FLUSH_S", 0.0)  # the writer writes each batch as it takes it
    cap = TrafficCapture(CaptureConfig(tmp_path), model="m", header=HEADER)
    entered, gate = threading.Event(), threading.Event()
    real_write = cap._write
    monkeypatch.setattr(cap, "_write", lambda b: (entered.set(), gate.wait(), real_write(b)))
    rng = np.random.default_rng(4)
    cap.record(*batch(rng, 1))
    assert entered.wait(5)  # the writer holds the first batch and is stuck on the disk
    for _ in range(9):      # the queue takes two more; the other seven are dropped, at once
        cap.record(*batch(rng, 1))
    assert cap.take_counts() == {"dropped": 7}
    gate.set()
    cap.close()
    assert cap.take_counts() == {"written": 3}


def test_reader_skips_torn_lines_and_other_checkpoints_and_names_what_it_holds(tmp_path):
    rng = np.random.default_rng(5)
    for sha in ("abc", "def"):
        cap = TrafficCapture(CaptureConfig(tmp_path), model=f"m{sha}", header={**HEADER, "checkpoint_sha256": sha})
        cap.record(*batch(rng, 3))
        cap.close()
    [f] = tmp_path.glob("capture-mabc-*.jsonl")
    with f.open("a") as fh:
        fh.write('{"t": 1.0, "conf": [0.5')  # a worker killed mid-write
    got = read_capture(tmp_path, checkpoint_sha256="abc")
    assert (len(got.conf), got.skipped_lines, got.files) == (3, 1, 1)
    with pytest.raises(ValueError, match="mixes captures"):
        read_capture(tmp_path)
    with pytest.raises(ValueError, match="holds captures of.*abc.*def"):
        read_capture(tmp_path, checkpoint_sha256="0123")
    with pytest.raises(ValueError, match="no records in the time"):
        read_capture(tmp_path, checkpoint_sha256="abc", since=got.t.max() + 10)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [encode(Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), "L")) for _ in range(n)]


@pytest.fixture
def captured(tiny_checkpoint, tmp_path):
    """A service with capture on, after answering 60 images; its responses at dim=2048 beside."""
    model, card = load_mrl_resnet50(tiny_checkpoint)
    points = OperatingPoints({"balanced": (0.3,) * 8}, "balanced", {})
    folder = tmp_path / "capture"
    svc = MRLService(model, card, points, name="tiny", capture=CaptureConfig(folder),
                     checkpoint_sha256=file_sha256(tiny_checkpoint))
    imgs = images(60)
    answers = [body for i in range(0, 60, 6) for _, body in svc.handle([{"body": b} for b in imgs[i:i + 6]])]
    svc.capture.close()
    full = [body for i in range(0, 60, 6)
            for _, body in MRLService(model, card, points).handle([{"body": b, "dim": b"2048"} for b in imgs[i:i + 6]])]
    return folder, answers, full


def test_the_service_captures_what_its_heads_said(tiny_checkpoint, captured):
    folder, answers, full = captured
    got = read_capture(folder, checkpoint_sha256=file_sha256(tiny_checkpoint))
    assert len(got.conf) == 60 and got.header["numerics"] == "fp32"
    np.testing.assert_array_equal(got.pred[:, -1], [b["class_index"] for b in full])
    at = [got.header["nesting"].index(b["embedding_dim"]) for b in answers]
    np.testing.assert_array_equal(got.pred[np.arange(60), at], [b["class_index"] for b in answers])
    np.testing.assert_array_equal(got.conf[np.arange(60), at], np.float32([b["confidence"] for b in answers]))


def test_refit_from_capture_gives_thresholds_the_server_accepts(tiny_checkpoint, captured, tmp_path):
    folder, _, _ = captured
    out = tmp_path / "refit.json"
    with pytest.raises(SystemExit):  # no labels: --unlabeled is required
        fit_thresholds.main(["--checkpoint", str(tiny_checkpoint), "--data", f"capture:{folder}", "--out", str(out)])
    doc = fit_thresholds.main(["--checkpoint", str(tiny_checkpoint), "--data", f"capture:{folder}",
                               "--unlabeled", "--out", str(out), "--epsilon", "0.2", "--delta", "0.2"])
    assert doc["meta"]["data"]["n"] == 60 and "2048-d head" in doc["meta"]["data"]["labels"]
    assert doc["operating_points"]["guaranteed"]["params"]["unlabeled"] is True
    assert doc["operating_points"]["guaranteed"]["alert_disagreement"] == 0.2
    load_thresholds(out, nesting=doc["meta"]["nesting"], checkpoint_sha256=file_sha256(tiny_checkpoint),
                    numerics="fp32")
    # Its "labels" are the 2048-d answers: the exact point agrees with itself everywhere.
    cap = collect(tiny_checkpoint, f"capture:{folder}")
    assert cap.top1()["2048"] == 1.0 and not cap.labeled


def test_split_experiment_runs_on_captured_traffic_alone(tiny_checkpoint, captured):
    folder, _, _ = captured
    result = split_experiment.main(["--checkpoint", str(tiny_checkpoint), "--data", f"capture:{folder}",
                                    "--unlabeled", "--trials", "5", "--epsilon", "0.2", "--delta", "0.2"])
    assert (result["cal_size"], result["eval_size"], result["trials"]) == (30, 30, 5)
    assert 0.0 <= result["violation_rate"] <= 1.0 and result["unlabeled"]
    with pytest.raises(SystemExit):  # captured traffic has no labels
        split_experiment.main(["--checkpoint", str(tiny_checkpoint), "--data", f"capture:{folder}"])
