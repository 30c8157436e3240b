"""REST specifics on top of KServe's FastAPI app: error mapping and the V2 infer route.

KServe's own ``/infer`` route lets FastAPI parse the body, so malformed JSON becomes a 422
with FastAPI's ``detail`` shape and a missing key in a binary request a 500. Our route is
registered first (Starlette matches routes in order) and parses with
:func:`predictors.codecs.parse_rest_request`, so every bad request is a 4xx ``{"error"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.v2_endpoints import V2Endpoints
from starlette.exceptions import HTTPException as StarletteHTTPException

from predictors.codecs import parse_rest_request
from predictors.errors import ClientError, PayloadTooLarge, UnknownModel


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
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse(status_code=400, content={"error": f"invalid request: {where}: {first.get('msg')}"})

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)

    app.add_exception_handler(ClientError, client_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def served_model(dataplane: DataPlane, model_name: str, model_version: str | None) -> Any:
    """The served model named, or 404 (:class:`UnknownModel`) if it is not served or not at ``model_version``."""
    model = dataplane.model_registry.get_model(model_name)
    if model is None:
        raise UnknownModel(model_name)
    config = getattr(model, "config", None)
    if model_version is not None and (config is None or model_version != config.version):
        raise UnknownModel(f"{model_name} version {model_version}")
    return model


def register_version_routes(app: FastAPI, endpoints: V2Endpoints) -> None:
    """``GET /v2/models/{name}/versions/{version}[/ready]``: like the unversioned routes for the served
    version, 404 for any other (KServe answers 501 "Model versioning not supported yet")."""

    async def metadata(model_name: str, model_version: str) -> Any:
        served_model(endpoints.dataplane, model_name, model_version)
        return await endpoints.model_metadata(model_name)

    async def ready(model_name: str, model_version: str) -> Any:
        served_model(endpoints.dataplane, model_name, model_version)
        return await endpoints.model_ready(model_name)

    app.add_api_route("/v2/models/{model_name}/versions/{model_version}", metadata, methods=["GET"], tags=["V2"])
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/ready", ready, methods=["GET"], tags=["V2"])


def register_infer_route(app: FastAPI, dataplane: DataPlane, max_body_bytes: int) -> None:
    """``POST /v2/models/{name}[/versions/{version}]/infer`` with strict parsing."""

    async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
        served_model(dataplane, model_name, model_version)
        if not await dataplane.model_ready(model_name, True):
            raise ModelNotReady(model_name)
        body = await request.body()
        if len(body) > max_body_bytes:
            raise PayloadTooLarge(f"request body exceeds the {max_body_bytes}-byte limit")
        headers = {k.lower(): v for k, v in request.headers.items()}
        infer_request = parse_rest_request(body, headers, model_name)
        response, response_headers = await dataplane.infer(model_name, infer_request, headers)
        encoded, extra_headers = dataplane.encode(model_name, response, headers, {})
        out_headers = {k: v for k, v in {**response_headers, **extra_headers}.items()
                       if k.lower() not in ("content-length", "content-type")}
        if isinstance(encoded, bytes):
            return Response(content=encoded, media_type="application/octet-stream", headers=out_headers)
        return Response(content=orjson.dumps(encoded, option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json", headers=out_headers)

    app.add_api_route("/v2/models/{model_name}/infer", infer, methods=["POST"], tags=["V2"])
    app.add_api_route("/v2/models/{model_name}/versions/{model_version}/infer", infer, methods=["POST"], tags=["V2"])


__all__ = ["INFERENCE_CONTENT_LENGTH_HEADER", "JSONErrorRoute", "client_error_response",
           "install_error_handlers", "register_infer_route", "register_version_routes", "served_model"]
