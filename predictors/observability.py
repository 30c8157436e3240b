"""Request metrics for Prometheus: counts by model, protocol and status, and latency histograms.

KServe already exports per-step histograms (``request_preprocess_seconds`` ...); these add
what an operator alerts on: how many requests each model got and how many failed, over
both protocols, including the ones rejected before reaching the model.
"""

from __future__ import annotations

import re

from prometheus_client import Counter, Histogram

REQUESTS = Counter("classifier_requests_total", "Inference requests by model, protocol and status",
                   ["model", "protocol", "status"])
LATENCY = Histogram("classifier_request_duration_seconds", "Inference request latency", ["model", "protocol"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
MAX_MODEL_LABEL = 64


def _model_label(name: str) -> str:
    """Bound label cardinality: a client can send any model name, only sane ones become labels."""
    return name if len(name) <= MAX_MODEL_LABEL and re.fullmatch(r"[A-Za-z0-9._-]+", name) else "_invalid"


def observe_rest(model: str, status: int, seconds: float) -> None:
    """Count one REST ``/infer`` request (called by :class:`predictors.middleware.ServingMiddleware`)."""
    label = _model_label(model)
    LATENCY.labels(label, "rest").observe(seconds)
    REQUESTS.labels(label, "rest", str(status)).inc()


def observe_grpc(model: str, code: str, seconds: float) -> None:
    """Count one gRPC ``ModelInfer`` call by its status code name (called by the servicer itself)."""
    label = _model_label(model or "_invalid")
    LATENCY.labels(label, "grpc").observe(seconds)
    REQUESTS.labels(label, "grpc", code).inc()
