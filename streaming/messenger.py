"""The Messenger: one small API over Kafka and Google Pub/Sub.

Producers, the results printer, the tests and the bridge all talk to a broker through this
module, so none of them knows which broker it is: ``Messenger(topic, backend="kafka"|"pubsub")``
gives ``send`` / ``receive`` / ``ack`` and ``request`` / ``reply``.

Delivery is at-least-once on both backends. A received message is *not* done until it is
acknowledged with :meth:`Messenger.ack`; on Kafka that moves the committed offset forward only
over a contiguous run of acknowledged messages (see :mod:`streaming.offsets`), on Pub/Sub it
acks the message. Anything not acknowledged is delivered again after a crash or rebalance.

Request-reply is correlation based: :meth:`Messenger.request` stamps a ``kcp-correlation-id``
header (and uses it as the key when none is given), then waits on the reply topic for a
message carrying that id in the same header or as its key. :meth:`Messenger.reply` is the
responder's half. The bridge answers in the same way, so ``request`` works against it too.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from streaming.settings import Backend, MessengerSettings

CORRELATION_HEADER = "kcp-correlation-id"
REPLY_TO_HEADER = "kcp-reply-to"

HeaderList = list[tuple[str, bytes]]
Record = tuple[bytes, bytes | None, HeaderList]  # value, key, headers: already encoded
BatchDone = Callable[[list[BaseException | None]], None]
Headers = Mapping[str, bytes | str] | Sequence[tuple[str, bytes | str]]
Payload = bytes | str | Mapping[str, Any] | list[Any]


@dataclass
class Message:
    """One received record, broker-neutral.

    ``position`` is a stable identity of the record in its stream (``topic/partition/offset`` on
    Kafka, the message id on Pub/Sub): the same record delivered twice has the same position.
    """

    topic: str
    value: bytes
    key: bytes | None = None
    headers: HeaderList = field(default_factory=list)
    partition: int | None = None
    offset: int | None = None
    timestamp_ms: int | None = None
    position: str = ""
    handle: Any = field(default=None, repr=False, compare=False)

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        found = None
        for k, v in self.headers:
            if k.lower() == name:
                found = v
        return found

    def header_str(self, name: str) -> str | None:
        value = self.header(name)
        return value.decode("utf-8", errors="replace") if value is not None else None

    @property
    def key_str(self) -> str | None:
        return self.key.decode("utf-8", errors="replace") if self.key is not None else None

    def json(self) -> Any:
        """The value parsed as JSON (raises ``ValueError`` if it is not)."""
        return json.loads(self.value)


class PermanentSendError(Exception):
    """The broker (or the client's own check) refused a record for what it is -- too large, attributes over
    the limits -- so sending it again can never succeed. Anything else failing a send is transient."""


@dataclass(frozen=True)
class Delivery:
    """Where a sent message landed, once the broker acknowledged it."""

    topic: str
    partition: int | None = None
    offset: int | None = None
    message_id: str | None = None


class BackendClient(Protocol):
    """What a broker backend provides; the Messenger adds encoding and request-reply on top.

    Consumer-side methods (``subscribe``, ``poll``, ``commit``, ``pause``, ``resume``) are called
    from one thread at a time; ``send`` and ``ack`` may be called from any thread.
    """

    def send(self, topic: str, value: bytes, key: bytes | None, headers: HeaderList) -> Future[Delivery]: ...

    def send_batch(self, topic: str, records: list[Record], done: BatchDone) -> None: ...

    @property
    def max_record_bytes(self) -> int: ...

    def subscribe(self, topic: str, group: str | None) -> None: ...

    def poll(self, timeout_s: float, max_messages: int, max_bytes: int | None = None) -> list[Message]: ...

    def ack(self, message: Message) -> None: ...

    def commit(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def reply_listener(self, topic: str) -> ReplyListener: ...

    @property
    def assigned(self) -> tuple[str, ...]: ...

    def flush(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


class ReplyListener(Protocol):
    """A reader of a reply topic that starts *before* the request is sent, so no reply is missed."""

    def poll(self, timeout_s: float) -> list[Message]: ...

    def close(self) -> None: ...


class BatchSends:
    """The outcomes of a batch of sends, reported once: ``done(errors)`` runs when the last record settles.

    Why not one future per record: a future plus its callbacks costs more CPU than kafka-python's own
    per-record work for a small result, and the bridge needs one wake-up per batch, not one per record.
    ``settle`` may be called from any thread; ``errors[i]`` is None for a record the broker acknowledged.
    """

    def __init__(self, count: int, done: BatchDone, classify: Callable[[BaseException], BaseException]) -> None:
        self.errors: list[BaseException | None] = [None] * count
        self._left = count
        self._lock = threading.Lock()
        self._done = done
        self._classify = classify
        if count == 0:
            done(self.errors)

    def settle(self, index: int, outcome: object) -> None:
        """Record ``index`` is finished: ``outcome`` is its exception, or anything else for success."""
        if isinstance(outcome, BaseException):
            self.errors[index] = self._classify(outcome)
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._done(self.errors)


def encode_value(value: Payload) -> bytes:
    """bytes pass through, str is UTF-8, anything else is compact JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_key(key: bytes | str | None) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    return key.encode("utf-8")


def encode_headers(headers: Headers | None) -> HeaderList:
    """Normalise a mapping or pair list into Kafka's ``[(str, bytes)]`` form."""
    if not headers:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), v if isinstance(v, bytes) else str(v).encode("utf-8")) for k, v in items]


