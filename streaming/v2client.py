"""Async V2 inference client (gRPC by default, REST selectable) with retry and backoff.

Only the Open Inference Protocol is spoken here -- no import of ``predictors`` -- so the bridge
works against any V2 server (this project's, Triton, MLServer).

Errors are sorted by what the bridge should do about them:

* **outage** (connection refused, gRPC ``UNAVAILABLE``, HTTP 502/503/504/408/429, connect timeouts):
  retried with exponential backoff until the message's deadline. The request is fine; the server is
  not there. The bridge keeps its place until it comes back or the deadline passes.
* **timeout** (gRPC ``DEADLINE_EXCEEDED``, an HTTP read/write timeout): retried
  ``max_timeout_retries`` times, then given up. The server is there but this call does not finish
  in time (say, an image URL on a slow host); retrying it forever would stall its partition.
* **too-large** (gRPC ``RESOURCE_EXHAUSTED``, HTTP 413): never retried. Told apart by the code
  alone, never by the message text: gRPC's own size refusal and a V2 server's "batch over this model's
  limit" both answer ``RESOURCE_EXHAUSTED``, and an overloaded server answers ``UNAVAILABLE`` (the
  gRPC twin of HTTP 429/503). The bridge splits a merged call that gets it and dead-letters a
  request too big on its own.
* **server error** (HTTP 500, gRPC ``INTERNAL``/``UNKNOWN``): retried ``max_server_error_retries``
  times, then given up. A healthy server answering 500 to one request repeatedly is a poison
  message, and must not block its partition for ever.
* **unauthorized** (HTTP 401/403, gRPC ``UNAUTHENTICATED``/``PERMISSION_DENIED``): retried like an
  outage, until the message's deadline. A wrong or missing API key is the deployment's fault, not the message's; dead-
  lettering every message until someone fixes the Secret would empty the topic into the DLQ.
* **rejected** (other 4xx: ``INVALID_ARGUMENT``, ``NOT_FOUND``...): never retried; the bridge
  dead-letters the message with the server's reason. Under per-model routing, a model name whose
  host does not resolve (the resolver's "no such name", checked ``route_checks`` times) is rejected
  as 404 too: no InferenceService of that name exists, and waiting would not make one.
* **deadline**: the message's overall deadline passed while its call was still being retried.

Every message carries a deadline (:meth:`V2Client.infer`'s ``deadline``): each try's timeout is cut
to what is left of it, and no error is retried past it.

gRPC stubs come from ``streaming.v2_grpc`` (committed, generated from the spec's proto).
REST sends BYTES tensors with the V2 binary-data extension (``Inference-Header-Content-Length``),
the encoding KServe, Triton and MLServer share for raw bytes in a REST body.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import grpc
import httpx
import numpy as np
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential

from streaming.logs import TRACEPARENT, TRACEPARENT_HEADER
from streaming.retrying import HalfJitterBackoff, retry_after
from streaming.settings import V2ClientSettings
from streaming.tensors import (
    CONTENTS_FIELD,
    DATATYPES,
    NUMPY,
    InferRequest,
    InferResponse,
    Tensor,
    bytes_elements,
    deserialize_bytes,
    flatten,
    serialize_bytes,
)
from streaming.v2_grpc import pb2, pb2_grpc

WIRE_SIZE = "binary_data_size"
MODEL_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


class V2Error(Exception):
    """A failed V2 call: ``kind`` is outage, unauthorized, server-error or rejected; ``status`` is HTTP-like."""

    def __init__(self, kind: str, status: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def http_error_kind(status: int) -> str:
    if status == 413:
        return "too-large"
    if status in (408, 429, 502, 503, 504):
        return "outage"
    if status in (401, 403):
        return "unauthorized"
    if status >= 500:
        return "server-error"
    return "rejected"


_GRPC_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: ("rejected", 400), grpc.StatusCode.NOT_FOUND: ("rejected", 404),
    grpc.StatusCode.UNAUTHENTICATED: ("unauthorized", 401), grpc.StatusCode.PERMISSION_DENIED: ("unauthorized", 403),
    grpc.StatusCode.FAILED_PRECONDITION: ("rejected", 400), grpc.StatusCode.OUT_OF_RANGE: ("rejected", 400),
    grpc.StatusCode.ALREADY_EXISTS: ("rejected", 409), grpc.StatusCode.UNIMPLEMENTED: ("rejected", 501),
    grpc.StatusCode.UNAVAILABLE: ("outage", 503), grpc.StatusCode.DEADLINE_EXCEEDED: ("timeout", 504),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("too-large", 413), grpc.StatusCode.CANCELLED: ("outage", 499),
    grpc.StatusCode.ABORTED: ("outage", 409), grpc.StatusCode.INTERNAL: ("server-error", 500),
    grpc.StatusCode.UNKNOWN: ("server-error", 500), grpc.StatusCode.DATA_LOSS: ("server-error", 500),
}
# The resolver's "this name does not exist" (NXDOMAIN), as opposed to "cannot ask right now" (EAI_AGAIN).
NO_SUCH_HOST = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})
LIMIT_KEYS = ("max_batch_size",)  # where a V2 server may publish a model's row limit in its metadata


def grpc_error(exc: grpc.aio.AioRpcError) -> V2Error:
    """Classify a failed gRPC call by its status code alone (see the module docstring)."""
    details = exc.details() or ""
    kind, status = _GRPC_STATUS.get(exc.code(), ("server-error", 500))
    return V2Error(kind, status, f"gRPC {exc.code().name}: {details}")


class Transport(Protocol):
    async def infer(self, request: InferRequest, timeout_s: float | None = None) -> InferResponse: ...

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]: ...

    async def close(self) -> None: ...


# --- tensor encodings ----------------------------------------------------------------------


def _raw_bytes(tensor: Tensor) -> bytes:
    """A BYTES input in the raw encoding; an element that is neither text nor bytes is the client's fault."""
    try:
        return serialize_bytes(bytes_elements(tensor.data))
    except TypeError as exc:
        raise V2Error("rejected", 400, f"input {tensor.name!r}: {exc}") from exc


