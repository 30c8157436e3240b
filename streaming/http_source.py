"""The bridge's HTTP source: request records pushed as CloudEvents over HTTP (by a Knative KafkaSource).

Why it exists: in the chart's knative mode, Knative's KafkaSource consumes the request topic (its consumer
scaling, its retries, its dead-letter sink) and delivers each record here instead of to a model. The bridge then
runs the record through exactly the path of a record it consumed itself -- decode, model call with the API key,
result or dead letter on the same topics with the same formats -- and answers the delivery only once the broker
acknowledged what it wrote:

* ``200``: the result, or the dead letter (bad input: the same one the Deployment bridge writes), is on its topic;
* ``503``: the model server or the broker stayed unavailable until the message's deadline, or the bridge is
  stopping: nothing was written, and the KafkaSource delivers the record again (at last to its dead-letter sink);
* ``429``: the bridge already holds ``max_pending`` deliveries (or their bytes): delivered again later;
* ``400``/``404``/``405``/``408``/``413``/``431``: not a CloudEvent delivery (malformed HTTP, wrong method or
  path, no or invalid CloudEvent attributes, a body over ``http_max_body_bytes``, too slow): nothing is taken.

A KafkaSource delivers a record that is not a CloudEvent itself as an event it makes up: ``id``
``partition:P/offset:O``, ``source`` ``/apis/v1/namespaces/NS/kafkasources/NAME#TOPIC``, ``type``
``dev.knative.kafka.event``, the record key in the ``key`` extension and each record header as a
``kafkaheader<name>`` extension (the name lower-cased, all but a-z and 0-9 dropped). :func:`to_message` undoes
that, so the decoder sees the record the Deployment bridge would have consumed (value, key, the headers the bridge
reads, topic, partition, offset, position) and the request id, the result and the dead letter come out the same.
A record that is a CloudEvent is delivered as that event, without its partition and offset; its position is then
``<topic>/<event source>#<event id>``.

HTTP/1.1 is parsed by h11 (already in the bridge image, under httpx), on the bridge's event loop; the consumer
side (``poll``, ``ack``) is the :class:`~streaming.messenger.BackendClient` one, so the bridge needs no second path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Iterable
from datetime import datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import h11

from streaming.cloudevents import (
    CONTENT_TYPE,
    STRUCTURED_JSON,
    CloudEvent,
    CloudEventError,
    from_kafka,
    to_kafka_headers,
)
from streaming.logs import TRACEPARENT_HEADER
from streaming.messages import MODEL_HEADERS, VERSION_HEADERS
from streaming.messenger import CORRELATION_HEADER, REPLY_TO_HEADER, HeaderList, Message

log = logging.getLogger(__name__)

KAFKASOURCE_TYPE = "dev.knative.kafka.event"
_WRAPPED_SOURCE = re.compile(r"^/apis/v1/namespaces/[^/]+/kafkasources/[^/#]+#(?P<topic>.+)$")
_WRAPPED_ID = re.compile(r"^partition:(?P<partition>\d+)/offset:(?P<offset>\d+)$")
HEADER_PREFIX = "kafkaheader"
# The record headers the bridge reads, by the name a KafkaSource gives them (others keep that name).
_RESTORED = {re.sub(r"[^a-z0-9]", "", name): name for name in (
    *(h for h in MODEL_HEADERS + VERSION_HEADERS if not h.startswith("ce_")), CORRELATION_HEADER, REPLY_TO_HEADER,
    TRACEPARENT_HEADER, "tracestate")}

MAX_HEADER_BYTES = 64 * 1024  # request line plus headers: a CloudEvent's attributes are a few hundred bytes
HEADER_TIMEOUT_S = 10.0  # to send a whole request head, or to start the next request on a kept-alive connection
BODY_TIMEOUT_S = 60.0  # to send a whole body: a client dribbling bytes cannot hold a connection for ever
EXTRA_CONNECTIONS = 64  # connections beyond max_held (idle keep-alive ones); more are answered 503 and closed
READ_CHUNK = 64 * 1024
LINGER_S = 1.0  # after an error answer, how long what the client still sends is read and dropped
LINGER_BYTES = 4 * 1024 * 1024


class NotADelivery(ValueError):
    """An HTTP request that is not a CloudEvent the bridge could take (answered 400)."""


def _timestamp_ms(time: str | None) -> int | None:
    if not time:
        return None
    try:
        return int(datetime.fromisoformat(time.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def to_message(headers: Iterable[tuple[str, bytes]], body: bytes, topic: str) -> Message:
    """The record a CloudEvent delivery carries, as the Kafka consumer would have handed it to the bridge.

    ``headers`` are the HTTP headers (binary mode: ``ce-*`` attributes, percent-encoded, and ``content-type``;
    structured mode: ``content-type: application/cloudevents+json``); ``topic`` is the request topic, the topic of
    a record the delivery does not name. Raises :class:`NotADelivery` for anything that is not a valid event."""
    attributes: HeaderList = []
    content_type: bytes | None = None
    for name, value in headers:
        lowered = name.lower()
        if lowered.startswith("ce-") and len(lowered) > 3:
            attributes.append(("ce_" + lowered[3:], unquote(value.decode("utf-8", "replace")).encode()))
        elif lowered == CONTENT_TYPE:
            content_type = value
    structured = content_type is not None and content_type.lower().startswith(STRUCTURED_JSON.encode())
    if not structured and not any(name == "ce_specversion" for name, _ in attributes):
        raise NotADelivery("not a CloudEvent: no ce-specversion header (binary mode) and no "
                           f"{STRUCTURED_JSON} body (structured mode)")
    if content_type is not None:
        attributes.append((CONTENT_TYPE, content_type))
    try:
        event = from_kafka(attributes, body)
    except CloudEventError as exc:
        raise NotADelivery(str(exc)) from exc
    if event is None:  # cannot happen after the checks above; kept for the type checker
        raise NotADelivery("not a CloudEvent")
    wrapped = _unwrap(event)
    if wrapped is not None:
        return wrapped
    try:
        kafka_headers = to_kafka_headers(event)
    except CloudEventError as exc:
        raise NotADelivery(str(exc)) from exc
    return Message(topic, event.data or b"", None, kafka_headers, timestamp_ms=_timestamp_ms(event.time),
                   position=f"{topic}/{event.source}#{event.id}")


def _unwrap(event: CloudEvent) -> Message | None:
    """The plain record behind an event a KafkaSource made up for it, or None for any other event."""
    source = _WRAPPED_SOURCE.match(event.source) if event.type == KAFKASOURCE_TYPE else None
    position = _WRAPPED_ID.match(event.id) if source else None
    if source is None or position is None:
        return None
    topic, partition, offset = source["topic"], int(position["partition"]), int(position["offset"])
    key = event.extensions.get("key", event.extensions.get("partitionkey"))
    headers: HeaderList = [(_RESTORED.get(name[len(HEADER_PREFIX):], name[len(HEADER_PREFIX):]), value.encode())
                           for name, value in event.extensions.items()
                           if name.startswith(HEADER_PREFIX) and len(name) > len(HEADER_PREFIX)]
    if event.datacontenttype is not None:
        headers.append((CONTENT_TYPE, event.datacontenttype.encode()))
    return Message(topic, event.data or b"", key.encode() if key is not None else None, headers, partition, offset,
                   _timestamp_ms(event.time), f"{topic}/{partition}/{offset}")


def _reply(status: int, doc: dict[str, Any]) -> tuple[int, bytes]:
    return status, json.dumps(doc, separators=(",", ":")).encode() + b"\n"


class HttpSource:
    """The consumer half of a :class:`~streaming.messenger.BackendClient`, fed by an HTTP CloudEvents receiver.

    Deliveries wait in a queue the bridge polls (from its consumer thread); each one's HTTP answer waits until the
    bridge acknowledges (``ack``: 200) or refuses (``refuse``: 503) it. At most ``max_held`` deliveries, and about
    ``max_held_bytes`` of bodies (always at least one), are held at once; the rest are answered 429 at once, so
    memory stays bounded whatever the sender does."""

    def __init__(self, topic: str, host: str, port: int, *, max_body_bytes: int, max_held: int,
                 max_held_bytes: int, header_timeout_s: float = HEADER_TIMEOUT_S,
                 body_timeout_s: float = BODY_TIMEOUT_S) -> None:
        self.topic = topic
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.max_held = max_held
        self.max_held_bytes = max_held_bytes
        self._queue: deque[Message] = deque()
        self._ready = threading.Condition()
        self._held = 0  # deliveries not answered yet (queued or taken by the bridge); loop thread only
        self._held_bytes = 0
        self._unanswered: set[asyncio.Future[tuple[int, bytes]]] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self.assigned: tuple[str, ...] = ()

    # --- lifecycle (on the bridge's event loop) ---------------------------------------------

    async def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=READ_CHUNK)
        self.port = self._server.sockets[0].getsockname()[1]
        self.assigned = (f"http://{self.host}:{self.port}",)
        return self.port

    def stop_accepting(self) -> None:
        """New deliveries are answered 503 from now on (the bridge is draining)."""
        self._accepting = False

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Answer 503 to every delivery still unanswered, let the answers go out, then close every connection."""
        self._accepting = False
        with self._ready:
            self._queue.clear()
        for waiter in list(self._unanswered):
            if not waiter.done():
                waiter.set_result(_reply(503, {"error": "the bridge is stopping; deliver again"}))
        if self._server is not None:
            self._server.close()
        if self._connections:
            _, late = await asyncio.wait(set(self._connections), timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    # --- the consumer side (BackendClient) --------------------------------------------------

    def subscribe(self, topic: str, group: str | None) -> None:
        """Nothing to join: deliveries arrive on their own."""

    def poll(self, timeout_s: float, max_messages: int, max_bytes: int | None = None) -> list[Message]:
        """Up to ``max_messages`` queued deliveries (and ``max_bytes`` of values, but at least one), waiting at most
        ``timeout_s`` for the first; ``max_messages=0`` only waits."""
        with self._ready:
            if not self._queue:
                self._ready.wait(timeout_s)
            out: list[Message] = []
            taken = 0
            while self._queue and len(out) < max_messages:
                size = len(self._queue[0].value)
                if max_bytes is not None and out and taken + size > max_bytes:
                    break
                out.append(self._queue.popleft())
                taken += size
            return out

    def ack(self, message: Message) -> None:
        """The result or dead letter is on its topic: answer the delivery 200."""
        self._answer(message, _reply(200, {"status": "done", "position": message.position}))

    def refuse(self, message: Message, reason: str) -> None:
        """Nothing was written for this delivery: answer 503, so the sender delivers it again."""
        self._answer(message, _reply(503, {"error": reason[:1000]}))

    def _answer(self, message: Message, answer: tuple[int, bytes]) -> None:
        waiter = message.handle
        if self._loop is None or not isinstance(waiter, asyncio.Future):
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            self._loop.call_soon_threadsafe(_settle, waiter, answer)

    def commit(self) -> None:
        """Progress is the sender's (its consumer group commits once we answered)."""

    def pause(self) -> None:
        """Backpressure is the 429 answer and the bridge polling less, not pausing a consumer."""

    def resume(self) -> None:
        """See :meth:`pause`."""

    def close(self) -> None:
        """See :meth:`aclose`, which the bridge awaits on its loop."""

    @property
    def max_record_bytes(self) -> int:
        return self.max_body_bytes

    # A source only: the bridge sends its results and dead letters through its broker sink.

    def send(self, topic: str, value: bytes, key: bytes | None, headers: HeaderList) -> Any:
        raise NotImplementedError("the HTTP source receives only; send through a broker backend")

    def send_batch(self, topic: str, records: list[Any], done: Any) -> None:
        raise NotImplementedError("the HTTP source receives only; send through a broker backend")

    def reply_listener(self, topic: str) -> Any:
        raise NotImplementedError("the HTTP source receives only")

    def flush(self, timeout_s: float) -> None:
        """Nothing is sent here."""

    # --- HTTP -------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self.max_held + EXTRA_CONNECTIONS:
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n"
                         b"Connection: close\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        try:
            while await self._exchange(conn, reader, writer):
                conn.start_next_cycle()
            if conn.our_state is h11.MUST_CLOSE:  # answered an error before reading all the client sent
                await _linger(reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # a bug here must cost one connection, not the bridge
            log.exception("the HTTP connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _exchange(self, conn: h11.Connection, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; True if the connection may carry another."""
        try:
            request = await _next_event(conn, reader, _deadline(self.header_timeout_s))
        except TimeoutError:
            if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                return False  # an idle kept-alive connection: just close it
            return await _send(conn, writer, *_reply(408, {"error": "the request head took too long"}), close=True)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            return await _send(conn, writer, *_reply(status, {"error": f"malformed HTTP request: {exc}"}), close=True)
        if not isinstance(request, h11.Request):
            return False  # the peer closed the connection
        method, path = request.method.decode("latin-1"), request.target.decode("latin-1").split("?")[0]
        if path != "/":
            return await _send(conn, writer, *_reply(404, {"error": f"no route {path}; deliver to /"}), close=True)
        if method != "POST":
            return await _send(conn, writer, *_reply(405, {"error": f"{method} is not allowed; POST a CloudEvent"}),
                               close=True, extra=[("allow", "POST")])
        headers = [(name.decode("latin-1"), value) for name, value in request.headers]
        declared = next((value for name, value in request.headers if name == b"content-length"), None)
        if declared is not None and int(declared) > self.max_body_bytes:
            return await _send(conn, writer, *_reply(413, {"error": f"the body is {int(declared)} bytes; the limit "
                                                                   f"is {self.max_body_bytes}"}), close=True)
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        try:
            body = await self._body(conn, reader)
        except TimeoutError:
            return await _send(conn, writer, *_reply(408, {"error": "the request body took too long"}), close=True)
        except h11.RemoteProtocolError as exc:
            return await _send(conn, writer, *_reply(400, {"error": f"malformed HTTP request: {exc}"}), close=True)
        if body is None:
            return await _send(conn, writer, *_reply(413, {"error": f"the body is over the limit of "
                                                                   f"{self.max_body_bytes} bytes"}), close=True)
        try:
            message = to_message(headers, body, self.topic)
        except NotADelivery as exc:
            return await _send(conn, writer, *_reply(400, {"error": str(exc)}))
        status, answer = await self._deliver(message)
        retry = [("retry-after", "1")] if status in (429, 503) else []
        return await _send(conn, writer, status, answer, extra=retry)

    async def _body(self, conn: h11.Connection, reader: asyncio.StreamReader) -> bytes | None:
        """The whole body, or None once it is over the limit (the rest is not read)."""
        parts: list[bytes] = []
        size = 0
        deadline = _deadline(self.body_timeout_s)
        while True:
            event = await _next_event(conn, reader, deadline)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body_bytes:
                    return None
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:  # the peer closed mid-body
                raise ConnectionResetError("the connection closed before the body ended")

    async def _deliver(self, message: Message) -> tuple[int, bytes]:
        """Hand one delivery to the bridge and wait for its answer (the bridge's deadlines bound the wait)."""
        size = len(message.value)
        if not self._accepting:
            return _reply(503, {"error": "the bridge is stopping; deliver again"})
        if self._held and (self._held >= self.max_held or self._held_bytes + size > self.max_held_bytes):
            return _reply(429, {"error": f"the bridge holds {self._held} deliveries ({self._held_bytes} bytes); "
                                         "deliver again later"})
        assert self._loop is not None
        waiter: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        message.handle = waiter
        self._held += 1
        self._held_bytes += size
        self._unanswered.add(waiter)
        try:
            with self._ready:
                self._queue.append(message)
                self._ready.notify()
            return await waiter
        finally:
            self._unanswered.discard(waiter)
            self._held -= 1
            self._held_bytes -= size


def _settle(waiter: asyncio.Future[tuple[int, bytes]], answer: tuple[int, bytes]) -> None:
    if not waiter.done():
        waiter.set_result(answer)


def _deadline(timeout_s: float) -> float:
    return asyncio.get_running_loop().time() + timeout_s


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader, deadline: float) -> Any:
    """The next h11 event, reading until there is one; TimeoutError once the loop's clock passes ``deadline``."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError
        conn.receive_data(await asyncio.wait_for(reader.read(READ_CHUNK), left))


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read and drop what the client is still sending, for a moment, before closing: closing with unread data
    makes the kernel reset the connection, and the client may then lose the answer it was sent."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
        deadline = asyncio.get_running_loop().time() + LINGER_S
        dropped = 0
        while dropped < LINGER_BYTES and (left := deadline - asyncio.get_running_loop().time()) > 0:
            chunk = await asyncio.wait_for(reader.read(READ_CHUNK), left)
            if not chunk:
                return
            dropped += len(chunk)


async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes, *,
                close: bool = False, extra: list[tuple[str, str]] | None = None) -> bool:
    """Write one JSON answer; True if the connection may carry another request."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # IDLE: the request head itself was malformed
        return False
    headers = [("content-type", "application/json"), ("content-length", str(len(body))), *(extra or [])]
    if close:
        headers.append(("connection", "close"))
    head = h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)
    writer.write(conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    await writer.drain()
    return not close and conn.our_state is h11.DONE and conn.their_state is h11.DONE
