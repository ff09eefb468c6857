"""TorchServe entry point: the only module that touches ``ts.*``.

It builds an ``MRLService`` from the model folder TorchServe unpacked (checkpoint.pt with its
model card, optional thresholds.json) and the ``handler:`` block of model-config.yaml
(``WorkerSettings``, handler/settings.py), then turns
each batch into per-request HTTP statuses and JSON bodies.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
import weakref
from http import HTTPStatus
from pathlib import Path

from ts.metrics.metric_type_enum import MetricTypes

# In an archive this file sits beside the handler package it carries (build_archive.py). Put that
# first on the path: TorchServe places the model folder after the caller's PYTHONPATH, so an
# installed or checked-out handler would otherwise win, and a worker would not run its archive's code.
_ARCHIVE = Path(__file__).resolve().parent
if (_ARCHIVE / "handler" / "__init__.py").is_file() and sys.path[:1] != [str(_ARCHIVE)]:
    sys.path.insert(0, str(_ARCHIVE))

import torch  # noqa: E402

import handler  # noqa: E402  (after the path fix above)
from handler.engine import configure_threads  # noqa: E402
from handler.metrics import SPECS  # noqa: E402
from handler.service import MRLService  # noqa: E402
from handler.settings import WorkerSettings  # noqa: E402

log = logging.getLogger(__name__)
# The logger TorchServe's CachingMetric writes its lines to (the worker logs to stdout).
_TS_METRICS_LOG = logging.getLogger("ts.metrics.caching_metric")
_TYPES = {"counter": MetricTypes.COUNTER, "histogram": MetricTypes.HISTOGRAM, "gauge": MetricTypes.GAUGE}


class TorchServeSink:
    """Forwards our metrics to TorchServe's metrics system (declared in ts_metrics.yaml).

    Each emit becomes the line TorchServe's own ``CachingMetric.add_or_update`` would log (the
    frontend parses the worker's stdout line by line), and ``flush`` writes a batch's lines in one
    logging call: TorchServe logs, and so writes to the pipe, once a metric, and ten of those took
    0.4 ms of a lone request's 15 ms (docs/benchmarks.md). The handler flushes before it returns the
    batch's responses, so a scrape after an answer sees its metrics, as before. The format is
    TorchServe 0.12.0's; tests/unit/test_ts_handler.py compares it with TorchServe's own line.
    """

    def __init__(self, metrics_cache) -> None:
        self._cache = metrics_cache
        self._metrics: dict = {}  # name -> TorchServe's metric object, from the cache once
        self._lines: list[str] = []
        self._host = socket.gethostname()  # TorchServe asks on every line; it does not change

    def emit(self, name: str, value: float, labels) -> None:
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = self._cache.get_metric(name, _TYPES[SPECS[name].kind])
        if len(labels) != len(metric.dimension_names):  # SPECS and ts_metrics.yaml disagree: a bug of ours
            raise ValueError(f"{name} takes {metric.dimension_names}, got {list(labels)}")
        dims = ",".join(f"{d}:{v}" for d, v in zip(metric.dimension_names, labels))
        self._lines.append(f"[METRICS]{metric.metric_name}.{metric.unit}:{value}|#{dims}"
                           f"|#type:{metric.metric_type.name}|#hostname:{self._host},{int(time.time())}")

    def flush(self) -> None:
        """Write the lines emitted since the last flush, in one logging call."""
        lines, self._lines = self._lines, []
        if lines:
            _TS_METRICS_LOG.info("\n".join(lines))


# TorchServe's worker logs this line (its root logger, to stdout) for every batch it reads; the
# frontend reads it back, matches it against its patterns and writes it to model_log.log: a line a
# batch that says only the second it arrived (access_log.log has every request), and work for the
# frontend on the cores the model needs. The filter drops that record and nothing else.
_TS_RECEIVED = "Backend received inference at: %d"


def _not_torchserve_received(record: logging.LogRecord) -> bool:
    return record.msg != _TS_RECEIVED


def quiet_torchserve_worker(root: logging.Logger | None = None) -> None:
    """Drop TorchServe's per-batch "Backend received inference at" line (once per process)."""
    root = root or logging.getLogger()
    if _not_torchserve_received not in root.filters:
        root.addFilter(_not_torchserve_received)


_READ_AHEAD = 256 * 1024  # bytes a buffered read asks for at most