def to_array(tensor: Tensor) -> np.ndarray:
    """A numeric tensor as a little-endian numpy array; bad data is the client's fault (400)."""
    dtype = NUMPY.get(tensor.datatype)
    if dtype is None:
        raise V2Error("rejected", 400, f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r}")
    try:
        arr = np.asarray(tensor.data)
        if arr.dtype.kind not in "biuf" or (tensor.datatype.startswith(("INT", "UINT")) and arr.dtype.kind == "f"):
            raise TypeError(f"elements of kind {arr.dtype.kind!r}")
        return arr.astype(dtype, casting="unsafe")
    except (TypeError, ValueError) as exc:
        raise V2Error("rejected", 400, f"input {tensor.name!r}: data is not {tensor.datatype}: {exc}") from exc


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    if datatype == "BYTES":
        try:
            data: list[Any] = list(deserialize_bytes(raw))
        except ValueError as exc:
            raise V2Error("server-error", 500, f"output {name!r}: {exc} in response") from exc
    else:
        dtype = NUMPY.get(datatype)
        if dtype is None:
            raise V2Error("server-error", 500, f"output {name!r}: unsupported datatype {datatype!r}")
        data = np.frombuffer(raw, dtype=dtype).tolist()
    return Tensor(name, datatype, shape, data)


def _param_to_grpc(value: Any) -> pb2.InferParameter:
    if isinstance(value, bool):
        return pb2.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb2.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb2.InferParameter(double_param=value)
    return pb2.InferParameter(string_param=value if isinstance(value, str) else json.dumps(value))


