"""Traffic capture: what each answered request's heads said, for label-free recalibration.

Off by default. The ``handler`` block of an archive's model-config.yaml turns it on
(``model_store/build_archive.py --capture-dir DIR``)::

    capture_dir: /var/lib/mrl-serve/capture   # created if missing
    capture_max_mb: 256                       # bound on this model's files in the folder
    capture_file_mb: 16                       # a file rotates when it passes this size

A record is one request's per-size max softmax (float32, written exactly) and argmax and the
time it was answered: never the image, the body, the headers or anything that names a client.
Files are JSON lines, ``capture-<model>-<UTC time>-<pid>.jsonl`` (names sort by age), written as
``.jsonl.part`` while a worker appends to them and renamed when it moves on; the first line is a
header that ties the records to the checkpoint (sha256), nesting and numerics that produced them,
so ``fit_thresholds.py --unlabeled --data capture:DIR`` refits for exactly that model. A worker
holds an exclusive lock (``flock``) on its open file, which dies with the worker: a ``.part`` that
nobody holds (a killed worker's, on this machine or on another sharing the volume) is adopted
(renamed) and pruned like a closed file, whatever PID its name carries. The size bound counts
closed files and other workers' open ones; each worker's open file adds at most ``capture_file_mb``.

The request path hands two small arrays (fresh per batch, never written again) to a bounded
queue; a writer thread formats and appends them in batches. Nothing here can fail a request: a
full queue, an unwritable folder or a full disk lose records, and each lost record is counted
(``mrl_capture_records_total{outcome}``) and logged (at most once a minute). After an error the
writer retries the folder every ``RETRY_S`` seconds, so fixing it resumes capture without a
restart. A worker that exits normally writes what is queued; one that is killed loses at most
the last ``FLUSH_S`` second of records.
"""
from __future__ import annotations

import atexit
import datetime as dt
import fcntl
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SCHEMA = "mrl-serve-capture/1"
OUTCOMES = ("written", "dropped", "failed")  # dropped: queue full; failed: the folder or disk refused
QUEUE_BATCHES = 1024   # batches waiting for the writer before new ones are dropped
FLUSH_S = 1.0          # the writer appends at least this often while records arrive
RETRY_S = 30.0         # after a write error, wait this long before trying the folder again
WARN_EVERY_S = 60.0


@dataclass(frozen=True)
class CaptureConfig:
    folder: Path
    max_bytes: int = 256 << 20
    file_bytes: int = 16 << 20

    @classmethod
    def from_settings(cls, settings: dict) -> CaptureConfig | None:
        """The model-config ``handler`` block's capture settings; None when capture is off."""
        folder = settings.get("capture_dir")
        if not folder:
            return None
        max_mb, file_mb = float(settings.get("capture_max_mb", 256)), float(settings.get("capture_file_mb", 16))
        if not (0 < file_mb <= max_mb):
            raise ValueError(f"capture needs 0 < capture_file_mb <= capture_max_mb, got {file_mb} and {max_mb}")
        return cls(Path(folder), int(max_mb * 2**20), int(file_mb * 2**20))


