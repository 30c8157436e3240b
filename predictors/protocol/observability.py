"""Request metrics for Prometheus, and the optional JSON log format.

Names follow one convention across the server and the bridge: the server's metrics start with
``classifier_``, the bridge's with ``kcp_bridge_``; times are ``*_seconds`` histograms, counts
``*_total``, as in KServe; labels are ``model``, ``version``, ``protocol`` (``rest``/``grpc``) and
``status`` (the HTTP status or gRPC code name). KServe's own histograms label the model ``model_name``
and have no version: the dashboards read these instead.

* ``classifier_requests_total`` / ``classifier_request_duration_seconds``: what an operator alerts
  on, how many requests each model got and how many failed, over both protocols, including the ones
  rejected before reaching the model (unknown models and missing keys get fixed labels and an empty
  version).
* ``classifier_request_{preprocess,predict,postprocess}_seconds{model,version}``: the steps of a
  request on the direct path (``/infer`` and ``ModelInfer`` call :meth:`PackageModel.infer`, not
  KServe's data plane, so KServe's own per-step histograms stay empty there).

``KCP_LOG_FORMAT=json`` makes every log line a JSON object and adds one record per inference request
(logger ``predictors.requests``), carrying the request's W3C ``traceparent`` once the front end has
taken it from the header or metadata (:func:`set_traceparent`).
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import re
import time
from typing import Any

from prometheus_client import Counter, Histogram

REQUESTS = Counter("classifier_requests_total", "Inference requests by model, version, protocol and status",
                   ["model", "version", "protocol", "status"])
LATENCY = Histogram("classifier_request_duration_seconds", "Inference request latency",
                    ["model", "version", "protocol"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Finer at the low end than the request buckets: a step of a small tabular model takes well under a millisecond."""
PREPROCESS = Histogram("classifier_request_preprocess_seconds", "Preprocess step of an inference request",
                       ["model", "version"], buckets=STEP_BUCKETS)
PREDICT = Histogram("classifier_request_predict_seconds", "Predict step of an inference request",
                    ["model", "version"], buckets=STEP_BUCKETS)
POSTPROCESS = Histogram("classifier_request_postprocess_seconds", "Postprocess step of an inference request",
                        ["model", "version"], buckets=STEP_BUCKETS)

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
MAX_MODEL_LABEL = 64
UNKNOWN_MODEL_LABEL = "_unknown"
"""The model label of a request naming a model that is not served (every such name is one series)."""
UNAUTHENTICATED_LABEL = "_unauthenticated"
"""The model label of a request refused for a missing or wrong API key, whatever model it names."""


def _model_label(name: str) -> str:
    """Bound label cardinality: a client can send any model name, only sane ones become labels."""
    return name if len(name) <= MAX_MODEL_LABEL and re.fullmatch(r"[A-Za-z0-9._-]+", name) else "_invalid"


def served_labels(name: str, model: Any | None) -> tuple[str, str]:
    """The model and version labels of a request naming ``name``, given the served ``model`` of that name (or
    None): :data:`UNKNOWN_MODEL_LABEL` and no version for a name that is not served."""
    if model is None:
        return UNKNOWN_MODEL_LABEL, ""
    config = getattr(model, "config", None)
    return name, "" if config is None else str(config.version)


@functools.lru_cache(maxsize=1024)
def _children(model: str, version: str, protocol: str, status: str) -> tuple[Any, Any]:
    """The latency and count series of one (model, version, protocol, status): looked up once, not per request."""
    label = _model_label(model or "_invalid")
    return LATENCY.labels(label, version, protocol), REQUESTS.labels(label, version, protocol, status)


def observe_rest(model: str, version: str, status: int, seconds: float) -> None:
    """Count one REST ``/infer`` request (called by :class:`predictors.protocol.middleware.ServingMiddleware`,
    with ``model`` already a served name or one of the fixed labels, and the served ``version`` or "")."""
    latency, count = _children(model, version, "rest", str(status))
    latency.observe(seconds)
    count.inc()
    if _log_requests:
        _log_request(model, version, "rest", str(status), seconds)