def _param_from_grpc(p: pb2.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def to_grpc(request: InferRequest) -> pb2.ModelInferRequest:
    """Build a ModelInferRequest carrying every input as raw_input_contents (compact, handles FP16)."""
    msg = pb2.ModelInferRequest(model_name=request.model_name, model_version=request.model_version or "",
                                id=request.id)
    for k, v in request.parameters.items():
        msg.parameters[k].CopyFrom(_param_to_grpc(v))
    for t in request.inputs:
        if t.datatype not in DATATYPES:
            raise V2Error("rejected", 400, f"input {t.name!r}: unsupported datatype {t.datatype!r}")
        tensor = msg.inputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        for k, v in t.parameters.items():
            tensor.parameters[k].CopyFrom(_param_to_grpc(v))
        raw = _raw_bytes(t) if t.datatype == "BYTES" else to_array(t).tobytes()
        msg.raw_input_contents.append(raw)
    for name in request.outputs or []:
        msg.outputs.add(name=name)
    return msg


def from_grpc(msg: pb2.ModelInferResponse) -> InferResponse:
    outputs = []
    for i, o in enumerate(msg.outputs):
        shape = list(o.shape)
        if i < len(msg.raw_output_contents):
            outputs.append(from_raw(o.name, o.datatype, shape, msg.raw_output_contents[i]))
        else:
            field_name = CONTENTS_FIELD.get(o.datatype)
            data = list(getattr(o.contents, field_name)) if field_name else []
            outputs.append(Tensor(o.name, o.datatype, shape, data))
        # binary_data_size describes the wire encoding of this one reply (REST's binary extension; KServe sets it
        # on gRPC too), not the tensor: carried into a result cut from a merged reply it would be wrong
        outputs[-1].parameters = {k: _param_from_grpc(v) for k, v in o.parameters.items() if k != WIRE_SIZE}
    return InferResponse(msg.model_name, outputs, id=msg.id, model_version=msg.model_version or None,
                         parameters={k: _param_from_grpc(v) for k, v in msg.parameters.items()})


def to_rest(request: InferRequest) -> tuple[bytes, dict[str, str]]:
    """JSON body, plus the binary-data extension when any BYTES input holds raw bytes."""
    inputs, binary = [], []
    for t in request.inputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        params = dict(t.parameters)
        if t.datatype == "BYTES" and any(isinstance(v, bytes) for v in t.data):
            raw = _raw_bytes(t)
            params[WIRE_SIZE] = len(raw)
            binary.append(raw)
        elif t.datatype in NUMPY:
            entry["data"] = to_array(t).tolist()
        else:
            entry["data"] = t.data
        if params:
            entry["parameters"] = params
        inputs.append(entry)
    body: dict[str, Any] = {"id": request.id, "inputs": inputs}
    if request.parameters:
        body["parameters"] = request.parameters
    if request.outputs:
        body["outputs"] = [{"name": n} for n in request.outputs]
    head = json.dumps(body, separators=(",", ":")).encode("utf-8")
    if not binary:
        return head, {"content-type": "application/json"}
    return head + b"".join(binary), {"content-type": "application/octet-stream",
                                     "inference-header-content-length": str(len(head))}


def from_rest(doc: Any) -> InferResponse:
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise V2Error("server-error", 500, "response is not a V2 inference response")
    outputs = [Tensor(o["name"], o["datatype"], list(o["shape"]), flatten(o.get("data", [])),
                      dict(o.get("parameters") or {})) for o in doc["outputs"]]
    return InferResponse(doc.get("model_name", ""), outputs, id=str(doc.get("id") or ""),
                         model_version=doc.get("model_version"), parameters=dict(doc.get("parameters") or {}))


# --- transports ----------------------------------------------------------------------------


class GrpcTransport:
    """grpc.aio client on one channel (created lazily, inside the running event loop)."""

    def __init__(self, settings: V2ClientSettings) -> None:
        self.settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb2_grpc.GRPCInferenceServiceStub | None = None
        key = settings.api_key.get_secret_value() if settings.api_key else None
        self._metadata = (("authorization", f"Bearer {key}"),) if key else None

    def _ensure(self) -> pb2_grpc.GRPCInferenceServiceStub:
        if self._stub is None:
            size = self.settings.max_message_bytes
            self._channel = grpc.aio.insecure_channel(self.settings.grpc_target, options=[
                ("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size),
                ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)])
            self._stub = pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def infer(self, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        message = to_grpc(request)
        trace = TRACEPARENT.get()  # the consumed message's trace context
        metadata = self._metadata if trace is None else (*(self._metadata or ()), (TRACEPARENT_HEADER, trace))
        try:
            reply = await self._ensure().ModelInfer(message, timeout=timeout_s or self.settings.timeout_s,
                                                    metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise grpc_error(exc) from exc
        return from_grpc(reply)

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        try:
            reply = await self._ensure().ModelMetadata(pb2.ModelMetadataRequest(name=model, version=version or ""),
                                                       timeout=self.settings.timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise grpc_error(exc) from exc
        return {"name": reply.name, "versions": list(reply.versions), "platform": reply.platform,
                "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in reply.inputs],
                "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in reply.outputs],
                "properties": dict(reply.properties)}

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None


class RestTransport:
    """httpx.AsyncClient against ``POST /v2/models/{model}[/versions/{v}]/infer``."""

    def __init__(self, settings: V2ClientSettings) -> None:
        self.settings = settings
        headers = {"X-API-Key": settings.api_key.get_secret_value()} if settings.api_key else {}
        self._client = httpx.AsyncClient(base_url=settings.rest_url.rstrip("/"), headers=headers,
                                         timeout=settings.timeout_s)

    @staticmethod
    def _path(model: str, version: str | None) -> str:
        return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = await self._client.request(method, path, **kwargs)
        except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise V2Error("outage", 504, f"cannot reach {self.settings.rest_url} in time: {exc!r}") from exc
        except httpx.TimeoutException as exc:  # read/write: the server is there, this call is too slow
            raise V2Error("timeout", 504, f"timeout: {exc!r}") from exc
        except httpx.TransportError as exc:  # connection refused / reset / DNS
            raise V2Error("outage", 503, f"cannot reach {self.settings.rest_url}: {exc!r}") from exc
        if resp.status_code >= 400:
            try:
                detail = resp.json().get("error") or resp.text
            except ValueError:
                detail = resp.text
            raise V2Error(http_error_kind(resp.status_code), resp.status_code, f"HTTP {resp.status_code}: {detail}")
        try:
            return resp.json()
        except ValueError as exc:
            raise V2Error("server-error", 500, f"response is not JSON: {exc}") from exc

    async def infer(self, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        body, headers = to_rest(request)
        trace = TRACEPARENT.get()  # the consumed message's trace context
        if trace is not None:
            headers[TRACEPARENT_HEADER] = trace
        doc = await self._call("POST", self._path(request.model_name, request.model_version) + "/infer",
                               content=body, headers=headers, timeout=timeout_s or self.settings.timeout_s)
        return from_rest(doc)

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return await self._call("GET", self._path(model, version))

    async def close(self) -> None:
        await self._client.aclose()


class PerModelTransport:
    """One transport per model, for targets like ``{model}-predictor.ns.svc:8081``.

    In Kubernetes each model is its own InferenceService with its own address; a target
    (or REST URL) containing ``{model}`` is filled in with the request's model name. Names
    must be DNS labels, so a message cannot steer the bridge to an arbitrary host.

    Model names come from messages, so nothing here grows with them: a name is routed only once its host
    resolves (a name that does not exist is refused as unroutable after ``route_checks`` looks, and the
    refusal remembered for ``unroutable_ttl_s`` in a bounded table), and at most ``max_transports`` are kept,
    the least recently used closed once its calls could have finished.
    """

    def __init__(self, settings: V2ClientSettings) -> None:
        self.settings = settings
        self._transports: OrderedDict[str, GrpcTransport | RestTransport] = OrderedDict()
        self._unroutable: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._retiring: dict[asyncio.Task[None], GrpcTransport | RestTransport] = {}

    def _check_name(self, model: str) -> None:
        if not MODEL_NAME.fullmatch(model):
            raise V2Error("rejected", 400, f"model name '{model}' is not a DNS label; cannot route it")

    def _filled(self, model: str) -> V2ClientSettings:
        s = self.settings
        return s.model_copy(update={"grpc_target": s.grpc_target.replace("{model}", model),
                                    "rest_url": s.rest_url.replace("{model}", model)})

    def _for(self, model: str) -> GrpcTransport | RestTransport:
        transport = self._transports.get(model)
        if transport is not None:
            self._transports.move_to_end(model)
            return transport
        self._check_name(model)
        filled = self._filled(model)
        transport = GrpcTransport(filled) if filled.protocol == "grpc" else RestTransport(filled)
        self._transports[model] = transport
        while len(self._transports) > self.settings.max_transports:
            self._retire(self._transports.popitem(last=False)[1])
        return transport

    def _retire(self, transport: GrpcTransport | RestTransport) -> None:
        """Close an evicted transport once a call started on it could have finished."""
        async def later() -> None:
            await asyncio.sleep(self.settings.timeout_s)
            await transport.close()

        try:
            task = asyncio.get_running_loop().create_task(later())
        except RuntimeError:  # no loop: it never opened a channel, which happens only inside one
            return
        self._retiring[task] = transport
        task.add_done_callback(lambda done: self._retiring.pop(done, None))

    def host(self, model: str) -> tuple[str, int] | None:
        """The host and port ``model`` routes to, or None when the address names no host to look up."""
        filled = self._filled(model)
        if filled.protocol == "rest":
            url = httpx.URL(filled.rest_url)
            return (url.host, url.port or (443 if url.scheme == "https" else 80)) if url.host else None
        target = filled.grpc_target
        for scheme in ("dns:///", "dns:"):
            if target.startswith(scheme):
                target = target[len(scheme):]
                break
        host, _, port = target.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdecimal() or ":" in host or "/" in host:
            return None
        return host, int(port)

    async def _routable(self, model: str) -> None:
        """Raise ``rejected`` (404) when ``model``'s host does not exist; DNS trouble is an outage."""
        self._check_name(model)
        known = self._unroutable.get(model)
        now = time.monotonic()
        if known is not None:
            if known[0] > now:
                raise V2Error("rejected", 404, known[1])
            del self._unroutable[model]
        address = self.host(model)
        if address is None:
            return
        host, port = address
        checks = self.settings.route_checks
        # only "no such name" is asked again (a name being deployed may appear); other resolver trouble is an outage
        lookups = AsyncRetrying(stop=stop_after_attempt(checks), reraise=True,
                                wait=wait_exponential(multiplier=self.settings.retry_initial_s),
                                retry=retry_if_exception(lambda e: isinstance(e, socket.gaierror)
                                                         and e.errno in NO_SUCH_HOST))
        try:
            await lookups(asyncio.get_running_loop().getaddrinfo, host, port, type=socket.SOCK_STREAM)
            return
        except socket.gaierror as exc:
            if exc.errno not in NO_SUCH_HOST:
                raise V2Error("outage", 503, f"cannot resolve {host}: {exc}") from exc
            error = exc
        reason = (f"model '{model}' is not routable: its host {host} does not resolve ({error.strerror}) "
                  f"after {checks} look-up(s); no model server of that name is deployed")
        self._unroutable[model] = (time.monotonic() + self.settings.unroutable_ttl_s, reason)
        while len(self._unroutable) > 4 * self.settings.max_transports:
            self._unroutable.popitem(last=False)
        raise V2Error("rejected", 404, reason)

    async def _route(self, model: str) -> GrpcTransport | RestTransport:
        if model not in self._transports:
            await self._routable(model)
        return self._for(model)

    async def infer(self, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        return await (await self._route(request.model_name)).infer(request, timeout_s)

    async def metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return await (await self._route(model)).metadata(model, version)

    async def close(self) -> None:
        retiring = dict(self._retiring)
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for transport in [*retiring.values(), *self._transports.values()]:
            await transport.close()
        self._transports.clear()


def make_transport(settings: V2ClientSettings) -> GrpcTransport | RestTransport | PerModelTransport:
    address = settings.grpc_target if settings.protocol == "grpc" else settings.rest_url
    if "{model}" in address:
        return PerModelTransport(settings)
    return GrpcTransport(settings) if settings.protocol == "grpc" else RestTransport(settings)


# --- retries -------------------------------------------------------------------------------


class V2Client:
    """A transport plus the retry policy described in the module docstring."""

    def __init__(self, settings: V2ClientSettings | None = None, *, transport: Transport | None = None,
                 on_retry: Callable[[V2Error], None] | None = None) -> None:
        self.settings = settings or V2ClientSettings()
        self.transport: Any = transport or make_transport(self.settings)
        self.on_retry = on_retry
        # (model, version) -> (valid until, row limit, whether the server published it); bounded, LRU
        self._limits: OrderedDict[tuple[str, str | None], tuple[float, int, bool]] = OrderedDict()

    async def infer(self, request: InferRequest, deadline: float | None = None) -> InferResponse:
        """Call the model server, retrying as the module docstring says; ``deadline`` (``time.monotonic()``)
        bounds the whole: each try's timeout is cut to what is left, and nothing is retried past it."""
        s = self.settings
        bounded = {"server-error": s.max_server_error_retries, "timeout": s.max_timeout_retries}
        failures = dict.fromkeys(bounded, 0)
        last: list[V2Error] = []

        def retriable(exc: BaseException) -> bool:
            if not isinstance(exc, V2Error) or exc.kind in ("rejected", "too-large", "deadline"):
                return False
            if exc.kind in bounded:
                failures[exc.kind] += 1
                if failures[exc.kind] > bounded[exc.kind]:
                    return False
            return True

        def retrying(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, V2Error):
                last[:] = [exc]
                if self.on_retry is not None:
                    self.on_retry(exc)

        async def attempt() -> InferResponse:
            timeout = s.timeout_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise V2Error("deadline", 504, "the message's deadline passed before the model server answered"
                                  + (f"; last error: {last[0]}" if last else ""))
                timeout = min(timeout, left)
            return await self.transport.infer(request, timeout)

        try:
            return await attempt()
        except V2Error as exc:
            first = exc
        return await retry_after(first, attempt, AsyncRetrying(
            retry=retry_if_exception(retriable), before_sleep=retrying, reraise=True,
            wait=HalfJitterBackoff(s.retry_initial_s, s.retry_max_s, deadline)))

    async def row_limit(self, model: str, version: str | None = None) -> tuple[int, bool]:
        """The most rows ``model`` takes in one call, and whether the server said so itself.

        Read from the model's V2 metadata (``parameters`` or ``properties``: ``max_batch_size``), trusted for
        ``metadata_ttl_s``; when the server publishes none, or its metadata cannot be read now,
        ``max_batch_rows`` (and an unpublished limit is asked again sooner)."""
        key = (model, version)
        now = time.monotonic()
        cached = self._limits.get(key)
        if cached is not None and cached[0] > now:
            self._limits.move_to_end(key)
            return cached[1], cached[2]
        limit, published = self.settings.max_batch_rows, False
        try:
            doc = await asyncio.wait_for(self.transport.metadata(model, version), self.settings.timeout_s)
        except (V2Error, TimeoutError):
            doc = None
        if isinstance(doc, dict):
            found = published_limit(doc)
            if found is not None:
                limit, published = found, True
        ttl = self.settings.metadata_ttl_s if published else min(self.settings.metadata_ttl_s, 30.0)
        self._limits[key] = (now + ttl, limit, published)
        while len(self._limits) > 256:
            self._limits.popitem(last=False)
        return limit, published

    async def close(self) -> None:
        await self.transport.close()


def published_limit(doc: dict[str, Any]) -> int | None:
    """A model's row limit from its V2 metadata document, if the server published a valid one."""
    for section in ("parameters", "properties"):
        values = doc.get(section)
        if not isinstance(values, dict):
            continue
        for name in LIMIT_KEYS:
            value = values.get(name)
            if isinstance(value, dict):  # gRPC-style parameter object serialised to JSON
                value = next(iter(value.values()), None)
            try:
                limit = int(str(value).strip())
            except (TypeError, ValueError):
                continue
            if limit >= 1:
                return limit
    return None
