"""REST specifics on top of KServe's FastAPI app: error mapping, version routes and the V2 infer endpoint.

``/infer`` is not a FastAPI route: :class:`InferEndpoint` is a bare ASGI handler that
:class:`~predictors.protocol.middleware.ServingMiddleware` calls for it, the direct V2 path of
:mod:`predictors.protocol.v2` (body bytes → model hooks → response bytes). FastAPI's routing,
request object and response class cost more than a small model's prediction, and KServe's
own route lets FastAPI parse the body (malformed JSON would be a 422 with FastAPI's
``detail``, a missing key in a binary request a 500); here every bad request is a 4xx ``{"error"}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.rest.v2_endpoints import V2Endpoints
from starlette.exceptions import HTTPException as StarletteHTTPException

from predictors.protocol.errors import ClientError, PayloadTooLarge, http_status
from predictors.protocol.lookup import ModelRegistry, ready_model, served_model
from predictors.protocol.v2 import BINARY_HEADER, MAX_JSON_VALUES, encode_rest, parse_rest
from predictors.protocol.vocabulary import describe_validation_errors

logger = logging.getLogger(__name__)

PARSE_INLINE_BYTES = 256 * 1024
"""Bodies up to this size are parsed on the event loop: for them a thread hop would cost more than the parse."""
JSON_HEADERS = [(b"content-type", b"application/json")]
BINARY_HEADERS = [(b"content-type", b"application/octet-stream")]


INTERNAL_ERROR = "internal server error"
"""The whole body of a 500: exception text names hosts, users, paths and code, and is logged instead."""


def error_message(exc: BaseException, status: int, model_name: str | None = None) -> str:
    """What a client is told about ``exc``: its reason below 500 and for 503 (a model not ready); for a
    server fault only that there was one, the details going to the log."""
    if isinstance(exc, ClientError):
        return exc.reason
    if isinstance(exc, ModelNotReady):
        return str(exc)
    if status < 500:
        return str(exc) or type(exc).__name__
    logger.error("request for model %s failed", model_name, exc_info=exc)
    return INTERNAL_ERROR


def install_internal_error_handlers(app: FastAPI) -> None:
    """Answer unexpected exceptions with :data:`INTERNAL_ERROR`; KServe's handlers put ``str(exc)`` (and for
    ``InferenceError`` the user code's message) in the body. Called after KServe has added its handlers."""

    async def internal(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": INTERNAL_ERROR}, status_code=500)

    app.add_exception_handler(Exception, internal)
    app.add_exception_handler(InferenceError, internal)


def client_error_response(exc: ClientError) -> JSONResponse:
    """The one ``{"error": ...}`` body and status for a :class:`ClientError`, app- or route-level."""
    return JSONResponse({"error": exc.reason}, status_code=int(exc.status))


class JSONErrorRoute(APIRoute):
    """Answers client errors (ours and KServe's) as ``{"error": ...}`` with their status.

    Done in the route rather than by an app exception handler so a router behaves the same in
    whatever app mounts it (the feedback and UI routers are mounted into KServe's app).
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientError as exc:
                return client_error_response(exc)
            except ModelNotFound as exc:
                return JSONResponse({"error": str(exc)}, status_code=404)
            except InvalidInput as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except ModelNotReady as exc:
                return JSONResponse({"error": str(exc)}, status_code=503)

        return handle


def install_error_handlers(app: FastAPI) -> None:
    """Map our errors and FastAPI's own 404/405/422 to ``{"error": ...}`` bodies."""

    async def client_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ClientError)
        return client_error_response(exc)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return JSONResponse(status_code=400,
                            content={"error": f"invalid request: {describe_validation_errors(exc.errors())}"})

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)

    app.add_exception_handler(ClientError, client_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def register_version_routes(app: FastAPI, endpoints: V2Endpoints) -> None:
    """``GET /v2/models/{name}[/versions/{version}][/ready]``: the versioned routes answer like the unversioned
    ones for the served version, 404 for any other (KServe answers 501 "Model versioning not supported yet").
    Metadata is the data plane's own, ``properties`` included (KServe's response model drops that field)."""

    async def metadata(model_name: str, model_version: str | None = None) -> Any:
        served_model(endpoints.dataplane.model_registry, model_name, model_version)
        return await endpoints.dataplane.model_metadata(model_name)

    async def ready(model_name: str, model_version: str) -> Any:
        served_model(endpoints.dataplane.model_registry, model_name, model_version)
        return await endpoints.model_ready(model_name)

    app.add_api_route("/v2/models/{model_name}", metadata, methods=["GET"], tags=["V2"])
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}", metadata, methods=["GET"], tags=["V2"])
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/ready", ready, methods=["GET"], tags=["V2"])


class InferEndpoint:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` as a bare ASGI handler (see the module docstring).

    The body limit is :class:`~predictors.protocol.middleware.ServingMiddleware`'s (it refuses a declared
    ``Content-Length`` over the limit before calling here); a chunked body is counted as it arrives.
    """

    def __init__(self, registry: ModelRegistry, max_body_bytes: int, max_json_values: int = MAX_JSON_VALUES) -> None:
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.max_json_values = max_json_values

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable, model_name: str,
                       model_version: str | None) -> None:
        try:
            model = ready_model(self.registry, model_name, model_version)
            body = await self._read_body(receive)
            json_length = None
            for name, value in scope["headers"]:
                if name == b"inference-header-content-length":
                    json_length = value.decode("latin-1")
            if len(body) > PARSE_INLINE_BYTES:  # a big body is parsed beside the event loop, which keeps answering
                request = await asyncio.to_thread(parse_rest, body, json_length, model_name, self.max_json_values)
            else:
                request = parse_rest(body, json_length, model_name, self.max_json_values)
            response = await model.infer(request)
            payload, json_size = encode_rest(response)
        except Exception as exc:
            status = http_status(exc)
            payload, json_size, status = orjson.dumps({"error": error_message(exc, status, model_name)}), None, status
            headers = JSON_HEADERS
        else:
            status = 200
            headers = JSON_HEADERS if json_size is None else [
                *BINARY_HEADERS, (BINARY_HEADER.encode(), str(json_size).encode())]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    async def _read_body(self, receive: Callable) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"request body exceeds the {self.max_body_bytes}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ClientDisconnected(ClientError):
    """The client went away before sending its whole body; nothing is answered."""


__all__ = ["INFERENCE_CONTENT_LENGTH_HEADER", "INTERNAL_ERROR", "InferEndpoint", "JSONErrorRoute",
           "client_error_response", "error_message", "install_error_handlers", "install_internal_error_handlers",
           "register_version_routes"]
