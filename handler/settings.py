"""How a worker runs: the archive's ``handler:`` block of model-config.yaml, parsed in one place.

Each concern has one channel (docs/architecture.md): what the model is comes from its card (in the
checkpoint), how it escalates from thresholds.json, how a worker runs from this block, which
``build_archive.py`` writes. An environment variable may override a setting, and ``ENVIRONMENT``
lists every one a worker reads. A key this module does not know is refused, naming it, so that a
typo in a hand-edited block fails the worker's start instead of being ignored.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from handler.capture import CaptureConfig
from handler.cpus import cpu_budget

# The environment variables a worker reads: name -> the setting it overrides.
ENVIRONMENT = {"MRL_THREADS": "threads"}
CAPTURE_KEYS = ("capture_dir", "capture_max_mb", "capture_file_mb")  # parsed by CaptureConfig
_BOOLS = ("channels_last", "jpeg_draft", "onednn_fusion", "graph_cache")


@dataclass(frozen=True)
class WorkerSettings:
    """The ``handler:`` block, with its defaults (an archive's block writes every one)."""

    graph: str = "eager"             # eager | jit | compile (handler/engine.py)
    numerics: str = "card"           # card | fp32 | bf16 | int8 | auto (handler/numerics.py)
    runtime: str = "torch"           # what runs int8: torch | openvino | auto (handler/numerics.py)
    threads: int = 0                 # intra-op threads; 0: the cores this worker may use / workers
    channels_last: bool = True
    jpeg_draft: bool = True
    onednn_fusion: bool = True
    graph_cache: bool = True
    gallery_dir: str | None = None   # neighbors requests search this gallery
    exact_max_items: int | None = None  # None: the service's default bound on funnel=exact
    capture: CaptureConfig | None = None
    # Derived, not a key: the threads of an OpenVINO engine, ``threads`` where given, else every core
    # this worker may use, not its share: OpenVINO's threads are not pinned (handler/engine.py) and
    # yield to the other workers' (2 workers on 2 cores, ImageNet size, AMD EPYC, 2026-12-07: one
    # client 18 ms against 28 with a core each, 16 clients 81-83 img/s against 80-85).
    openvino_threads: int = 0
    # Derived, not a key: how many of a batch's small images are decoded at once (preprocess.BatchDecoder),
    # every core this worker may use: the decode runs between forward passes, when the cores are idle.
    decode_threads: int = 1

    @classmethod
    def from_config(cls, model_config: Mapping, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
        """The settings of a model-config (TorchServe's ``model_yaml_config``), with the
        environment's overrides applied and ``threads: 0`` resolved to this worker's share of the
        cores it may use (its cgroup's CPU quota or its affinity, handler/cpus.py, divided among the
        model's workers, so two workers under a 2-CPU limit do not each run a thread per core)."""
        block = dict(model_config.get("handler") or {})
        known = {f.name for f in fields(cls)} - {"capture", "openvino_threads", "decode_threads"}
        unknown = set(block) - known - set(CAPTURE_KEYS)
        if unknown:
            raise ValueError(f"unknown handler setting(s) {sorted(unknown)} in model-config.yaml; "
                             f"known: {sorted(known | set(CAPTURE_KEYS))}")
        values: dict = {k: block[k] for k in known if k in block}
        for key in _BOOLS:
            if key in values and not isinstance(values[key], bool):
                raise ValueError(f"handler setting {key} must be true or false, got {values[key]!r}")
        for env, key in ENVIRONMENT.items():
            if environ.get(env, "").strip():
                values[key] = environ[env]
        threads = _non_negative_int("threads", values.get("threads", 0))
        openvino_threads = threads or cpu_budget()
        if threads == 0:
            workers = int(model_config.get("maxWorkers") or model_config.get("minWorkers") or 1)
            threads = max(1, cpu_budget() // workers)
        exact = values.get("exact_max_items")
        return cls(graph=str(values.get("graph", cls.graph)), numerics=str(values.get("numerics", cls.numerics)),
                   runtime=str(values.get("runtime", cls.runtime)), threads=threads,
                   openvino_threads=openvino_threads, decode_threads=cpu_budget(),
                   **{k: values[k] for k in _BOOLS if k in values},
                   gallery_dir=str(values["gallery_dir"]) if values.get("gallery_dir") else None,
                   exact_max_items=None if exact is None else _non_negative_int("exact_max_items", exact),
                   capture=CaptureConfig.from_settings(block))


def _non_negative_int(key: str, value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"handler setting {key} must be an integer, got {value!r}") from None
    if n < 0:
        raise ValueError(f"handler setting {key} must be at least 0, got {n}")
    return n
