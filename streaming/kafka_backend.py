"""Kafka backend of the Messenger, on kafka-python.

Design points, each there because at-least-once depends on it:

* Auto-commit is off. :meth:`KafkaBackend.ack` marks a record done in an
  :class:`~streaming.offsets.OffsetTracker`; the consumer thread commits the contiguous done
  prefix of each partition on its next ``poll`` (at most every ``commit_interval_ms``, without
  waiting for the answer), and waits for the commit on :meth:`commit`, on revocation and on
  close. A crash loses only uncommitted acknowledgements, so those records are delivered again --
  never skipped.
* The consumer is only touched by the thread that calls ``subscribe``/``poll``/``commit``
  (kafka-python's consumer is not thread-safe); ``send`` and ``ack`` are safe from any thread.
* Backpressure pauses the assigned partitions but keeps polling, so the consumer stays in its
  group (``max.poll.interval.ms``) while the model server is slow or down.
* Without a group the consumer assigns itself every partition of the topic and reads from the
  beginning without committing: the "tail" mode the results printer and tests use.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    CommitFailedError,
    CorruptRecordError,
    InvalidRecordError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from kafka.structs import OffsetAndMetadata
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

from streaming.messenger import BatchDone, BatchSends, Delivery, HeaderList, Message, PermanentSendError, Record
from streaming.offsets import OffsetTracker, PartitionTracker
from streaming.partitioner import Murmur2Partitioner
from streaming.settings import KafkaSettings

log = logging.getLogger(__name__)

# The broker refuses the record itself: sending it again cannot succeed (anything else may, later).
PERMANENT = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, CorruptRecordError)


def _classified(exc: BaseException) -> BaseException:
    """A producer failure as :class:`PermanentSendError` when retrying cannot help, else unchanged."""
    if isinstance(exc, PERMANENT) or not isinstance(exc, KafkaError | OSError):  # a TypeError is the record's too
        return PermanentSendError(f"{type(exc).__name__}: {exc}")
    return exc


class _Rebalance(ConsumerRebalanceListener):
    """Commit finished work before giving partitions away; start fresh trackers for new ones."""

    def __init__(self, backend: KafkaBackend) -> None:
        self.backend = backend

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in revoked}
        self.backend._commit(only=keys)
        for topic, partition in keys:
            self.backend.tracker.revoke(topic, partition)
        gone = {f"{t}/{p}" for t, p in keys}
        self.backend.assigned = tuple(a for a in self.backend.assigned if a not in gone)
        log.info("partitions revoked: %s", sorted(keys))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            self.backend.tracker.assign(tp.topic, tp.partition)
        added = {f"{tp.topic}/{tp.partition}" for tp in assigned}
        self.backend.assigned = tuple(sorted({*self.backend.assigned, *added}))
        if self.backend._paused:
            self.backend._consumer.pause(*assigned)  # type: ignore[union-attr]
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))


class KafkaBackend:
    """kafka-python producer + consumer behind the :class:`~streaming.messenger.BackendClient` protocol."""

    def __init__(self, settings: KafkaSettings | None = None) -> None:
        self.settings = settings or KafkaSettings()
        self.tracker = OffsetTracker()
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None
        self._group: str | None = None
        self._paused = False
        self._last_commit = 0.0
        # "topic/partition" strings, replaced (never mutated) by the consumer thread, so any thread may read it
        self.assigned: tuple[str, ...] = ()

    # --- producing -------------------------------------------------------------------------

    @property
    def producer(self) -> KafkaProducer:
        if self._producer is None:
            s = self.settings
            self._producer = KafkaProducer(
                **s.client_config(),
                acks="all" if s.acks == "all" else int(s.acks),
                linger_ms=s.linger_ms,
                batch_size=min(s.batch_size, s.max_request_size),
                max_block_ms=s.max_block_ms,
                max_request_size=s.max_request_size,
                # the default key -> partition mapping (Java-compatible), without its pure-Python cost per record
                partitioner=Murmur2Partitioner(),
                # kafka-python's idempotent producer turns any non-retriable broker refusal of one record (an
                # invalid record, a topic ACL denial, a record over the topic's limit) into a fatal state that
                # fails every later send, results included: one refused dead letter would stop the bridge's
                # output for good. Without idempotence a refusal fails only its own batch. What idempotence
                # added, no duplicate on a retried produce, the bridge never relied on: it is at least once,
                # and a duplicate carries the same request id.
                enable_idempotence=False,
            )  # retries forever within delivery.timeout.ms
        return self._producer

    def send(self, topic: str, value: bytes, key: bytes | None, headers: HeaderList) -> Future[Delivery]:
        """Queue a record; the returned future resolves when the broker acknowledged it."""
        out: Future[Delivery] = Future()
        try:
            pending = self.producer.send(topic, value=value, key=key, headers=headers or None)
        except Exception as exc:  # reported through the future like a late failure
            out.set_exception(_classified(exc))
            return out
        pending.add_callback(lambda md: out.set_result(Delivery(md.topic, md.partition, md.offset)))
        pending.add_errback(lambda exc: out.set_exception(_classified(exc)))
        return out

    def send_batch(self, topic: str, records: list[Record], done: BatchDone) -> None:
        """Queue every record; ``done`` runs once all are acknowledged or refused (see BatchSends)."""
        batch = BatchSends(len(records), done, _classified)
        for i, (value, key, headers) in enumerate(records):
            try:  # self.producer inside: creating it fails while no broker answers (transient, like a late failure)
                future = self.producer.send(topic, value=value, key=key, headers=headers or None)
            except Exception as exc:  # refused before queueing: settled like a late failure
                batch.settle(i, exc)
            else:
                future.add_both(batch.settle, i)

    @property
    def max_record_bytes(self) -> int:
        return self.settings.max_request_size

    def flush(self, timeout_s: float = 30.0) -> None:
        if self._producer is not None:
            self._producer.flush(timeout=timeout_s)

    # --- consuming -------------------------------------------------------------------------

    def _new_consumer(self, group: str | None) -> KafkaConsumer:
        s = self.settings
        return KafkaConsumer(
            **s.client_config(),
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset if group else "earliest",
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=min(s.heartbeat_interval_ms, s.session_timeout_ms // 3),
            max_poll_interval_ms=s.max_poll_interval_ms,
            fetch_max_wait_ms=s.fetch_max_wait_ms,
        )

    def subscribe(self, topic: str, group: str | None) -> None:
        if self._consumer is not None:
            raise RuntimeError("this backend is already subscribed")
        self._group = group
        self._consumer = self._new_consumer(group)
        if group:
            self._consumer.subscribe([topic], listener=_Rebalance(self))
        else:
            partitions = _partitions_for(self._consumer, topic, self.settings.request_timeout_ms / 1000)
            tps = [TopicPartition(topic, p) for p in partitions]
            self._consumer.assign(tps)
            self._consumer.seek_to_beginning(*tps)
            for tp in tps:
                self.tracker.assign(tp.topic, tp.partition)
            self.assigned = tuple(f"{tp.topic}/{tp.partition}" for tp in tps)

    def poll(self, timeout_s: float, max_messages: int, max_bytes: int | None = None) -> list[Message]:
        consumer = self._require_consumer()
        self._maybe_commit()
        if max_messages <= 0:
            self.pause()
            records = consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=1)
            # A partition assigned during this poll arrives unpaused; hand nothing out and rewind,
            # so its records are fetched again once there is capacity.
            for tp, batch in records.items():
                if batch:
                    consumer.seek(tp, batch[0].offset)
            return []
        if self._paused:
            self.resume()
        records = consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_messages)
        out: list[Message] = []
        taken = 0
        for tp, batch in records.items():
            tracker = self.tracker.tracker(tp.topic, tp.partition)
            for r in batch:
                size = len(r.value or b"")
                if max_bytes is not None and out and taken + size > max_bytes:
                    # Over the byte budget: hand nothing more out of this partition; it is fetched again later.
                    consumer.seek(tp, r.offset)
                    break
                taken += size
                self.tracker.add(tracker, r.offset)
                out.append(Message(
                    topic=r.topic, value=r.value if r.value is not None else b"", key=r.key,
                    headers=_headers(r.headers), partition=r.partition, offset=r.offset, timestamp_ms=r.timestamp,
                    position=f"{r.topic}/{r.partition}/{r.offset}", handle=tracker))
        return out

    def ack(self, message: Message) -> None:
        tracker = message.handle
        if isinstance(tracker, PartitionTracker) and message.offset is not None:
            self.tracker.done(tracker, message.offset)

    def commit(self) -> None:
        if self._consumer is not None:
            self._commit()

    def pause(self) -> None:
        consumer = self._require_consumer()
        self._paused = True
        assigned = consumer.assignment()
        if assigned:
            consumer.pause(*assigned)

    def resume(self) -> None:
        consumer = self._require_consumer()
        self._paused = False
        paused = consumer.paused()
        if paused:
            consumer.resume(*paused)

    def _require_consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("subscribe() first")
        return self._consumer

    def _maybe_commit(self) -> None:
        if (time.monotonic() - self._last_commit) * 1000 >= self.settings.commit_interval_ms:
            self._commit(wait=False)

    def _commit(self, only: set[tuple[str, int]] | None = None, *, wait: bool = True) -> None:
        """Commit every partition's safe offset that moved; failures only mean redelivery.

        The periodic commit does not wait for the coordinator's answer (a round trip the consumer thread
        would otherwise spend not polling); revocation and close wait, since ownership ends there.
        """
        self._last_commit = time.monotonic()
        if not self._group or self._consumer is None:
            return
        offsets = self.tracker.to_commit(only)
        if not offsets:
            return
        request = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        if not wait:
            self._consumer.commit_async(request, callback=lambda _, result: self._committed(offsets, result))
            return
        try:
            self._consumer.commit(request)
        except (CommitFailedError, KafkaError) as exc:
            log.warning("offset commit failed (records will be redelivered): %s", exc)
            return
        self.tracker.mark_committed(offsets)

    def _committed(self, offsets: dict[tuple[str, int], int], result: object) -> None:
        if isinstance(result, Exception):
            log.warning("offset commit failed (records will be redelivered): %s", result)
        else:
            self.tracker.mark_committed(offsets)

    # --- request / reply -------------------------------------------------------------------

    def reply_listener(self, topic: str) -> KafkaReplyListener:
        return KafkaReplyListener(self._new_consumer(None), topic, self.settings.request_timeout_ms / 1000)

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._commit()
            finally:
                self._consumer.close(autocommit=False)
                self._consumer = None
        if self._producer is not None:
            self._producer.flush()
            self._producer.close()
            self._producer = None


class KafkaReplyListener:
    """Reads every partition of a reply topic from its end *at creation time*, without a group.

    The end offsets are taken before the request is sent. On a broker that reports end offsets
    too low (the embedded tansu does, after batched produce) this reads a little more history,
    which the correlation filter discards -- it can never skip a reply.
    """

    def __init__(self, consumer: KafkaConsumer, topic: str, timeout_s: float) -> None:
        self._consumer = consumer
        tps = [TopicPartition(topic, p) for p in _partitions_for(consumer, topic, timeout_s)]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        for tp in tps:
            consumer.position(tp)  # resolve now, not lazily after the request went out

    def poll(self, timeout_s: float) -> list[Message]:
        records = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        return [Message(topic=r.topic, value=r.value or b"", key=r.key,
                        headers=_headers(r.headers), partition=r.partition,
                        offset=r.offset, timestamp_ms=r.timestamp, position=f"{r.topic}/{r.partition}/{r.offset}")
                for batch in records.values() for r in batch]

    def close(self) -> None:
        self._consumer.close(autocommit=False)


def _headers(headers: list[tuple[str, bytes | None]] | None) -> HeaderList:
    """A record's headers with null values as empty bytes; kafka-python's own list when it has none (the usual
    case: no copy per record)."""
    if not headers:
        return []
    if any(v is None for _, v in headers):
        return [(k, v if v is not None else b"") for k, v in headers]
    return headers  # type: ignore[return-value]


def _partitions_for(consumer: KafkaConsumer, topic: str, timeout_s: float) -> list[int]:
    """The topic's partition ids, waiting for metadata; a missing topic is an error, not a hang."""
    partitions = Retrying(retry=retry_if_result(lambda found: not found), stop=stop_after_delay(timeout_s),
                          wait=wait_fixed(0.1), retry_error_callback=lambda _: None)(consumer.partitions_for_topic,
                                                                                     topic)
    if not partitions:
        raise KafkaError(f"topic {topic!r} does not exist (or has no partitions)")
    return sorted(partitions)