class TrafficCapture:
    """Appends per-request (conf, pred) rows to rotating JSON-lines files from a background thread."""

    def __init__(self, config: CaptureConfig, *, model: str, header: dict) -> None:
        self.config, self.model = config, model
        self.header = {"schema": SCHEMA, "model": model, **header}
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._reported = dict.fromkeys(OUTCOMES, 0)
        self._file = None
        self._path: Path | None = None  # the open file's name
        self._file_bytes = 0
        self._retry_at = 0.0
        self._warned_at: dict[str, float] = {}
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mrl-capture", daemon=True)
        self._thread.start()
        self._pattern = re.compile(rf"capture-{re.escape(model)}-\d{{8}}T\d+Z-\d+\.jsonl")
        atexit.register(self.close)

    # --- request path ------------------------------------------------------------------------

    def record(self, conf: np.ndarray, pred: np.ndarray) -> None:
        """Queue one batch: conf (B, S) max softmax and pred (B, S) argmax per size. Never blocks."""
        try:
            self._queue.put_nowait((time.time(), conf, pred))
        except queue.Full:
            self._count("dropped", len(conf), "the capture queue is full (the disk is slower than traffic)")

    def take_counts(self) -> dict[str, int]:
        """Records per outcome since the last call: the request thread emits them as metrics."""
        with self._lock:
            delta = {k: self._counts[k] - self._reported[k] for k in OUTCOMES}
            self._reported = dict(self._counts)
        return {k: v for k, v in delta.items() if v}

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the writer."""
        self._closed.set()
        self._thread.join(timeout)

    # --- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        pending: list[tuple[float, np.ndarray, np.ndarray]] = []
        last = time.monotonic()
        while not (self._closed.is_set() and self._queue.empty()):
            try:
                pending.append(self._queue.get(timeout=0.2))
            except queue.Empty:
                pass
            if pending and (time.monotonic() - last >= FLUSH_S or len(pending) >= 64 or self._closed.is_set()):
                self._write(pending)
                pending, last = [], time.monotonic()
        if pending:
            self._write(pending)
        self._close_file()

    def _close_file(self) -> None:
        """Give the open file its final name (it may then be pruned) and close it. The rename comes
        first, while this worker's lock keeps others off the file: after a full disk, close()
        fails again (it cannot flush), yet the file must not stay a .part."""
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            os.replace(self._path, self._path.with_name(self._path.name.removesuffix(".part")))
        except OSError:
            pass
        try:
            f.close()  # closes the descriptor, and so drops the lock, even when its flush fails
        except OSError:
            pass  # what it could not flush was counted failed when the write failed

    def _write(self, batches: list[tuple[float, np.ndarray, np.ndarray]]) -> None:
        n = sum(len(c) for _, c, _ in batches)
        if time.monotonic() < self._retry_at:
            self._count("failed", n, None)
            return
        # %.9g round-trips a float32: calibration sees exactly the confidences the server compared.
        lines = "".join(f'{{"t":{t:.3f},"conf":[{",".join(f"{v:.9g}" for v in c.tolist())}],'
                        f'"pred":[{",".join(str(v) for v in p.tolist())}]}}\n'
                        for t, conf, pred in batches for c, p in zip(conf, pred))
        data = lines.encode()
        try:
            if self._file is None or self._file_bytes + len(data) > self.config.file_bytes:
                self._rotate()
            self._file.write(data)
            self._file.flush()
            self._file_bytes += len(data)
        except OSError as exc:
            self._retry_at = time.monotonic() + RETRY_S
            self._close_file()
            self._count("failed", n, f"cannot write to {self.config.folder} ({exc}); "
                                     f"retrying in {RETRY_S:.0f} s, requests are still answered")
            return
        self._count("written", n, None)

    def _rotate(self) -> None:
        self._close_file()
        folder = self.config.folder
        folder.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = folder / f"capture-{self.model}-{stamp}-{os.getpid()}.jsonl.part"
        header = (json.dumps({**self.header, "created": time.time()}) + "\n").encode()
        # Locked under a name no pruner looks at, then renamed: no other worker can find it unlocked.
        hidden = path.with_name(f".{path.name}")
        f = open(hidden, "ab")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            f.write(header)
            f.flush()
            os.replace(hidden, path)
        except OSError:
            hidden.unlink(missing_ok=True)  # it holds no record: never leave one behind per retry
            try:
                f.close()
            except OSError:
                pass
            raise
        self._file, self._path, self._file_bytes = f, path, len(header)
        self._prune(keep=path)

    def _prune(self, keep: Path) -> None:
        """Delete this model's oldest closed files until they and the other workers' open files
        total at most max_bytes minus one file (room for the one just opened). Open files are
        never touched; a .part that no process holds is adopted first (its worker died)."""
        held = 0
        for part in self.config.folder.glob(f"capture-{self.model}-*.jsonl.part"):
            if part != keep:
                held += _adopt_unless_held(part)
        for hidden in self.config.folder.glob(f".capture-{self.model}-*.jsonl.part"):
            _adopt_unless_held(hidden)  # a worker died while starting a file: only a header, deleted
        files = sorted(p for p in self.config.folder.iterdir() if self._pattern.fullmatch(p.name))
        sizes = {}
        for p in files:
            try:
                sizes[p] = p.stat().st_size
            except FileNotFoundError:  # another worker pruned it
                pass
        total = held + sum(sizes.values())
        for p in sizes:
            if total <= self.config.max_bytes - self.config.file_bytes or p == keep:
                break
            try:
                p.unlink()
                total -= sizes[p]
            except FileNotFoundError:
                total -= sizes[p]

    def _count(self, outcome: str, n: int, warning: str | None) -> None:
        with self._lock:
            self._counts[outcome] += n
        now = time.monotonic()
        if warning and now - self._warned_at.get(outcome, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned_at[outcome] = now
            log.warning("traffic capture lost %d record(s): %s", n, warning)


def _adopt_unless_held(part: Path) -> int:
    """Rename ``part`` to its final name if no process holds its lock (its writer died: the lock
    died with it); returns its size if one does (another worker's open file), else 0."""
    try:
        fd = os.open(part, os.O_RDONLY)
    except OSError:  # gone: its worker closed it, or another worker adopted it
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        size = os.fstat(fd).st_size
        os.close(fd)
        return size
    except OSError:
        os.close(fd)
        return 0
    try:
        if part.name.startswith("."):  # never renamed into view (_rotate): nothing but a header
            part.unlink()
        else:
            os.replace(part, part.with_name(part.name.removesuffix(".part")))  # while we hold its lock
    except OSError:
        pass
    finally:
        os.close(fd)
    return 0


@dataclass
class Captured:
    """Records read back from a capture folder: conf/pred (N, S), t (N,), and their header."""

    conf: np.ndarray
    pred: np.ndarray
    t: np.ndarray
    header: dict
    files: int
    skipped_lines: int


def read_capture(folder: str | Path, *, checkpoint_sha256: str | None = None, since: float | None = None,
                 nesting: Sequence[int] | None = None) -> Captured:
    """All records in ``folder`` for one checkpoint, oldest first; ``since`` (a Unix time) keeps the
    newer ones. Files from other checkpoints are skipped; if none match, the error names what the
    folder holds. A torn last line (a worker killed mid-write) is skipped and counted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"capture folder {folder} does not exist")
    conf, pred, ts, header, files, skipped, seen = [], [], [], None, 0, 0, set()
    for path in sorted(folder.glob("capture-*.jsonl*"), key=lambda p: p.name.removesuffix(".part")):
        if not path.name.endswith((".jsonl", ".jsonl.part")):
            continue
        lines = iter(path.read_text(errors="replace").splitlines())
        try:
            head = json.loads(next(lines))
        except (StopIteration, json.JSONDecodeError):
            skipped += 1
            continue
        if head.get("schema") != SCHEMA:
            raise ValueError(f"{path}: capture schema must be {SCHEMA!r}, got {head.get('schema')!r}")
        seen.add(head.get("checkpoint_sha256"))
        if checkpoint_sha256 is not None and head.get("checkpoint_sha256") != checkpoint_sha256:
            continue
        if header is None:
            header = head
        elif (head.get("checkpoint_sha256"), head.get("numerics"), head.get("nesting")) != \
                (header.get("checkpoint_sha256"), header.get("numerics"), header.get("nesting")):
            raise ValueError(f"{folder} mixes captures of different models or numerics "
                             f"({path.name}); pass --checkpoint to pick one, or split the folder")
        files += 1
        width = len(head["nesting"])
        for row in _rows(lines):
            if row is None or len(row[1]) != width or len(row[2]) != width:
                skipped += 1
            elif since is None or row[0] >= since:
                ts.append(row[0])
                conf.append(row[1])
                pred.append(row[2])
    if header is None:
        raise ValueError(f"{folder} has no capture for checkpoint sha256 {checkpoint_sha256}; "
                         f"it holds captures of {sorted(map(str, seen)) or 'nothing'}")
    s = len(header["nesting"])
    if nesting is not None and list(header["nesting"]) != list(nesting):
        raise ValueError(f"{folder} was captured with nesting {header['nesting']}, the model has {list(nesting)}")
    if not conf:
        raise ValueError(f"{folder}: no records" + ("" if since is None else " in the time asked for"))
    return Captured(np.asarray(conf, dtype=np.float32).reshape(-1, s), np.asarray(pred, dtype=np.int32).reshape(-1, s),
                    np.asarray(ts), header, files, skipped)


def _rows(lines: Iterator[str]) -> Iterator[tuple[float, list, list] | None]:
    for line in lines:
        try:
            r = json.loads(line)
            yield float(r["t"]), r["conf"], r["pred"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            yield None
