"""API-key authentication: the key check, and the gRPC interceptor (REST: :mod:`predictors.middleware`).

When a key is configured, every inference, metadata, repository and feedback endpoint
requires it: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` over REST,
``authorization: Bearer <key>`` or ``x-api-key`` metadata over gRPC. Health endpoints
stay open for Kubernetes probes, as do ``/metrics`` and ``/openapi.json`` (Prometheus scrapes
without app credentials; ``--metrics-auth`` closes them) and the static UI shell (it asks for
the key itself). Keys are compared
with :func:`hmac.compare_digest` so the comparison time does not leak the key.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import Any

import grpc
from grpc.aio import ServerInterceptor

OPEN_REST_PATHS = re.compile(
    r"^(/|/metrics|/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready|/ui(/.*)?|/docs|/openapi\.json)$"
)
OPEN_GRPC_METHODS = frozenset({
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/ModelReady",
})


class APIKey:
    """A configured key and the constant-time check against what a client presented."""

    def __init__(self, key: str) -> None:
        self._key = key.encode("utf-8")

    def matches(self, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), self._key)

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
        if handler_call_details.method in OPEN_GRPC_METHODS:
            return await continuation(handler_call_details)
        metadata = {k.lower(): v for k, v in (handler_call_details.invocation_metadata or ())
                    if isinstance(v, str)}
        if self.key.matches(APIKey.presented(metadata.get("x-api-key"), metadata.get("authorization"))):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny_like(handler)


def _deny_like(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid API key: send 'authorization: Bearer <key>' metadata")

    if handler is not None and handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(
        deny,
        request_deserializer=handler.request_deserializer if handler else None,
        response_serializer=handler.response_serializer if handler else None,
    )
