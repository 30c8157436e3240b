"""Google Pub/Sub backend of the Messenger, on ``google-cloud-pubsub``.

Mapping of the Messenger's Kafka-shaped model onto Pub/Sub:

* topic -> Pub/Sub topic; consumer ``group`` -> subscription ``<topic>.<group>`` (created on demand
  when ``auto_create``), so several processes with one group share the work as Kafka replicas do;
* key -> the ``kcp-key`` attribute; headers -> attributes (values must be UTF-8 text);
* ack -> ``message.ack()``. Pub/Sub acks each message on its own, so there is no offset to order;
  unacked messages are redelivered after the ack deadline or a crash (at-least-once);
* no group -> a temporary subscription that sees messages published after it was created, deleted
  on close (Pub/Sub has no "read from the beginning" without snapshots);
* backpressure -> subscriber flow control (``max_outstanding``) and a byte budget per ``poll`` (a message
  over it waits in the backend for the next poll): pause/resume are no-ops;
* limits -> a record Pub/Sub would refuse for what it is (attribute value over 1,024 bytes, more than
  100 attributes, key over 256 bytes, data over Pub/Sub's message size limit ``MAX_MESSAGE_BYTES``,
  attributes that are not UTF-8) fails its send with :class:`~streaming.messenger.PermanentSendError`,
  as does the service's ``InvalidArgument``.

Streaming pull delivers on the library's own threads; they only put messages on a queue, so
``poll`` works the same as on Kafka.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import uuid
from concurrent.futures import Future
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1

from streaming.messenger import BatchDone, BatchSends, Delivery, HeaderList, Message, PermanentSendError, Record
from streaming.settings import PubSubSettings

log = logging.getLogger(__name__)

KEY_ATTRIBUTE = "kcp-key"
# Pub/Sub's documented quotas: https://cloud.google.com/pubsub/quotas#resource_limits
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_MESSAGE_BYTES = 10_000_000


def attributes_for(key: bytes | None, headers: HeaderList) -> dict[str, str]:
    """Headers and key as Pub/Sub attributes, or :class:`PermanentSendError` naming the limit they break."""
    pairs = [*headers, *([(KEY_ATTRIBUTE, key)] if key is not None else [])]
    if len(pairs) > MAX_ATTRIBUTES:
        raise PermanentSendError(f"{len(pairs)} attributes; Pub/Sub allows {MAX_ATTRIBUTES}")
    out: dict[str, str] = {}
    for name, value in pairs:
        if len(name.encode("utf-8")) > MAX_ATTRIBUTE_KEY_BYTES:
            raise PermanentSendError(f"attribute name {name[:40]!r}... is over {MAX_ATTRIBUTE_KEY_BYTES} bytes")
        if len(value) > MAX_ATTRIBUTE_VALUE_BYTES:
            raise PermanentSendError(f"attribute {name!r} is {len(value)} bytes; Pub/Sub allows "
                                     f"{MAX_ATTRIBUTE_VALUE_BYTES}")
        try:
            out[name] = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PermanentSendError(f"attribute {name!r} is not UTF-8 text") from exc
    return out


class PubSubBackend:
    """Publisher + streaming-pull subscriber behind the :class:`~streaming.messenger.BackendClient` protocol."""

    def __init__(self, settings: PubSubSettings | None = None) -> None:
        self.settings = settings or PubSubSettings()
        self._publisher: pubsub_v1.PublisherClient | None = None
        self._subscriber: pubsub_v1.SubscriberClient | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pull: Any = None
        self._topics_ready: set[str] = set()
        self._temporary: list[str] = []
        self._topic = ""
        self._held: list[Any] = []  # leased messages a poll's byte budget left for the next one
        self.assigned: tuple[str, ...] = ()

    # --- clients ---------------------------------------------------------------------------

    def _channel(self) -> Any:
        import grpc

        return grpc.insecure_channel(self.settings.emulator_host)

    @property
    def publisher(self) -> pubsub_v1.PublisherClient:
        if self._publisher is None:
            if self.settings.emulator_host:
                from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

                self._publisher = pubsub_v1.PublisherClient(transport=PublisherGrpcTransport(channel=self._channel()))
            else:
                self._publisher = pubsub_v1.PublisherClient()
        return self._publisher

    @property
    def subscriber(self) -> pubsub_v1.SubscriberClient:
        if self._subscriber is None:
            if self.settings.emulator_host:
                from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

                self._subscriber = pubsub_v1.SubscriberClient(
                    transport=SubscriberGrpcTransport(channel=self._channel()))
            else:
                self._subscriber = pubsub_v1.SubscriberClient()
        return self._subscriber

    def topic_path(self, topic: str) -> str:
        return self.publisher.topic_path(self.settings.project, topic)

    def subscription_path(self, name: str) -> str:
        return self.subscriber.subscription_path(self.settings.project, name)

    def ensure_topic(self, topic: str) -> str:
        path = self.topic_path(topic)
        if topic not in self._topics_ready:
            if self.settings.auto_create:
                with contextlib.suppress(gexc.AlreadyExists):
                    self.publisher.create_topic(name=path)
            self._topics_ready.add(topic)
        return path

    def ensure_subscription(self, topic: str, name: str) -> str:
        topic_path = self.ensure_topic(topic)
        path = self.subscription_path(name)
        if self.settings.auto_create:
            with contextlib.suppress(gexc.AlreadyExists):
                self.subscriber.create_subscription(name=path, topic=topic_path,
                                                    ack_deadline_seconds=self.settings.ack_deadline_s)
        return path

    # --- producing -------------------------------------------------------------------------

    def send(self, topic: str, value: bytes, key: bytes | None, headers: HeaderList) -> Future[Delivery]:
        out: Future[Delivery] = Future()
        try:
            attributes = attributes_for(key, headers)
            if len(value) > MAX_MESSAGE_BYTES:
                raise PermanentSendError(f"message data is {len(value)} bytes; Pub/Sub allows {MAX_MESSAGE_BYTES}")
            pending = self.publisher.publish(self.ensure_topic(topic), value, **attributes)
        except Exception as exc:  # reported through the future like a late failure
            out.set_exception(_classified(exc))
            return out

        def _done(f: Any) -> None:
            try:
                out.set_result(Delivery(topic, message_id=f.result()))
            except Exception as exc:
                out.set_exception(_classified(exc))

        pending.add_done_callback(_done)
        return out

    def send_batch(self, topic: str, records: list[Record], done: BatchDone) -> None:
        """Publish every record; ``done`` runs once all are acknowledged or refused (see BatchSends)."""
        batch = BatchSends(len(records), done, _classified)
        for i, (value, key, headers) in enumerate(records):
            self.send(topic, value, key, headers).add_done_callback(
                lambda f, i=i: batch.settle(i, f.exception()))

    @property
    def max_record_bytes(self) -> int:
        return MAX_MESSAGE_BYTES

    def flush(self, timeout_s: float = 30.0) -> None:
        """Publishing futures are awaited by callers; nothing is buffered beyond them."""

    # --- consuming -------------------------------------------------------------------------

    def _stream(self, subscription: str, sink: queue.Queue[Any]) -> Any:
        flow = pubsub_v1.types.FlowControl(max_messages=self.settings.max_outstanding)
        return self.subscriber.subscribe(subscription, callback=sink.put, flow_control=flow)

    def subscribe(self, topic: str, group: str | None) -> None:
        if self._pull is not None:
            raise RuntimeError("this backend is already subscribed")
        self._topic = topic
        if group:
            name = f"{topic}.{group}"
        else:
            name = f"{topic}.tail-{uuid.uuid4().hex[:10]}"
            self._temporary.append(name)
        path = self.ensure_subscription(topic, name)
        self._pull = self._stream(path, self._queue)
        self.assigned = (path,)

    def poll(self, timeout_s: float, max_messages: int, max_bytes: int | None = None) -> list[Message]:
        if max_messages <= 0:
            with contextlib.suppress(queue.Empty):
                # wait like a poll would, but hand nothing out: flow control bounds what is leased
                self._queue.put(self._queue.get(timeout=timeout_s))
            return []
        held, self._held = self._held, []
        taken = held + _drain(self._queue, 0 if held else timeout_s, max_messages - len(held))
        if max_bytes is not None:
            total = 0
            for i, m in enumerate(taken):
                total += len(m.data)
                if i and total > max_bytes:  # the rest waits here for the next poll (still leased)
                    taken, self._held = taken[:i], taken[i:]
                    break
        return [_to_message(m, self._topic) for m in taken]

    def ack(self, message: Message) -> None:
        if message.handle is not None:
            message.handle.ack()

    def commit(self) -> None:
        """Pub/Sub acks are per message and immediate."""

    def pause(self) -> None:
        """Flow control (``max_outstanding``) bounds leased messages; nothing to pause."""

    def resume(self) -> None:
        """See :meth:`pause`."""

    # --- request / reply -------------------------------------------------------------------

    def reply_listener(self, topic: str) -> PubSubReplyListener:
        name = f"{topic}.reply-{uuid.uuid4().hex[:10]}"
        path = self.ensure_subscription(topic, name)
        return PubSubReplyListener(self, path, topic)

    # --- lifecycle -------------------------------------------------------------------------

    def delete_subscription(self, path: str) -> None:
        with contextlib.suppress(gexc.NotFound):
            self.subscriber.delete_subscription(subscription=path)

    def close(self) -> None:
        if self._pull is not None:
            self._pull.cancel()
            with contextlib.suppress(Exception):
                self._pull.result(timeout=10)
            self._pull = None
        for name in self._temporary:
            self.delete_subscription(self.subscription_path(name))
        self._temporary.clear()
        if self._publisher is not None:
            self._publisher.stop()
            self._publisher = None
        if self._subscriber is not None:
            self._subscriber.close()
            self._subscriber = None


class PubSubReplyListener:
    """A private subscription on the reply topic, created before the request is published."""

    def __init__(self, backend: PubSubBackend, path: str, topic: str) -> None:
        self._backend = backend
        self._topic = topic
        self._path = path
        self._queue: queue.Queue[Any] = queue.Queue()
        self._pull = backend._stream(path, self._queue)

    def poll(self, timeout_s: float) -> list[Message]:
        out = []
        for m in _drain(self._queue, timeout_s, 500):
            m.ack()  # replies are for this requester only; nobody else will want them
            out.append(_to_message(m, self._topic))
        return out

    def close(self) -> None:
        self._pull.cancel()
        with contextlib.suppress(Exception):
            self._pull.result(timeout=10)
        self._backend.delete_subscription(self._path)


def _classified(exc: BaseException) -> BaseException:
    """The service's InvalidArgument (say, a message over its size limit) is as permanent as our own checks."""
    return PermanentSendError(f"Pub/Sub refused the message: {exc}") if isinstance(exc, gexc.InvalidArgument) else exc


def _drain(q: queue.Queue[Any], timeout_s: float, limit: int) -> list[Any]:
    if limit <= 0:
        return []
    try:
        items = [q.get(timeout=timeout_s)]
    except queue.Empty:
        return []
    while len(items) < limit:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


def _to_message(m: Any, topic: str) -> Message:
    attributes = dict(m.attributes)
    key = attributes.pop(KEY_ATTRIBUTE, None)
    published = m.publish_time
    return Message(
        topic=topic,
        value=bytes(m.data),
        key=key.encode("utf-8") if key is not None else None,
        headers=[(k, v.encode("utf-8")) for k, v in attributes.items()],
        timestamp_ms=int(published.timestamp() * 1000) if published else None,
        position=m.message_id,
        handle=m,
    )
