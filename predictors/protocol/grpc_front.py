"""The V2 gRPC endpoint on the server's own event loop (the default front end, ``--grpc-front asyncio``).

``grpc.aio`` runs every call through grpc's C core, a poller thread and a wake-up of the event loop, which on a
small model costs more than the model and our whole request path together. This front end reads HTTP/2 on the
loop's own sockets (:mod:`predictors.protocol.http2`), hands each unary call to the same servicer
(:class:`~predictors.protocol.grpc_server.ClassifierServicer`: the same methods, errors and metrics as under
``grpc.aio``) and writes the answer back, with what gRPC over HTTP/2 asks of a server: ``grpc-timeout``
deadlines, cancellation by ``RST_STREAM``, flow control for large answers, message size limits, ``grpc-status`` /
``grpc-message`` trailers, the API key and a graceful ``GOAWAY`` on stop. Only unary calls exist in the V2
service, so only those are served.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc

from predictors.protocol import http2
from predictors.protocol.auth import GRPC_KEY_REFUSED, APIKey, grpc_call_allowed

logger = logging.getLogger(__name__)

MAX_HEADER_LIST_BYTES = 16 * 1024
"""Metadata one call may carry (grpc's own hard limit)."""
MAX_CONCURRENT_STREAMS = 256
"""Calls one connection may have open at once (announced in SETTINGS; streams beyond it are refused)."""
CONNECTION_BUFFER_MESSAGES = 4
"""Request bytes one connection may hold unfinished, in messages of the largest size allowed: a client that opens
many streams and never ends them cannot make the server buffer more than this."""
_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
_OK_TRAILERS = [(b"grpc-status", b"0")]
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_RESERVED = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})