def make_backend(settings: MessengerSettings) -> BackendClient:
    """Instantiate the configured backend (imported lazily: Pub/Sub's client is heavy)."""
    if settings.backend == "kafka":
        from streaming.kafka_backend import KafkaBackend

        return KafkaBackend(settings.kafka)
    if settings.backend == "pubsub":
        from streaming.pubsub_backend import PubSubBackend

        return PubSubBackend(settings.pubsub)
    raise ValueError(f"unknown messenger backend {settings.backend!r} (kafka or pubsub)")


class RequestTimeout(TimeoutError):
    """No reply with the expected correlation id arrived in time."""


class Messenger:
    """Send to and receive from one topic, on Kafka or Pub/Sub.

    ``topic`` is the default destination of :meth:`send` and the source of :meth:`receive`.
    ``group`` names the consumer group (Kafka) or subscription suffix (Pub/Sub); with no group a
    Kafka messenger reads every partition from the beginning without committing (a "tail").
    """

    def __init__(
        self,
        topic: str,
        backend: Backend | None = None,
        *,
        group: str | None = None,
        reply_topic: str | None = None,
        settings: MessengerSettings | None = None,
        client: BackendClient | None = None,
    ) -> None:
        settings = settings or MessengerSettings()
        if backend is not None and backend != settings.backend:
            settings = settings.model_copy(update={"backend": backend})
        self.topic = topic
        self.group = group
        self.reply_topic = reply_topic
        self.settings = settings
        self.backend_name: Backend = settings.backend
        self._client = client or make_backend(settings)
        self._subscribed = False
        self._replies: dict[str, ReplyListener] = {}

    # --- sending ---------------------------------------------------------------------------

    def send_async(self, value: Payload, *, key: bytes | str | None = None, headers: Headers | None = None,
                   topic: str | None = None) -> Future[Delivery]:
        """Hand a message to the backend; the future resolves when the broker acknowledged it."""
        return self._client.send(topic or self.topic, encode_value(value), encode_key(key), encode_headers(headers))

    def send(self, value: Payload, *, key: bytes | str | None = None, headers: Headers | None = None,
             topic: str | None = None, timeout_s: float = 30.0) -> Delivery:
        """Send and wait for the broker's acknowledgement."""
        return self.send_async(value, key=key, headers=headers, topic=topic).result(timeout=timeout_s)

    def send_batch(self, records: list[Record], done: BatchDone, *, topic: str | None = None) -> None:
        """Hand encoded records to the backend; ``done(errors)`` runs once (on any thread) when the broker
        has acknowledged or refused every one (``errors[i]`` None, :class:`PermanentSendError` or transient)."""
        self._client.send_batch(topic or self.topic, records, done)

    def flush(self, timeout_s: float = 30.0) -> None:
        self._client.flush(timeout_s)

    @property
    def max_record_bytes(self) -> int:
        """The largest record (value + key + headers) the backend accepts: what a dead letter is cut to."""
        return self._client.max_record_bytes

    # --- receiving -------------------------------------------------------------------------

    def _ensure_subscribed(self) -> None:
        if not self._subscribed:
            self._client.subscribe(self.topic, self.group)
            self._subscribed = True

    def receive(self, timeout_s: float = 1.0, max_messages: int = 500, max_bytes: int | None = None) -> list[Message]:
        """Up to ``max_messages`` messages (and ``max_bytes`` of values, but at least one), waiting at most
        ``timeout_s`` for the first.

        ``max_messages=0`` keeps the subscription alive without taking new work (backpressure).
        """
        self._ensure_subscribed()
        return self._client.poll(timeout_s, max_messages, max_bytes)

    def messages(self, idle_timeout_s: float | None = None, poll_s: float = 0.5) -> Iterator[Message]:
        """Iterate over messages; stop after ``idle_timeout_s`` without one (None: forever)."""
        last = time.monotonic()
        while True:
            batch = self.receive(timeout_s=poll_s)
            if batch:
                last = time.monotonic()
                yield from batch
            elif idle_timeout_s is not None and time.monotonic() - last >= idle_timeout_s:
                return

    def ack(self, message: Message) -> None:
        """Mark a message done; it will not be delivered again to this group."""
        self._client.ack(message)

    def commit(self) -> None:
        """Commit acknowledged progress now (Kafka); a no-op where acks are immediate."""
        if self._subscribed:
            self._client.commit()

    def pause(self) -> None:
        if self._subscribed:
            self._client.pause()

    def resume(self) -> None:
        if self._subscribed:
            self._client.resume()

    @property
    def assignment(self) -> tuple[str, ...]:
        """What this messenger consumes now: ``topic/partition`` (Kafka) or the subscription (Pub/Sub)."""
        return tuple(self._client.assigned)

    # --- request / reply -------------------------------------------------------------------

    def _listener(self, topic: str) -> ReplyListener:
        if topic not in self._replies:
            self._replies[topic] = self._client.reply_listener(topic)
        return self._replies[topic]

    def request(self, value: Payload, *, key: bytes | str | None = None, headers: Headers | None = None,
                reply_topic: str | None = None, correlation_id: str | None = None,
                timeout_s: float = 30.0, match: Callable[[Message], bool] | None = None) -> Message:
        """Send a request and wait for the reply that carries its correlation id.

        The reply listener is positioned before sending, so a fast reply is not missed. Replies
        for other correlation ids are skipped (each requester owns its own listener).
        """
        reply_topic = reply_topic or self.reply_topic
        if not reply_topic:
            raise ValueError("request() needs a reply_topic (argument or Messenger(reply_topic=...))")
        cid = correlation_id or (key.decode() if isinstance(key, bytes) else key) or uuid.uuid4().hex
        listener = self._listener(reply_topic)
        hdrs = [h for h in encode_headers(headers) if h[0] not in (CORRELATION_HEADER, REPLY_TO_HEADER)]
        hdrs += [(CORRELATION_HEADER, cid.encode()), (REPLY_TO_HEADER, reply_topic.encode())]
        self.send(value, key=key if key is not None else cid, headers=hdrs, timeout_s=timeout_s)
        is_reply = match or (lambda m: correlation_of(m) == cid)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            for message in listener.poll(min(left, 0.5)):
                if is_reply(message):
                    return message
        raise RequestTimeout(f"no reply with correlation id {cid!r} on {reply_topic!r} within {timeout_s}s")

    def reply(self, request: Message, value: Payload, *, headers: Headers | None = None,
              topic: str | None = None, timeout_s: float = 30.0) -> Delivery:
        """Answer ``request`` on its ``kcp-reply-to`` topic (or ``topic``), echoing its correlation id."""
        target = topic or request.header_str(REPLY_TO_HEADER)
        if not target:
            raise ValueError("the request names no reply topic and none was given")
        cid = correlation_of(request) or ""
        hdrs = [h for h in encode_headers(headers) if h[0] != CORRELATION_HEADER]
        hdrs.append((CORRELATION_HEADER, cid.encode()))
        return self.send(value, key=cid or None, headers=hdrs, topic=target, timeout_s=timeout_s)

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close reply listeners and the backend (commits acknowledged progress first)."""
        for listener in self._replies.values():
            listener.close()
        self._replies.clear()
        self._client.close()

    def __enter__(self) -> Messenger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def correlation_of(message: Message) -> str | None:
    """The correlation id a message carries: the header, else its key."""
    return message.header_str(CORRELATION_HEADER) or message.key_str
