"""Per-size outputs of a model over a labelled data set, computed the way the server computes them.

Images go through ``handler.preprocess`` and ``handler.engine.Engine`` with the card's numerics
and the serving graph mode, so thresholds are fit on the numbers the server will see. Results are
cached as .npz keyed by checkpoint hash, data spec, numerics and graph mode; for an image folder,
also by its files (path, size and modification time of each), so that images re-exported into the
same folder are run again instead of being scored as the old ones.

A ``capture:DIR`` spec reads traffic the server captured instead (``handler/capture.py``): the
numbers it served, with no labels. Its ``labels`` are then the 2048-d head's answers, so "top-1"
on it means agreement with the full model, which is what ``--unlabeled`` calibration bounds.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibration.int8 import RECORD
from handler.capture import read_capture
from handler.checkpoint import file_sha256, load_mrl_resnet50, read_checkpoint
from handler.engine import OPENVINO_CONFIG, Engine, configure_threads
from handler.numerics import resolve_numerics
from handler.preprocess import Normalizer, crop_image
from imagedata.specs import load_spec

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "calibration"
CAPTURE = "capture:"


@dataclass
class Outputs:
    """conf/pred: (N, S) max softmax and argmax per size; labels: (N,); nesting: S sizes."""

    conf: np.ndarray
    pred: np.ndarray
    labels: np.ndarray
    nesting: tuple[int, ...]
    meta: dict

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.labels[:, None]

    def subset(self, idx: np.ndarray) -> Outputs:
        return Outputs(self.conf[idx], self.pred[idx], self.labels[idx], self.nesting, self.meta)

    def top1(self) -> dict[str, float]:
        return {str(m): float(a) for m, a in zip(self.nesting, self.correct.mean(axis=0))}

    @property
    def labeled(self) -> bool:
        return not self.meta.get("unlabeled", False)


def is_capture(spec: str) -> bool:
    return spec.startswith(CAPTURE)


def folder_fingerprint(spec: str) -> str | None:
    """For an image-folder spec, a hash of every file under it (relative path, size, mtime in ns):
    it changes when any file is added, removed, moved to another class, rewritten or touched.
    None for the named data sets (their files are fixed by the spec) and captures."""
    family, _, split = spec.partition(":")
    root = Path(spec)
    if (family in ("fashion-mnist", "han1000") and split) or is_capture(spec) or not root.is_dir():
        return None
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def from_capture(checkpoint: str | Path, spec: str, since: float | None = None) -> Outputs:
    """Captured traffic for ``checkpoint`` as Outputs; labels are the 2048-d head's answers."""
    sha = file_sha256(checkpoint)
    card, _ = read_checkpoint(checkpoint)
    cap = read_capture(spec[len(CAPTURE):], checkpoint_sha256=sha, since=since, nesting=card.nesting)
    meta = {"checkpoint_sha256": sha, "data": spec, "numerics": cap.header["numerics"],
            "card_numerics": card.numerics, "graph": cap.header.get("graph", "jit"),
            "nesting": list(card.nesting), "n": len(cap.conf), "cached": False, "unlabeled": True,
            **({"int8_program": {"fingerprint": cap.header["int8_program_fingerprint"]}}
               if "int8_program_fingerprint" in cap.header else {}),
            "capture": {"files": cap.files, "skipped_lines": cap.skipped_lines,
                        "first": float(cap.t.min()), "last": float(cap.t.max())}}
    return Outputs(cap.conf, cap.pred, cap.pred[:, -1].astype(np.int64), card.nesting, meta)


