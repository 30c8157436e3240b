"""API-key authentication for REST (ASGI middleware) and gRPC (server interceptor).

When a key is configured, every inference, metadata, repository and feedback endpoint
requires it: ``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` over REST,
``authorization: Bearer <key>`` or ``x-api-key`` metadata over gRPC. Health endpoints
stay open for Kubernetes probes, as do ``/metrics`` (Prometheus scrapes without app
credentials) and the static UI shell (it asks for the key itself). Keys are compared
with :func:`hmac.compare_digest` so the comparison time does not leak the key.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import orjson
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


class RESTAuthMiddleware:
    """ASGI middleware: 401 with a JSON error unless the path is open or the key matches."""

    def __init__(self, app: Callable[..., Awaitable[None]], key: APIKey) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or OPEN_REST_PATHS.match(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.key.matches(APIKey.presented(headers.get("x-api-key"), headers.get("authorization"))):
            await self.app(scope, receive, send)
            return
        body = orjson.dumps({"error": "missing or invalid API key: send it in the X-API-Key header"})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"ApiKey")]})
        await send({"type": "http.response.body", "body": body})


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
