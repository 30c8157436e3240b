"""Ground-truth feedback: durable storage, classification metrics, REST API and Prometheus metrics.

Users send the true labels of earlier predictions after the fact; this package stores them
(:class:`FeedbackStore`, SQLite or PostgreSQL), computes scikit-learn-compatible metrics over the
labels of the package's labels_file.json (:func:`compute_metrics`) and serves both through the
routes of :func:`build_feedback_router`, which the model server mounts next to the V2 endpoints.
"""

from predictors.feedback.api import build_feedback_router
from predictors.feedback.metrics import ClassificationMetrics, compute_metrics
from predictors.feedback.store import DuplicateFeedback, FeedbackStore, UnknownPredictions

__all__ = [
    "ClassificationMetrics",
    "DuplicateFeedback",
    "FeedbackStore",
    "UnknownPredictions",
    "build_feedback_router",
    "compute_metrics",
]
