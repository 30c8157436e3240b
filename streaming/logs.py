"""JSON logs for the bridge (``KCP_LOG_FORMAT=json``) and the W3C ``traceparent`` it carries to the model call.

A producer that traces its requests puts a ``traceparent`` header on the Kafka message; the bridge
hands it on with the model-server call (gRPC metadata or HTTP header, read by
:mod:`streaming.v2client` from :data:`TRACEPARENT`) and every log record written while that call
runs carries it, so a request can be followed from the topic to the server's log. A merged call
serves several messages but can carry one trace context: it carries the first message's.

:class:`JsonFormatter` is a copy of the server's (``predictors.protocol.observability``): the bridge
image does not contain ``predictors``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import time
from typing import Any

LOG_FORMAT_ENV = "KCP_LOG_FORMAT"
TRACEPARENT_HEADER = "traceparent"
TRACEPARENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)
"""The trace context of the model call in progress on this task (None: the message had none)."""
_VALID = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "color_message"}  # uvicorn's color_message: the message again, with terminal colours


def traceparent(value: bytes | str | None) -> str | None:
    """A header value as a trace context, or None when it is not one (a message's headers are untrusted: only
    the W3C form is passed on, never arbitrary bytes into gRPC metadata or the log)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    value = (value or "").strip().lower()
    return value if len(value) == 55 and _VALID.fullmatch(value) else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the trace context in progress, the exception if
    any, and every ``extra`` field the caller passed."""

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


def use_json_logs(value: str | None = None) -> bool:
    """Put :class:`JsonFormatter` on the root logger's handlers when ``value`` (default: ``KCP_LOG_FORMAT``) is
    ``json``; returns whether it did."""
    if value is None:
        value = os.environ.get(LOG_FORMAT_ENV)
    if (value or "").strip().lower() != "json":
        return False
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter())
    return True


# The bridge command configures logging before it imports the bridge (and so this module): switching the
# configured handlers here makes KCP_LOG_FORMAT work without the command knowing about formats.
use_json_logs()