def buffer_torchserve_reads() -> None:
    """Read the frontend's frames a socket buffer at a time, not a field at a time (once per process).

    TorchServe 0.12's worker reads each field of a batch (an id, each HTTP header's name and value,
    each body) with a ``recv`` of its own through ``otf_message_handler._retrieve_buffer``: about
    40 system calls a request, 340 for a batch of 8. This puts a buffered reader in its place: the
    same bytes in the same order, read with one ``recv`` of up to 256 KiB while the buffer is
    short. Everything TorchServe reads from the frontend goes through that function, so bytes read
    ahead of the current message wait in the buffer for the next call; the frontend closing the
    connection ends the worker as TorchServe's own reader does. Called from ``initialize``, inside
    the model's load message and before the next is read, so no byte is read twice or skipped.
    """
    from ts.protocol import otf_message_handler as otf

    if getattr(otf._retrieve_buffer, "buffered", False):
        return
    pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a socket -> bytes read ahead

    def retrieve_buffer(conn, length: int) -> bytearray:
        buf = pending.get(conn)
        if buf is None:
            buf = pending[conn] = bytearray()
        while len(buf) < length:
            pkt = conn.recv(max(length - len(buf), _READ_AHEAD))
            if not pkt:
                logging.info("Frontend disconnected.")
                sys.exit(0)
            buf += pkt
        out = buf[:length]
        del buf[:length]  # CPython moves a bytearray's start: no copy of the rest
        return out

    retrieve_buffer.buffered = True
    otf._retrieve_buffer = retrieve_buffer


class MRLHandler:
    def __init__(self) -> None:
        self.service: MRLService | None = None
        self.sink: TorchServeSink | None = None  # the service's, flushed here once a batch

    def initialize(self, context) -> None:
        t0 = time.perf_counter()
        quiet_torchserve_worker()
        buffer_torchserve_reads()
        props = context.system_properties
        config = getattr(context, "model_yaml_config", None) or {}
        settings = WorkerSettings.from_config(config)
        gpu = props.get("gpu_id")
        device = f"cuda:{gpu}" if gpu is not None and _cuda_available() else "cpu"
        threads = configure_threads(settings.threads)
        batch_size = int(props.get("batch_size") or 1)
        self.sink = TorchServeSink(context.metrics)
        self.service = MRLService.from_dir(
            props["model_dir"], name=context.model_name, device=device,
            graph=settings.graph, batch_sizes=_warm_sizes(batch_size), channels_last=settings.channels_last,
            jpeg_draft=settings.jpeg_draft, onednn_fusion=settings.onednn_fusion, sink=self.sink,
            capture=settings.capture, gallery_dir=settings.gallery_dir,
            **({"exact_max_items": settings.exact_max_items} if settings.exact_max_items is not None else {}),
            graph_cache=settings.graph_cache, numerics=settings.numerics, runtime=settings.runtime,
            openvino_threads=settings.openvino_threads, decode_threads=settings.decode_threads)
        self.service.engine.release_cores()  # OpenVINO: ``threads`` are its own, torch keeps one
        if self.service.engine.graph == "openvino":
            threads = settings.openvino_threads
        t = self.service.engine.timings
        log.info("mrl handler ready: model=%s device=%s threads=%d graph=%s numerics=%s "
                 "batch_size=%d operating_points=%s default=%s code=%s", context.model_name, device, threads,
                 self.service.engine.graph, self.service.numerics, batch_size,
                 list(self.service.points.points), self.service.points.default, Path(handler.__file__).parent)
        # One line that says where the worker's start went (bench/recovery.py reads it): the
        # process's age covers the interpreter, the imports and TorchServe's own set-up.
        log.info("mrl worker start: process_age_s=%.2f initialize_s=%.2f graph_s=%.2f warm_up_s=%.2f "
                 "graph_cached=%s", _process_age_s(), time.perf_counter() - t0, t["graph_s"], t["warm_up_s"],
                 self.service.engine.graph_cached)
        self.sink.flush()  # anything a start emitted

    def handle(self, data, context) -> list[str]:
        headers = [context.get_all_request_header(i) for i in range(len(data))]
        try:
            results = self.service.handle(data, headers)
        finally:  # the batch's metric lines, before its responses leave
            self.sink.flush()
        bodies = []
        for i, (status, body) in enumerate(results):
            # v1 errors carry a type; Open Inference Protocol errors are {"error": ...} only.
            phrase = "OK" if status == 200 else body.get("type") or HTTPStatus(status).phrase
            context.set_response_status(code=status, phrase=phrase, idx=i)
            context.set_response_content_type(i, "application/json")
            bodies.append(json.dumps(body, ensure_ascii=False))  # "label": "永", UTF-8
        return bodies


def _warm_sizes(batch_size: int) -> list[int]:
    """Every batch size dynamic batching can form; warm-up runs each one once at start."""
    return list(range(1, batch_size + 1))


def _process_age_s() -> float:
    """Seconds since this process started (Linux /proc; NaN elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _cuda_available() -> bool:
    return torch.cuda.is_available()


_handler = MRLHandler()


def handle(data, context):
    """TorchServe calls this for initialization (data is None) and for every batch."""
    if _handler.service is None:
        _handler.initialize(context)
    if data is None:
        return None
    return _handler.handle(data, context)

