"""Our metric definitions, and the sinks that record them.

``METRICS`` is the single list of what the handler exports; ``monitoring/ts_metrics.yaml`` declares
the same set for TorchServe (a unit test keeps them equal) and docs/monitoring.md documents it. Label values
are bounded: nesting sizes, operating-point names from the thresholds file, fixed stage names and
``handler.errors.ERROR_REASONS`` and ``handler.capture.OUTCOMES``.

TorchServe matches dimension values to names by position, so every sink call passes all labels in
the order given here.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter", "histogram" or "gauge"
    labels: tuple[str, ...]
    help: str
    unit: str


METRICS = (
    MetricSpec("mrl_cascade_exits_total", "counter", ("model_name", "embedding_dim", "operating_point"),
               "Requests answered, by the embedding size that answered and the operating point.", "count"),
    MetricSpec("mrl_cascade_disagreements_total", "counter", ("model_name", "operating_point"),
               "Answered requests whose label differs from the 2048-d head's label (no labels needed).",
               "count"),
    MetricSpec("mrl_disagreement_alert_ratio", "gauge", ("model_name", "operating_point"),
               "The disagreement ratio above which the alert fires for this operating point (from the "
               "thresholds file: epsilon, or a factor times the holdout disagreement).", "ratio"),
    MetricSpec("mrl_numerics_info", "gauge", ("model_name", "numerics"),
               "1 for the numerics this model's workers serve (fp32, bf16 or int8; 'auto' chose it from the "
               "CPU's flags and the thresholds' sets).", "count"),
    MetricSpec("mrl_embedding_dims_total", "counter", ("model_name",),
               "Sum of the embedding sizes that answered requests; divide by exits for mean dims.", "count"),
    MetricSpec("mrl_cascade_escalations_total", "counter", ("model_name", "from_dim"),
               "Cascade steps that escalated past a size because its confidence was below threshold.", "count"),
    MetricSpec("mrl_exit_confidence", "histogram", ("model_name",),
               "Max softmax (0-1) of the head that answered a request.", "ratio"),
    MetricSpec("mrl_request_errors_total", "counter", ("model_name", "reason"),
               "Requests refused or failed, by bounded reason.", "count"),
    MetricSpec("mrl_stage_seconds", "histogram", ("model_name", "stage"),
               "Time a batch spent in one handler stage: decode, forward or cascade.", "seconds"),
    MetricSpec("mrl_capture_records_total", "counter", ("model_name", "outcome"),
               "Traffic-capture records by outcome: written, dropped (queue full) or failed (folder or "
               "disk refused); only while capture is on.", "count"),
    MetricSpec("mrl_retrieval_queries_total", "counter", ("model_name", "funnel"),
               "Neighbors requests answered from the gallery, by search method.", "count"),
    MetricSpec("mrl_retrieval_candidates_total", "counter", ("model_name", "funnel", "dim"),
               "Gallery items scored, per funnel stage (the prefix size it scores at); divide by "
               "queries for the stage's size.", "count"),
    MetricSpec("mrl_retrieval_seconds", "histogram", ("model_name", "funnel"),
               "Time one batch's gallery search took, per search method.", "seconds"),
    MetricSpec("mrl_batches_total", "counter", ("model_name",),
               "Inference calls (batches) handled by the worker.", "count"),
    MetricSpec("mrl_batch_items_total", "counter", ("model_name",),
               "Requests handled in batches; divide by batches for the mean batch size.", "count"),
)
SPECS = {m.name: m for m in METRICS}
STAGES = ("decode", "forward", "cascade")


class MetricsSink(Protocol):
    def emit(self, name: str, value: float, labels: Sequence[str]) -> None:
        """Add ``value`` to a counter, observe it in a histogram or set a gauge, with labels in spec order."""


class NullSink:
    def emit(self, name: str, value: float, labels: Sequence[str]) -> None:
        pass


class PrometheusSink:
    """Records into a prometheus_client registry: for tests and in-process benchmarks."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self._metrics = {}
        for spec in METRICS:
            if spec.kind == "counter":
                self._metrics[spec.name] = Counter(spec.name.removesuffix("_total"), spec.help,
                                                   spec.labels, registry=registry)
            elif spec.kind == "gauge":
                self._metrics[spec.name] = Gauge(spec.name, spec.help, spec.labels, registry=registry)
            else:
                self._metrics[spec.name] = Histogram(spec.name, spec.help, spec.labels, registry=registry)

    def emit(self, name: str, value: float, labels: Sequence[str]) -> None:
        metric = self._metrics[name].labels(*labels)
        kind = SPECS[name].kind
        if kind == "counter":
            metric.inc(value)
        elif kind == "gauge":
            metric.set(value)
        else:
            metric.observe(value)