class _Status(Exception):
    """End the call with this status (before or instead of the handler)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CallContext:
    """The part of ``grpc.aio.ServicerContext`` the servicer uses: metadata and ``abort``."""

    def __init__(self, metadata: tuple[tuple[str, str | bytes], ...], peer: str) -> None:
        self._metadata = metadata
        self._peer = peer
        self.status: _Status | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = None) -> None:
        self.status = _Status(code, details)
        raise aio.AbortError()


class _MethodTable:
    """The service's method handlers, collected from grpc's generated registration function (the public
    ``add_generic_rpc_handlers`` / ``add_registered_method_handlers`` seam every grpc server implements)."""

    def __init__(self, servicer: Any) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Every method also arrives through :meth:`add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for name, handler in handlers.items():
            self.handlers[f"/{service}/{name}"] = handler


@dataclass
class _Call:
    path: str
    metadata: tuple[tuple[str, str | bytes], ...]
    deadline: float | None
    """Event-loop time by which the answer is due (from ``grpc-timeout``, counted from the request's headers)."""
    body: bytearray = field(default_factory=bytearray)
    task: asyncio.Task | None = None
    refused: bool = False


class GRPCFront:
    """The listening side: one :class:`GRPCConnection` per client connection."""

    def __init__(self, servicer: Any, *, key: APIKey | None, max_receive_bytes: int, max_send_bytes: int) -> None:
        self.methods = _MethodTable(servicer).handlers
        self.key = key
        self.max_receive_bytes = max_receive_bytes
        self.max_send_bytes = max_send_bytes
        self.connections: set[GRPCConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        # SO_REUSEPORT, as grpc's own servers set it: --workers N processes share the port.
        self._server = await loop.create_server(lambda: GRPCConnection(self), host, port, reuse_port=True)

    async def stop(self, grace: float) -> None:
        """Stop accepting, tell every client with ``GOAWAY``, let calls in flight finish within ``grace``."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.go_away()
        tasks = [t for c in self.connections for t in c.tasks()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for connection in list(self.connections):
            connection.close()


class GRPCConnection(asyncio.Protocol):
    """One HTTP/2 connection: frames in, unary calls to the servicer, answers out."""

    def __init__(self, front: GRPCFront) -> None:
        self.front = front
        self.http2 = http2.ServerConnection(max_concurrent_streams=MAX_CONCURRENT_STREAMS,
                                         max_header_list_size=MAX_HEADER_LIST_BYTES)
        self.calls: dict[int, _Call] = {}
        self.buffered = 0  # bytes of request bodies not yet handed to their call
        self.transport: asyncio.Transport | None = None
        self._window_open: asyncio.Event | None = None
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._peer = ""

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = f"ipv4:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self.front.connections.add(self)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.front.connections.discard(self)
        for call in self.calls.values():
            if call.task is not None:
                call.task.cancel()
        self.calls.clear()
        if self._window_open is not None:
            self._window_open.set()

    def pause_writing(self) -> None:
        """More unsent bytes than the transport's high-water mark: read nothing more from this client until they
        drain. A client that sends (PINGs, say) without reading the answers then stalls on its own sends instead
        of the server buffering for it without bound."""
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def tasks(self) -> list[asyncio.Task]:
        return [c.task for c in self.calls.values() if c.task is not None and not c.task.done()]

    def go_away(self) -> None:
        self.http2.close()
        self._flush()

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.http2.receive(data)
        except http2.ConnectionError as exc:  # the client broke HTTP/2: the GOAWAY is queued
            logger.debug("gRPC connection from %s closed: %s", self._peer, exc)
            self.close()
            return
        for event in events:
            if isinstance(event, http2.DataReceived):
                self._body(event.stream_id, event.data)
                if event.ended:
                    self._dispatch(event.stream_id)
            elif isinstance(event, http2.RequestReceived):
                self._begin(event.stream_id, event.headers)
                if event.ended:
                    self._dispatch(event.stream_id)
            elif isinstance(event, http2.StreamReset):
                call = self.calls.pop(event.stream_id, None)
                if call is not None:
                    self._release(call)
                    if call.task is not None:
                        call.task.cancel()
            elif isinstance(event, http2.WindowOpened):
                if self._window_open is not None:
                    self._window_open.set()
            elif isinstance(event, http2.ClientGoingAway):
                self.close()
        self._flush_soon()

    def _flush(self) -> None:
        """Write what the connection has queued now."""
        self._flush_scheduled = False
        out = self.http2.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def _flush_soon(self) -> None:
        """Write what the connection has queued once this turn of the event loop is over, when other calls on
        the connection are still running: the answers that complete in one turn then leave in one write (one
        system call, one wake-up of the client) instead of one each. A lone call's answer is written at once."""
        if len(self.calls) <= 1:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    # -- calls -----------------------------------------------------------------------------------

    def _begin(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        pseudo = {k: v for k, v in headers if k.startswith(b":")}
        fields = [(k.decode("latin-1"), v) for k, v in headers if not k.startswith(b":")]
        content_type = next((v for k, v in fields if k == "content-type"), b"")
        if pseudo.get(b":method") != b"POST" or not content_type.startswith(b"application/grpc"):
            self._respond_http(stream_id, b"415" if pseudo.get(b":method") == b"POST" else b"405")
            return
        path = pseudo.get(b":path", b"").decode("latin-1")
        try:
            timeout = _timeout(next((v for k, v in fields if k == "grpc-timeout"), None))
            deadline = None if timeout is None else self._loop.time() + timeout
            encoding = next((v for k, v in fields if k == "grpc-encoding"), b"identity")
            metadata = tuple(_metadata(k, v) for k, v in fields if k not in _RESERVED)
        except _Status as status:
            self.calls[stream_id] = _Call(path, (), None, refused=True)
            self._respond_status(stream_id, status)
            return
        call = _Call(path, metadata, deadline)
        self.calls[stream_id] = call
        if path not in self.front.methods:
            self._refuse(stream_id, call, _Status(grpc.StatusCode.UNIMPLEMENTED, f"Method not found: {path}"))
        elif encoding not in (b"identity", b""):
            self._refuse(stream_id, call, _Status(grpc.StatusCode.UNIMPLEMENTED,
                                                  f"grpc-encoding {encoding.decode('latin-1')} is not supported"))
        elif self.front.key is not None and not grpc_call_allowed(self.front.key, path, metadata):
            self._refuse(stream_id, call, _Status(grpc.StatusCode.UNAUTHENTICATED, GRPC_KEY_REFUSED))

    def _refuse(self, stream_id: int, call: _Call, status: _Status) -> None:
        """Answer at once and ignore the rest of the request (its bytes are still acknowledged)."""
        call.refused = True
        self._release(call)
        self._respond_status(stream_id, status)

    def _release(self, call: _Call) -> None:
        self.buffered -= len(call.body)
        call.body = bytearray()

    def _body(self, stream_id: int, data: bytes) -> None:
        call = self.calls.get(stream_id)
        if call is None or call.refused:
            return
        call.body += data
        self.buffered += len(data)
        if len(call.body) > self.front.max_receive_bytes + 5:
            self._refuse(stream_id, call, _Status(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Received message larger than max ({len(call.body) - 5} vs. {self.front.max_receive_bytes})"))
        elif self.buffered > CONNECTION_BUFFER_MESSAGES * (self.front.max_receive_bytes + 5):
            self._refuse(stream_id, call, _Status(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "this connection holds too many unfinished requests; finish or cancel some first"))

    def _dispatch(self, stream_id: int) -> None:
        call = self.calls.get(stream_id)
        if call is None or call.refused:
            if call is not None:
                self._release(call)
            self.calls.pop(stream_id, None)
            return
        call.task = self._loop.create_task(self._run(stream_id, call))

    async def _run(self, stream_id: int, call: _Call) -> None:
        handler = self.front.methods[call.path]
        context = CallContext(call.metadata, self._peer)
        try:
            body = bytes(call.body)
            self._release(call)
            try:
                request = handler.request_deserializer(_message(body))
            except DecodeError as exc:
                raise _Status(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request is not a valid {call.path.rpartition('/')[2]} "
                              f"request message: {exc}") from exc
            if call.deadline is None:
                response = await handler.unary_unary(request, context)
            else:
                async with asyncio.timeout_at(call.deadline):
                    if call.deadline <= self._loop.time():
                        raise TimeoutError
                    response = await handler.unary_unary(request, context)
            payload = handler.response_serializer(response)
            if len(payload) > self.front.max_send_bytes:
                raise _Status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"Sent message larger than max ({len(payload)} vs. {self.front.max_send_bytes})")
        except aio.AbortError:
            self._respond_status(stream_id, context.status or _Status(grpc.StatusCode.UNKNOWN, ""))
        except _Status as status:
            self._respond_status(stream_id, status)
        except TimeoutError:
            self._respond_status(stream_id, _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the deserializer or the handler failed: the client's fault or ours
            logger.error("gRPC call %s failed", call.path, exc_info=exc)
            self._respond_status(stream_id, _Status(grpc.StatusCode.INTERNAL, "Internal server error"))
        else:
            await self._respond(stream_id, payload)
        finally:
            self.calls.pop(stream_id, None)

    # -- answers ---------------------------------------------------------------------------------

    async def _respond(self, stream_id: int, payload: bytes) -> None:
        framed = b"\x00" + len(payload).to_bytes(4, "big") + payload
        if not self.http2.send_headers(stream_id, _RESPONSE_HEADERS):
            return  # the client reset the stream or went away
        sent = 0
        while sent < len(framed):
            window = self.http2.send_window(stream_id)
            if window <= 0:
                if not self.http2.is_open(stream_id):
                    return
                self._flush()
                await self._wait_for_window()
                continue
            self.http2.send_data(stream_id, framed[sent:sent + window])
            sent += window
        self.http2.send_headers(stream_id, _OK_TRAILERS, end_stream=True)
        self._flush_soon()

    async def _wait_for_window(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._window_open is None:
            self._window_open = asyncio.Event()
        self._window_open.clear()
        await self._window_open.wait()

    def _respond_status(self, stream_id: int, status: _Status) -> None:
        """A trailers-only answer: the status, no message."""
        headers = [*_RESPONSE_HEADERS, (b"grpc-status", str(status.code.value[0]).encode())]
        if status.details:
            headers.append((b"grpc-message", urllib.parse.quote(status.details, safe=" !#$&'()*+,/:;=?@[]~").encode()))
        self.http2.send_headers(stream_id, headers, end_stream=True)
        self._flush()

    def _respond_http(self, stream_id: int, status: bytes) -> None:
        self.calls[stream_id] = _Call("", (), None, refused=True)
        self.http2.send_headers(stream_id, [(b":status", status)], end_stream=True)
        self._flush()


def _message(body: bytes) -> bytes:
    """The one message of a unary request: a 5-byte prefix (compressed flag, length), then the message."""
    if len(body) < 5:
        raise _Status(grpc.StatusCode.INTERNAL, "request has no complete gRPC message")
    if body[0] != 0:
        raise _Status(grpc.StatusCode.INTERNAL, "compressed message without a supported grpc-encoding")
    length = int.from_bytes(body[1:5], "big")
    if length != len(body) - 5:
        raise _Status(grpc.StatusCode.INTERNAL, "request is not exactly one gRPC message")
    return body[5:]


def _timeout(value: bytes | None) -> float | None:
    if value is None:
        return None
    text = value.decode("latin-1")
    if not (2 <= len(text) <= 9) or not text[:-1].isdigit() or text[-1] not in _TIMEOUT_UNITS:
        raise _Status(grpc.StatusCode.INTERNAL, f"malformed grpc-timeout '{text}'")
    return int(text[:-1]) * _TIMEOUT_UNITS[text[-1]]


def _metadata(key: str, value: bytes) -> tuple[str, str | bytes]:
    if key.endswith("-bin"):
        try:
            return key, base64.b64decode(value + b"=" * (-len(value) % 4))
        except ValueError as exc:
            raise _Status(grpc.StatusCode.INTERNAL, f"metadata '{key}' is not base64") from exc
    return key, value.decode("latin-1")


__all__ = ["CallContext", "GRPCConnection", "GRPCFront"]
