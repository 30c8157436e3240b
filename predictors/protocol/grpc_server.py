"""The V2 gRPC endpoint: KServe's servicer behind our own front end.

KServe's ``GRPCServer.start`` binds ``[::]`` and fixes its interceptors, so serving on a
chosen host with auth and metrics meant copying that private method. This module owns the
wiring instead (KServe's public servicer and generated registration function, behind the
event loop's own HTTP/2 front end, :mod:`predictors.protocol.grpc_front`, or a ``grpc.aio``
server) and adds what REST already does, so both protocols behave the same:

* ModelInfer on the direct V2 path (:mod:`predictors.protocol.v2`): ``ModelInferRequest`` → the model's
  hooks → ``ModelInferResponse``, no KServe ``InferRequest`` / ``InferResponse`` in between;
* the version check: ``model_version`` in ModelInfer / ModelMetadata / ModelReady must be the
  served version (or empty), else NOT_FOUND, like REST's 404 on ``/versions/{v}``;
* one error mapping (:func:`predictors.protocol.errors.grpc_code`, twin of REST's
  :func:`~predictors.protocol.errors.http_status`): a :class:`~predictors.protocol.errors.ClientError` aborts with
  its own code (``PayloadTooLarge`` → RESOURCE_EXHAUSTED like REST's 413), ModelNotReady → UNAVAILABLE like 503,
  anything unexpected → INTERNAL like 500. It is applied in the servicer, not by interceptors: each ``grpc.aio``
  interceptor is another Python layer on every call, which on a small model costs as much as the prediction.
  ``ModelInfer`` also counts itself in the request metrics;
* metadata carries the served version, as REST's does;
* the repository extension's load / unload answer (KServe 0.21's servicer reads a dict that the
  extension never returns, so both RPCs failed with INTERNAL).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent import futures
from typing import Any, NoReturn

import grpc
from grpc import aio
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from predictors.protocol import observability
from predictors.protocol.auth import APIKey, GRPCAuthInterceptor
from predictors.protocol.errors import ClientError, grpc_code
from predictors.protocol.grpc_front import GRPCFront
from predictors.protocol.lookup import ready_model, served_model
from predictors.protocol.observability import observe_grpc, served_labels, set_traceparent
from predictors.protocol.v2 import encode_grpc, parse_grpc

logger = logging.getLogger(__name__)


async def abort_with_status(context: Any, exc: Exception) -> NoReturn:
    """End the call with the status :func:`grpc_code` gives ``exc`` (INTERNAL hides the details, and is logged)."""
    code = grpc_code(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("gRPC call failed", exc_info=exc)
        await context.abort(code, "Internal server error")
    await context.abort(code, exc.reason if isinstance(exc, ClientError) else str(exc))


def _status_mapped(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def mapped(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await abort_with_status(context, exc)

    return mapped


def _map_errors(cls: type) -> type:
    """Apply :func:`abort_with_status` to every RPC of the service but ``ModelInfer`` (which does it inline)."""
    for name in vars(grpc_predict_v2_pb2_grpc.GRPCInferenceServiceServicer):
        if name[0].isupper() and name != "ModelInfer":
            setattr(cls, name, _status_mapped(getattr(cls, name)))
    return cls


@_map_errors
class ClassifierServicer(InferenceServicer):
    """KServe's servicer with the direct ModelInfer, the served-version check and versioned metadata."""

    def __init__(self, data_plane: DataPlane, repository_extension: ModelRepositoryExtension) -> None:
        super().__init__(data_plane, repository_extension)
        self.data_plane = data_plane
        self.repository_extension = repository_extension

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        served_model(self.data_plane.model_registry, request.name, request.version or None)
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        served_model(self.data_plane.model_registry, request.name, request.version or None)
        response = await super().ModelMetadata(request, context)
        metadata = await self.data_plane.model_metadata(request.name)
        response.versions.extend(metadata.get("versions") or [])
        return with_properties(response, metadata.get("properties") or {})

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        start = time.perf_counter()
        code = "OK"
        if observability.logs_requests():
            set_traceparent(dict(context.invocation_metadata() or ()).get("traceparent"))
        try:
            model = ready_model(self.data_plane.model_registry, request.model_name, request.model_version or None)
            return encode_grpc(await model.infer(parse_grpc(request)))
        except Exception as exc:
            code = grpc_code(exc).name
            await abort_with_status(context, exc)
        finally:
            served = self.data_plane.model_registry.get_model(request.model_name)
            observe_grpc(*served_labels(request.model_name, served), code, time.perf_counter() - start)


    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        await self.repository_extension.load(request.model_name)
        return pb.RepositoryModelLoadResponse(model_name=request.model_name, isLoaded=True)

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        await self.repository_extension.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse(model_name=request.model_name, isUnloaded=True)