def forward_spec(checkpoint: str | Path, spec: str, *, graph: str = "jit", numerics: str | None = None,
                 batch_size: int = 250, progress: bool = True, limit: int | None = None, emulate: bool = False,
                 int8_program=None):
    """Run the model over a data spec the way a worker would (its preprocessing, Engine, numerics
    and graph mode): yields ((B, S, C) probabilities, (B, 2048) embedding, the data set) per batch,
    in order. Calibration keeps the probabilities; retrieval keeps the embeddings. ``emulate``: run
    the card's (or ``numerics``') mode even where this CPU would serve it in fp32 (Engine).
    ``numerics='int8'`` runs ``int8_program`` (handler/quantize.py) with the fp32 heads."""
    configure_threads()
    int8 = numerics == "int8"
    model, card = load_mrl_resnet50(checkpoint, numerics="fp32" if int8 else numerics)
    data = load_spec(spec, card.classes, limit=limit)
    batch_size = min(batch_size, len(data), 64 if int8 else len(data))  # the program's batch bound
    mode = "int8" if int8 else card.numerics if emulate else resolve_numerics(card.numerics)
    engine = Engine(model, numerics=mode, graph=graph, input_size=card.preprocessing.crop,
                    batch_sizes=(batch_size,), emulate=emulate, int8_program=int8_program,
                    preprocessing=card.preprocessing)
    normalize = Normalizer(card.preprocessing)
    bar = tqdm(total=len(data), desc=f"forward {spec}", unit="img", disable=not progress, file=sys.stderr)
    for start in range(0, len(data), batch_size):
        idx = range(start, min(start + batch_size, len(data)))
        probs, emb = engine(engine.model_input([crop_image(data[i][0], card.preprocessing) for i in idx], normalize))
        bar.update(len(idx))
        yield probs, emb, data
    bar.close()


def collect(checkpoint: str | Path, spec: str, *, graph: str = "jit", numerics: str | None = None,
            batch_size: int = 250, cache_dir: Path | None = DEFAULT_CACHE, progress: bool = True,
            since: float | None = None, emulate: bool = False, int8_program=None) -> Outputs:
    """Run the model over ``spec`` (or read the cache) and return per-size confidences and labels.

    ``numerics`` overrides the card's (the parity check runs one checkpoint both ways); 'int8'
    runs ``int8_program`` (a ``handler.quantize.Program``, whose fingerprint keys the cache). A
    ``capture:DIR`` spec is read back from the server's traffic capture (records at or after the
    Unix time ``since``), never cached."""
    if is_capture(spec):
        return from_capture(checkpoint, spec, since)
    sha = file_sha256(checkpoint)
    int8 = numerics == "int8"
    card, _ = read_checkpoint(checkpoint, numerics=None if int8 else numerics)  # the cache key needs only the card
    used = "int8" if int8 else resolve_numerics(card.numerics)  # what a worker on this CPU serves
    emulate = emulate and not int8 and used != card.numerics  # only where this CPU lacks the instructions
    meta = {"checkpoint_sha256": sha, "data": spec, "numerics": card.numerics if emulate else used,
            "card_numerics": card.numerics, "graph": "compile" if int8 else graph,
            "preprocessing": card.preprocessing.to_dict(), "nesting": list(card.nesting),
            **({"data_files_sha256": files} if (files := folder_fingerprint(spec)) else {}),
            **({"emulated": True} if emulate else {}),
            **({"int8_program": {k: int8_program.meta[k] for k in RECORD}}
               if int8 else {}),
            # how OpenVINO runs its program (precision, input) changes its outputs, not its fingerprint
            **({"openvino": {"config": OPENVINO_CONFIG, "input": "uint8"}}
               if int8 and getattr(int8_program, "runtime", "torch") == "openvino" else {})}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    cached = cache_dir / f"outputs-{key}.npz" if cache_dir else None
    if cached and cached.exists():
        z = np.load(cached)
        return Outputs(z["conf"], z["pred"], z["labels"], card.nesting, {**meta, "n": len(z["labels"]), "cached": True})

    conf, pred = [], []
    data = None
    # data: the data set, read after the loop (B007 would have it renamed)
    for probs, _emb, data in forward_spec(  # noqa: B007
            checkpoint, spec, graph=graph, numerics=numerics, batch_size=batch_size, progress=progress,
            emulate=emulate, int8_program=int8_program):
        c, p = probs.max(dim=-1)
        conf.append(c.numpy())
        pred.append(p.numpy().astype(np.int32))
    out = Outputs(np.concatenate(conf), np.concatenate(pred), np.asarray(data.labels, dtype=np.int64),
                  card.nesting, {**meta, "n": len(data), "cached": False})
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, conf=out.conf, pred=out.pred, labels=out.labels)
    return out
