"""The one ASGI middleware in front of every REST route: body limit, API key, request metrics.

Three separate middlewares would each add a coroutine layer, a ``receive``/``send`` wrapper and
a header scan to every request; for a model that answers in microseconds that overhead is most
of the request. One pass over the headers here serves all three concerns:

* **body limit**: bodies over ``max_body_bytes`` get 413, by ``Content-Length`` up front or
  while streaming (a chunked body is counted as it arrives, and read whole before the app runs);
* **API key** (when configured): 401 unless the path is open (health, readiness, the UI shell,
  and — unless ``metrics_auth`` — ``/metrics`` and ``/openapi.json``, so Prometheus scrapes
  without app credentials) or the request presents the key (:class:`predictors.protocol.auth.APIKey`);
* **metrics**: every ``/infer`` request is counted by model and status, whatever its outcome,
  including the ones refused here (:mod:`predictors.protocol.observability`); a name that is not served,
  or a request without the key, is counted under a fixed label, so clients cannot add series.

``POST .../infer`` then goes to :class:`predictors.protocol.rest.InferEndpoint` (the direct V2 path),
everything else to the FastAPI app.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from predictors.protocol.auth import OPEN_REST_PATHS, APIKey
from predictors.protocol.observability import (
    INFER_PATH,
    UNAUTHENTICATED_LABEL,
    observe_rest,
    served_labels,
    set_traceparent,
)
from predictors.protocol.rest import InferEndpoint

METRICS_PATHS = frozenset({"/metrics", "/openapi.json", "/docs"})
"""Open without a key by default (Prometheus compatibility); ``metrics_auth`` closes them."""


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
        reads_own_body = False
        if self.infer is not None and scope["method"] == "POST":
            endpoint, model, version = self.infer, infer["model"], infer["version"]
            reads_own_body = True  # InferEndpoint counts a chunked body against the same limit as it arrives

            async def app(scope: dict[str, Any], receive: Callable, send: Callable) -> None:
                await endpoint(scope, receive, send, model, version)

        try:
            await self._serve(scope, receive, observed_send, app, reads_own_body)
        finally:
            observe_rest(*self._labels(infer["model"], status), status, time.perf_counter() - start)

    def _labels(self, model: str, status: int) -> tuple[str, str]:
        """The model and version labels for a request naming ``model``: the name only when that model is served
        and the client was let in, so neither random names nor requests without the key add series."""
        if status == 401:
            return UNAUTHENTICATED_LABEL, ""
        registry = self.infer.registry if self.infer is not None else None
        return served_labels(model, None if registry is None else registry.get_model(model))

    async def _serve(self, scope: dict[str, Any], receive: Callable, send: Callable, app: Callable,
                     reads_own_body: bool = False) -> None:
        length = x_api_key = authorization = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"x-api-key":  # as UTF-8, the key's own encoding: latin-1 would never match a non-ASCII key
                x_api_key = value.decode("utf-8", "surrogateescape")
            elif name == b"authorization":
                authorization = value.decode("utf-8", "surrogateescape")
            elif name == b"traceparent":
                set_traceparent(value)
        limit = self.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            await send_error(send, 413, f"request body of {int(length)} bytes exceeds the {limit}-byte limit")
            return
        if self.needs_key(scope["path"]) and not self.key.matches(APIKey.presented(x_api_key, authorization)):
            await send_error(send, 401, "missing or invalid API key: send it in the X-API-Key header",
                             [(b"www-authenticate", b"ApiKey")])
            return
        if (length is not None and length.isdigit()) or reads_own_body:
            # within the limit, and the server reads no more than declared; or the endpoint applies the limit
            await app(scope, receive, send)
            return
        # A body of unknown length (chunked) is read here, up to the limit, before the app sees any of it: an
        # app that hit the limit halfway through reading would answer the error as a 500 of its own.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await send_error(send, 413, f"request body exceeds the {limit}-byte limit")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, replay, send)


async def send_error(send: Callable, status: int, message: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """An ``{"error": message}`` JSON response straight onto the ASGI ``send`` channel."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *(headers or [])]})
    await send({"type": "http.response.body", "body": orjson.dumps({"error": message})})