class GRPCEndpoint:
    """:class:`ClassifierServicer` on ``host:port`` behind the chosen front end: ``grpc.aio`` (with the API key as
    an interceptor) or :class:`~predictors.protocol.grpc_front.GRPCFront` (``asyncio``)."""

    def __init__(self, host: str, port: int, data_plane: DataPlane, repository: ModelRepositoryExtension,
                 api_key: APIKey | None, *, front: str, max_workers: int, max_send_bytes: int,
                 max_receive_bytes: int, grace_period: float) -> None:
        self._servicer = ClassifierServicer(data_plane, repository)
        self._api_key = api_key
        self._front_name = front
        self._host, self._port = host, port
        self._max_send_bytes, self._max_receive_bytes = max_send_bytes, max_receive_bytes
        self._front: GRPCFront | None = None
        self._stopped: asyncio.Event | None = None
        self._options = [("grpc.max_send_message_length", max_send_bytes),
                         ("grpc.max_receive_message_length", max_receive_bytes)]
        self._max_workers = max_workers
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._grace_period = grace_period
        self._server: aio.Server | None = None

    async def serve(self) -> None:
        """Serve until :meth:`stop` (the server is built here: ``grpc.aio`` binds to the running loop)."""
        if self._front_name == "asyncio":
            await self._serve_asyncio()
            return
        interceptors = () if self._api_key is None else (GRPCAuthInterceptor(self._api_key),)
        self._server = aio.server(futures.ThreadPoolExecutor(max_workers=self._max_workers),
                                  interceptors=interceptors, options=self._options)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self._servicer, self._server)
        self._server.add_insecure_port(self._address)
        await self._server.start()
        logger.info("gRPC server (grpcio front end) listening on %s", self._address)
        await self._server.wait_for_termination()

    async def _serve_asyncio(self) -> None:
        self._stopped = asyncio.Event()
        self._front = GRPCFront(self._servicer, key=self._api_key, max_receive_bytes=self._max_receive_bytes,
                                max_send_bytes=self._max_send_bytes)
        await self._front.start(self._host, self._port)
        logger.info("gRPC server (asyncio front end) listening on %s", self._address)
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting; calls in flight get ``grace_period`` seconds to finish."""
        if self._server is not None:
            await self._server.stop(grace=self._grace_period)
        if self._front is not None:
            await self._front.stop(self._grace_period)
        if self._stopped is not None:
            self._stopped.set()


def with_properties(response: pb.ModelMetadataResponse, properties: dict[str, str]) -> pb.ModelMetadataResponse:
    """The response with the Open Inference Protocol's ``properties`` map (field 6), which KServe's generated
    message lacks: the entries are appended in protobuf's wire format, kept as fields the message does not
    know, and sent to the client as they are."""
    if not properties:
        return response
    encoded = bytearray(response.SerializeToString())
    for key, value in properties.items():
        entry = _length_delimited(1, key.encode()) + _length_delimited(2, str(value).encode())
        encoded += _length_delimited(6, entry)
    return pb.ModelMetadataResponse.FromString(bytes(encoded))


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
