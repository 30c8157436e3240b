"""Prometheus metrics of the feedback API, registered in the default registry.

Why these shapes:

* Every per-model series carries ``version``, the model version (config.json) the feedback judges,
  so a swap or a canary does not mix versions; ``sum by (model, ...)`` still gives the model's totals.
* ``classifier_feedback_total{model, version, source, true_label, predicted_label}`` counts
  confusion-matrix cells; ``source`` (``api`` or ``ui``, a fixed set) lets a query leave out what was
  typed on the browser page.
  Each replica counts only the submissions *it* accepted, so ``sum by (model, true_label,
  predicted_label)`` over replicas is the cluster-wide matrix of the scrape window, and precision,
  recall and accuracy over any range follow in PromQL from ``increase()`` of these counters (the
  Grafana dashboard does exactly that). Counters restart at 0 with a process; ``increase()`` handles it.
* ``classifier_feedback_accuracy{model, version}`` and ``classifier_feedback_macro_f1{model, version}``
  are the *cumulative* values over all production feedback (``source="api"``: trial clicks on the
  browser page would move an alert) stored for that version, set after each accepted submission
  from the database totals; macro F1 averages the classes present (see :mod:`predictors.feedback.metrics`).
  With several replicas sharing one database every replica's gauge reads the same shared totals, so
  the gauges agree (up to submissions accepted since a replica last
  updated): aggregate them with ``max``/``avg``, never ``sum``.
* ``classifier_feedback_rejected_total{model, reason}`` counts rejected submissions. ``model`` is
  only set to names that are actually served (``reason="unknown_model"`` uses ``model=""``) so a
  client cannot grow the label set without bound. ``reason="unavailable"`` counts submissions
  refused with 503 because the database was unreachable.
* ``classifier_feedback_store_up`` is 1 while the feedback database answered the last call and 0
  while it is unreachable: alert on it; inference readiness deliberately does not depend on it.

They live in ``prometheus_client.REGISTRY``, which KServe's ``/metrics`` route exposes. Note that
with ``--workers > 1`` each REST worker process has its own counters (KServe's metrics are per
process too); Prometheus scrapes pods, so run one worker per pod when these numbers matter.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Gauge

from predictors.feedback.metrics import ClassificationMetrics
from predictors.feedback.store import FeedbackStore

FEEDBACK_TOTAL = Counter(
    "classifier_feedback",
    "Ground-truth feedback accepted, per confusion-matrix cell (true label x predicted label).",
    ["model", "version", "source", "true_label", "predicted_label"],
)
FEEDBACK_ACCURACY = Gauge(
    "classifier_feedback_accuracy",
    "Cumulative accuracy over all production feedback of the model version (shared database totals).",
    ["model", "version"],
)
FEEDBACK_MACRO_F1 = Gauge(
    "classifier_feedback_macro_f1",
    "Cumulative macro-averaged F1 (classes present) over all production feedback of the model version.",
    ["model", "version"],
)
FEEDBACK_REJECTED = Counter(
    "classifier_feedback_rejected",
    "Feedback submissions rejected, by reason.",
    ["model", "reason"],
)

FEEDBACK_STORE_UP = Gauge(
    "classifier_feedback_store_up",
    "1 while the feedback database answered the last call, 0 while it is unreachable.",
)

REJECTION_REASONS = ("malformed_json", "invalid_body", "too_large", "unknown_label", "unknown_id",
                     "duplicate", "unknown_model", "unavailable")

EXPORTED_METRIC_NAMES = frozenset({
    "classifier_feedback_total",
    "classifier_feedback_accuracy",
    "classifier_feedback_macro_f1",
    "classifier_feedback_rejected_total",
    "classifier_feedback_store_up",
})
"""The sample names these metrics expose (what PromQL and the dashboard refer to)."""


def observe_batch(model: str, version: str, source: str, batch: np.ndarray, labels: list[int]) -> None:
    """Add an accepted submission's confusion matrix (of one version) to the cell counters."""
    for i, j in zip(*np.nonzero(batch), strict=True):
        FEEDBACK_TOTAL.labels(model=model, version=version, source=source, true_label=str(labels[i]),
                              predicted_label=str(labels[j])).inc(int(batch[i, j]))


def set_cumulative(model: str, version: str, metrics: ClassificationMetrics) -> None:
    """Set the version's gauges from its cumulative report (nothing to set while there is no feedback)."""
    if metrics.accuracy is None:
        return
    FEEDBACK_ACCURACY.labels(model=model, version=version).set(metrics.accuracy)
    FEEDBACK_MACRO_F1.labels(model=model, version=version).set(metrics.macro_avg.f1)


def watch_store(store: FeedbackStore) -> None:
    """Report ``store``'s last observed state in ``classifier_feedback_store_up`` (read at scrape, no I/O)."""
    FEEDBACK_STORE_UP.set_function(lambda: float(store.health().available))


def observe_rejection(model: str, reason: str) -> None:
    """Count a rejected submission; ``model`` must be a served model's name or ""."""
    if reason not in REJECTION_REASONS:
        raise ValueError(f"unknown rejection reason {reason!r}")
    FEEDBACK_REJECTED.labels(model=model, reason=reason).inc()
