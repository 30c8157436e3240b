"""API-key authentication: the key check, and the gRPC interceptor (REST: :mod:`predictors.protocol.middleware`).

When a key is configured, every inference, metadata, repository and feedback endpoint
requires it: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` over REST,
``authorization: Bearer <key>`` or ``x-api-key`` metadata over gRPC. Health endpoints
stay open for Kubernetes probes, as do ``/metrics`` and ``/openapi.json`` (Prometheus scrapes
without app credentials; ``--metrics-auth`` closes them) and the static UI shell (it asks for
the key itself). Keys are compared
with :func:`hmac.compare_digest` so the comparison time does not leak the key.

Rotation without a restart: when the key comes from a file (``KCP_API_KEY_FILE``, typically a
mounted Kubernetes Secret, which the kubelet updates in place by swapping a symlink), the file is
looked at again at most once a second; a changed, non-empty key becomes the key, and the previous
one stays valid for ``KCP_API_KEY_OVERLAP_S`` seconds (default 300) so clients can move over
without a burst of 401s. An empty or unreadable file keeps the current key.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc.aio import ServerInterceptor

OPEN_REST_PATHS = re.compile(
    r"^(/|/metrics|/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready|/ui(/.*)?|/docs|/openapi\.json)$"
)
log = logging.getLogger(__name__)

DEFAULT_OVERLAP_S = 300.0
"""Default of ``KCP_API_KEY_OVERLAP_S`` (:class:`predictors.settings.ServerSettings`)."""
RECHECK_S = 1.0
"""Least time between two looks at the key file (a ``stat`` on the request path, no read unless changed)."""

GRPC_KEY_REFUSED = "missing or invalid API key: send 'authorization: Bearer <key>' metadata"
OPEN_GRPC_METHODS = frozenset({
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
})


class APIKey:
    """A configured key and the constant-time check against what a client presented.

    ``key_file`` (the server passes ``KCP_API_KEY_FILE``; None: the key never changes) is watched for
    rotation as described in the module docstring; ``overlap_s`` (``KCP_API_KEY_OVERLAP_S``) is how
    long the replaced key is still accepted.
    """

    def __init__(self, key: str, key_file: str | Path | None = None, overlap_s: float = DEFAULT_OVERLAP_S) -> None:
        self._key = key.encode("utf-8")
        self._previous: bytes | None = None
        self._previous_until = 0.0
        self._file = Path(key_file) if key_file else None
        self._overlap_s = float(overlap_s)
        if self._overlap_s < 0:
            raise ValueError(f"the key overlap must be 0 or more seconds, got {self._overlap_s}")
        self._seen = self._stamp()
        self._next_look = time.monotonic() + RECHECK_S
        self._lock = threading.Lock()

    def matches(self, presented: str | None) -> bool:
        """Whether ``presented`` is the key (or the previous one, within the overlap)."""
        if self._file is not None and time.monotonic() >= self._next_look:
            self._reload()
        if not presented:
            return False
        given = presented.encode("utf-8", "surrogateescape")
        current = hmac.compare_digest(given, self._key)
        previous = self._previous is not None and hmac.compare_digest(given, self._previous)
        return current or (previous and time.monotonic() < self._previous_until)

    def _stamp(self) -> tuple[int, int, int] | None:
        """What changes when the file (through its symlinks) is replaced or rewritten."""
        try:
            st = os.stat(self._file) if self._file is not None else None
        except OSError:
            return None
        return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self._next_look:
                return
            self._next_look = now + RECHECK_S
            stamp = self._stamp()
            if stamp is None or stamp == self._seen:
                return
            self._seen = stamp
            assert self._file is not None  # only called when there is a file
            try:
                new = self._file.read_text(encoding="utf-8").strip().encode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                log.error("cannot read the API key file %s (%s); keeping the current key", self._file, exc)
                return
            if not new:
                log.error("the API key file %s is empty; keeping the current key", self._file)
                return
            if new != self._key:
                self._previous, self._previous_until = self._key, now + self._overlap_s
                self._key = new
                log.warning("API key rotated from %s; the previous key is accepted for %.0f s more",
                            self._file, self._overlap_s)

    @staticmethod
    def presented(x_api_key: str | None, authorization: str | None) -> str | None:
        if x_api_key:
            return x_api_key.strip()
        if authorization and authorization[:7].lower() == "bearer ":
            return authorization[7:].strip()
        return None


class GRPCAuthInterceptor(ServerInterceptor):
    """Reject gRPC calls without the key with UNAUTHENTICATED, before the handler runs."""

    def __init__(self, key: APIKey) -> None:
        self.key = key

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if grpc_call_allowed(self.key, handler_call_details.method, handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny_like(handler)


def grpc_call_allowed(key: APIKey, method: str, metadata: Any) -> bool:
    """Whether a gRPC call to ``method`` may run: open methods always, others with the key in ``metadata``."""
    if method in OPEN_GRPC_METHODS:
        return True
    text = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    return key.matches(APIKey.presented(text.get("x-api-key"), text.get("authorization")))


def _deny_like(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, GRPC_KEY_REFUSED)

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(
        deny,
        request_deserializer=handler.request_deserializer if handler else None,
        response_serializer=handler.response_serializer if handler else None,
    )