def observe_grpc(model: str, version: str, code: str, seconds: float) -> None:
    """Count one gRPC ``ModelInfer`` call by its status code name (called by the servicer itself, with ``model``
    already a served name or :data:`UNKNOWN_MODEL_LABEL`; calls without the key never reach it)."""
    latency, count = _children(model, version, "grpc", code)
    latency.observe(seconds)
    count.inc()
    if _log_requests:
        _log_request(model, version, "grpc", code, seconds)


REQUEST_LOGGER = logging.getLogger("predictors.requests")
_log_requests = False


def logs_requests() -> bool:
    """Whether each request gets a log record (JSON logs on): the gRPC front end reads its trace header only then."""
    return _log_requests
"""With JSON logs, one record per inference request: what a log search joins with the trace (``traceparent``)."""


def _log_request(model: str, version: str, protocol: str, status: str, seconds: float) -> None:
    REQUEST_LOGGER.info("%s %s %s", protocol, model, status, extra={
        "model": model, "version": version or None, "protocol": protocol, "status": status,
        "duration_s": round(seconds, 6)})


@functools.lru_cache(maxsize=256)
def step_series(model: str, version: str) -> tuple[Any, Any, Any]:
    """The preprocess, predict and postprocess histograms of one served model version (looked up once, then
    cached: a request pays a cache hit and the three observations). Only served models call it."""
    return PREPROCESS.labels(model, version), PREDICT.labels(model, version), POSTPROCESS.labels(model, version)


# --- JSON logs ---------------------------------------------------------------------------------------------

LOG_FORMAT_ENV = "KCP_LOG_FORMAT"
"""``json`` turns on one JSON object per log line (for log shippers); anything else keeps the text format."""
TRACEPARENT_HEADER = "traceparent"
TRACEPARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)
"""The W3C trace context of the request being handled (the bridge sends the Kafka message's): every JSON log
record written while it is handled carries it. Set by the protocol front ends from the header or metadata."""
_VALID_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message"}  # uvicorn's color_message: the message again, with terminal colours


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the exception if any, and every ``extra``
    field the caller passed (``traceparent``, ``model``, ...), so log queries can filter on them.

    The bridge keeps a copy of this class (:mod:`streaming.logs`): its image does not contain ``predictors``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        trace = TRACEPARENT.get()
        if trace:
            out["traceparent"] = trace
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def set_traceparent(value: bytes | str | None) -> None:
    """Take a request's ``traceparent`` header for the logs of its handling; anything but the W3C form is dropped
    (a header is untrusted input and must not put arbitrary text into the log)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    value = (value or "").strip().lower()
    TRACEPARENT.set(value if len(value) == 55 and _VALID_TRACEPARENT.fullmatch(value) else None)


def json_log_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a ``logging.config.dictConfig`` document with every formatter replaced by :class:`JsonFormatter`
    (handlers, loggers and levels kept)."""
    return {**config, "formatters": {name: {"()": JsonFormatter} for name in config.get("formatters", {})}}


def use_json_logs(value: str | None) -> bool:
    """JSON logs when ``value`` (the settings' ``log_format``) is ``json``; returns whether they are on. Called
    before the server configures logging.

    KServe's default logging document becomes its JSON twin, so the server's own logging setup (KServe's
    ``configure_logging``, run when the server is built) installs JSON handlers; handlers configured already
    (root, KServe's, uvicorn's, ``predictors``') are switched too."""
    if (value or "").strip().lower() != "json":
        return False
    from predictors.protocol.kserve_adapter import logging_config

    config = logging_config()
    json_config = json_log_config(config)
    config.clear()
    config.update(json_config)
    for name in (None, "kserve", "kserve.trace", "uvicorn", "uvicorn.access", "predictors"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(JsonFormatter())
    global _log_requests
    _log_requests = True
    return True

