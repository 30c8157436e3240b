"""The one ASGI middleware in front of every REST route: body limit, API key, request metrics.

These were three middlewares (plus KServe's timing middleware), each another coroutine layer,
``receive``/``send`` wrapper and header scan per request; on a 100 µs model that overhead is
the request. One pass over the headers here serves all three concerns:

* **body limit**: bodies over ``max_body_bytes`` get 413, by ``Content-Length`` up front or
  while streaming (a chunked body is counted as it arrives);
* **API key** (when configured): 401 unless the path is open (health, readiness, the UI shell,
  and — unless ``metrics_auth`` — ``/metrics`` and ``/openapi.json``, so Prometheus scrapes
  without app credentials) or the request presents the key (:class:`predictors.protocol.auth.APIKey`);
* **metrics**: every ``/infer`` request is counted by model and status, whatever its outcome,
  including the ones refused here (:mod:`predictors.protocol.observability`).

``POST .../infer`` then goes to :class:`predictors.protocol.rest.InferEndpoint` (the direct V2 path),
everything else to the FastAPI app.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from predictors.protocol.auth import OPEN_REST_PATHS, APIKey
from predictors.protocol.observability import INFER_PATH, observe_rest
from predictors.protocol.rest import InferEndpoint

METRICS_PATHS = frozenset({"/metrics", "/openapi.json", "/docs"})
"""Open without a key by default (Prometheus compatibility); ``metrics_auth`` closes them."""


class _TooLarge(Exception):
    pass


class ServingMiddleware:
    """Body limit, API key and request metrics in one ASGI layer (see the module docstring)."""

    def __init__(self, app: Callable[..., Awaitable[None]], *, max_body_bytes: int, key: APIKey | None = None,
                 metrics_auth: bool = False, infer: InferEndpoint | None = None) -> None:
        self.app = app
        self.infer = infer
        self.max_body_bytes = max_body_bytes
        self.key = key
        self.metrics_auth = metrics_auth

    def needs_key(self, path: str) -> bool:
        if self.key is None:
            return False
        if self.metrics_auth and path in METRICS_PATHS:
            return True
        return OPEN_REST_PATHS.match(path) is None

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        infer = INFER_PATH.match(scope["path"])
        if infer is None:
            await self._serve(scope, receive, send, self.app)
            return
        start = time.perf_counter()
        status = 500

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        app = self.app
        if self.infer is not None and scope["method"] == "POST":
            endpoint, model, version = self.infer, infer["model"], infer["version"]

            async def app(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
                await endpoint(scope, receive, send, model, version)

        try:
            await self._serve(scope, receive, observed_send, app)
        finally:
            observe_rest(infer["model"], status, time.perf_counter() - start)

    async def _serve(self, scope: dict[str, Any], receive: Callable, send: Callable, app: Callable) -> None:
        length = x_api_key = authorization = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"x-api-key":
                x_api_key = value.decode("latin-1")
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        limit = self.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(send, 413, f"request body of {int(length)} bytes exceeds the {limit}-byte limit")
            return
        if self.needs_key(scope["path"]) and not self.key.matches(APIKey.presented(x_api_key, authorization)):
            await send_error(send, 401, "missing or invalid API key: send it in the X-API-Key header",
                             [(b"www-authenticate", b"ApiKey")])
            return
        if length is not None and length.isdigit():  # within the limit, and the server reads no more than declared
            await app(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await send_error(send, 413, f"request body exceeds the {limit}-byte limit")


async def send_error(send: Callable, status: int, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An ``{"error": message}`` JSON response straight onto the ASGI ``send`` channel."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": orjson.dumps({"error": message})})
