"""Threshold files: named operating points plus the meta block that ties them to one model.

    {
      "schema": "mrl-serve-thresholds/1",
      "default": "balanced",
      "operating_points": {"balanced": {"thresholds": {"8": 0.97, ..., "1024": null}, ...}, ...},
      "meta": {"nesting": [8, ..., 2048], "checkpoint_sha256": "...", "numerics": "bf16", ...}
    }

A threshold is the minimum max-softmax at which that size answers; ``null`` skips the size.
The server refuses a file fit on another checkpoint, nesting or numerics, naming both sides.

One file may hold a set per numerics mode, each a document like the one above without its
schema line, so that one archive serves a bf16 card on a CPU with bf16 instructions (AMX,
AVX512-BF16) and in fp32 on one without, each with thresholds calibrated in the numerics that
serve (``fit_thresholds.py --numerics MODE --add``):

    {"schema": "mrl-serve-thresholds/2", "sets": {"bf16": {"default": ..., "operating_points": ...,
     "meta": {..., "numerics": "bf16"}}, "fp32": {...}}}

A worker picks the set of the mode it serves and refuses to start when there is none, naming the
sets the file holds.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "mrl-serve-thresholds/1"
SETS_SCHEMA = "mrl-serve-thresholds/2"  # one set per numerics mode
FIXED_2048 = "fixed_2048"  # the operating point of a model served without fitted thresholds


@dataclass(frozen=True)
class OperatingPoints:
    """Validated operating points: name -> thresholds for every size but the last (None = skip)."""

    points: dict[str, tuple[float | None, ...]]
    default: str
    meta: dict
    # Per point, the live disagreement ratio with the 2048-d head above which the alert fires
    # (fit_thresholds.py writes it; the server exports it as mrl_disagreement_alert_ratio).
    alert_disagreement: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default not in self.points:
            raise ValueError(f"default operating point {self.default!r} is not among {sorted(self.points)}")

    @property
    def fitted(self) -> bool:
        return self.default != FIXED_2048

    @classmethod
    def fixed(cls, nesting: Sequence[int]) -> OperatingPoints:
        """No fitted thresholds: every request is answered at the largest size."""
        return cls({FIXED_2048: (None,) * (len(nesting) - 1)}, FIXED_2048, {"nesting": list(nesting)})


def numerics_sets(doc: dict) -> dict[str, dict]:
    """A thresholds document's sets by numerics mode: {mode: one-set document}."""
    if doc.get("schema") == SETS_SCHEMA:
        sets = doc.get("sets")
        if not isinstance(sets, dict) or not sets:
            raise ValueError(f"a thresholds file of schema {SETS_SCHEMA!r} needs a non-empty 'sets' object")
        for mode, one in sets.items():
            if not isinstance(one, dict) or one.get("meta", {}).get("numerics") != mode:
                raise ValueError(f"the thresholds set under {mode!r} must be fit in {mode} (meta.numerics)")
        return {mode: {"schema": SCHEMA, **one} for mode, one in sets.items()}
    return {doc.get("meta", {}).get("numerics"): doc}


def select_set(doc: dict, numerics: str | Sequence[str] | None) -> dict:
    """The one-set document to serve ``numerics`` with. ``numerics``: the mode that serves, or the
    modes accepted (the card's, then what this CPU serves it in; the last is the one that runs)."""
    if doc.get("schema") != SETS_SCHEMA:
        return doc
    sets = numerics_sets(doc)
    accepted = (numerics,) if isinstance(numerics, str) else tuple(numerics or ())
    if not accepted:
        if len(sets) == 1:
            return next(iter(sets.values()))
        raise ValueError(f"thresholds hold sets for {sorted(sets)}: say which numerics serve")
    serving = accepted[-1]
    if serving not in sets:
        raise ValueError(f"thresholds hold sets for numerics {sorted(sets)} but the model serves {serving!r}; "
                         f"fit one with calibration/fit_thresholds.py --numerics {serving} --add")
    return sets[serving]


def add_set(existing: dict | None, doc: dict) -> dict:
    """``existing`` (a one-set or a sets document, or None) with ``doc``'s set added, replacing a
    set of the same numerics. Sets must be for one checkpoint and nesting."""
    if existing is None:
        return doc
    sets = numerics_sets(existing)
    meta = doc["meta"]
    for mode, other in sets.items():
        for key in ("checkpoint_sha256", "nesting"):
            if other.get("meta", {}).get(key) != meta.get(key):
                raise ValueError(f"the {mode} set in the file was fit for {key} {other.get('meta', {}).get(key)} "
                                 f"but this fit is for {meta.get(key)}: one file holds sets for one model")
    sets[meta["numerics"]] = doc
    return {"schema": SETS_SCHEMA,
            "sets": {mode: {k: v for k, v in one.items() if k != "schema"} for mode, one in sorted(sets.items())}}


def parse_thresholds(doc: dict, *, nesting: Sequence[int], checkpoint_sha256: str | None,
                     numerics: str | Sequence[str] | None) -> OperatingPoints:
    """Validate a thresholds document against the model that will serve it. ``numerics`` is the
    mode (or modes: the card's, and what this CPU serves it in) the file must have been fit in;
    of a file with a set per mode, the set of the mode that serves (``select_set``)."""
    doc = select_set(doc, numerics)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"thresholds schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    meta = doc.get("meta", {})
    if list(meta.get("nesting", [])) != list(nesting):
        raise ValueError(f"thresholds were fit for nesting {meta.get('nesting')} but the model has "
                         f"{list(nesting)}")
    fit_sha = meta.get("checkpoint_sha256")
    if checkpoint_sha256 is not None and fit_sha != checkpoint_sha256:
        raise ValueError(f"thresholds were fit on checkpoint sha256 {fit_sha} but the model is "
                         f"sha256 {checkpoint_sha256}; refit them with calibration/fit_thresholds.py")
    accepted = (numerics,) if isinstance(numerics, str) else tuple(numerics or ())
    if accepted and meta.get("numerics") not in accepted:
        raise ValueError(f"thresholds were fit with numerics {meta.get('numerics')!r} but the model "
                         f"serves {' or '.join(map(repr, accepted))}; calibrate with the numerics that serve")
    keys = [str(m) for m in nesting[:-1]]
    points: dict[str, tuple[float | None, ...]] = {}
    alerts: dict[str, float] = {}
    for name, point in doc.get("operating_points", {}).items():
        if not name.replace("_", "").replace("-", "").isalnum() or len(name) > 32:
            raise ValueError(f"operating point name {name!r} must be 1-32 letters, digits, '_' or '-'")
        t = point.get("thresholds", {})
        if sorted(t, key=int) != keys:
            raise ValueError(f"operating point {name!r} needs thresholds for sizes {keys}, got {sorted(t, key=int)}")
        values = tuple(t[k] for k in keys)
        for k, v in zip(keys, values):
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"operating point {name!r}: threshold for size {k} must be in [0, 1] "
                                 f"or null, got {v!r}")
        points[name] = values
        ratio = point.get("alert_disagreement")
        if ratio is not None:
            if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 < ratio <= 1.0):
                raise ValueError(f"operating point {name!r}: alert_disagreement must be in (0, 1], got {ratio!r}")
            alerts[name] = float(ratio)
    if not points:
        raise ValueError("thresholds file has no operating points")
    return OperatingPoints(points, doc.get("default", ""), meta, alerts)


def load_thresholds(path: str | Path, **expect) -> OperatingPoints:
    with open(path) as f:
        return parse_thresholds(json.load(f), **expect)
