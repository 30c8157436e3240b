"""Request metrics for Prometheus: counts by model, protocol and status, and latency histograms.

KServe already exports per-step histograms (``request_preprocess_seconds`` ...); these add
what an operator alerts on: how many requests each model got and how many failed, over
both protocols, including the ones rejected before reaching the model.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from prometheus_client import Counter, Histogram

REQUESTS = Counter("classifier_requests_total", "Inference requests by model, protocol and status",
                   ["model", "protocol", "status"])
LATENCY = Histogram("classifier_request_duration_seconds", "Inference request latency", ["model", "protocol"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
MAX_MODEL_LABEL = 64
UNKNOWN_MODEL_LABEL = "_unknown"
"""The model label of a request naming a model that is not served (every such name is one series)."""
UNAUTHENTICATED_LABEL = "_unauthenticated"
"""The model label of a request refused for a missing or wrong API key, whatever model it names."""


def _model_label(name: str) -> str:
    """Bound label cardinality: a client can send any model name, only sane ones become labels."""
    return name if len(name) <= MAX_MODEL_LABEL and re.fullmatch(r"[A-Za-z0-9._-]+", name) else "_invalid"


def served_label(model: str, served: bool) -> str:
    """``model`` when it is served, else :data:`UNKNOWN_MODEL_LABEL`: the callers know which names are served."""
    return model if served else UNKNOWN_MODEL_LABEL


@functools.lru_cache(maxsize=1024)
def _children(model: str, protocol: str, status: str) -> tuple[Any, Any]:
    """The latency and count series of one (model, protocol, status): looked up once, not per request."""
    label = _model_label(model or "_invalid")
    return LATENCY.labels(label, protocol), REQUESTS.labels(label, protocol, status)


def observe_rest(model: str, status: int, seconds: float) -> None:
    """Count one REST ``/infer`` request (called by :class:`predictors.protocol.middleware.ServingMiddleware`,
    with ``model`` already a served name or one of the fixed labels)."""
    latency, count = _children(model, "rest", str(status))
    latency.observe(seconds)
    count.inc()


def observe_grpc(model: str, code: str, seconds: float) -> None:
    """Count one gRPC ``ModelInfer`` call by its status code name (called by the servicer itself, with ``model``
    already a served name or :data:`UNKNOWN_MODEL_LABEL`; calls without the key never reach it)."""
    latency, count = _children(model, "grpc", code)
    latency.observe(seconds)
    count.inc()
