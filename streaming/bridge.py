"""The bridge: request topic -> V2 model server -> results topic, at least once, never blocked.

Flow of one message::

    poll (consumer thread) -> decode -> micro-batch per model -> V2 call (bounded concurrency,
    retries) -> produce result | dead letter -> wait for the broker's ack -> ack the message
    -> (consumer thread) commit the contiguous acknowledged offsets

Guarantees and why they hold:

* **No loss.** A message is acknowledged only after its result or dead-letter record was acked
  by the broker, and Kafka offsets are committed only over contiguous acknowledged runs
  (:mod:`streaming.offsets`). SIGKILL at any moment leaves every unfinished message uncommitted,
  so the next bridge in the group gets it again. Duplicates are limited to that window and carry
  the same request id (key, ``kcp-correlation-id``, CloudEvent ``id``).
* **Bad messages never block.** Decoding failures, 4xx rejections, requests too large for the
  server on their own, calls that keep exceeding their deadline and results the broker refuses
  become dead-letter records (original value, key and headers, plus ``kcp-dlq-*`` headers with the
  reason) and are acknowledged like results. A dead letter the broker refuses too is sent cut to
  the broker's limit (value truncated, ``kcp-dlq-truncated`` marking it, original headers dropped,
  a key over 256 bytes replaced by its SHA-256). A merged call stays under ``max_call_bytes`` and
  under the model's row limit (read from its V2 metadata, else ``max_batch_rows``); one the server
  refuses anyway is retried one request at a time, so one bad request does not dead-letter its
  neighbours. Any exception while finishing a message ends in a minimal dead letter and its
  acknowledgement, never in a task that died silently.
* **Every message has a deadline.** ``message_deadline_s`` after it was consumed, a call or result
  send still being retried is given up and the message dead-lettered (kind ``deadline``, or
  ``unpublishable-result`` for a result the broker would not take). A dead letter gets
  ``dead_letter_timeout_s`` of its own; if even the minimal one is refused or keeps failing, the
  message is *not* acknowledged (it is delivered again after a restart: never lost silently), it
  is counted in ``kcp_bridge_stranded`` and ``/readyz`` answers 503 ("failing"). Its minimal dead
  letter is tried again every ``dead_letter_timeout_s``; once the broker takes it the message is
  acknowledged and readiness returns. Meanwhile the bridge takes at most ``STRANDED_BACKLOG`` more
  messages (on Kafka every one finished behind the stranded offset stays tracked until then).
* **Outages are waited out, within the deadline.** Connection refused / UNAVAILABLE / 503 and
  transient broker errors are retried with capped backoff (:mod:`streaming.v2client`); the messages
  stay pending, and the consumer pauses its partitions once ``max_pending`` messages or
  ``max_pending_bytes`` of their decoded size are waiting, keeping its group membership meanwhile.
  The budget counts what a message keeps alive once decoded (its value plus its tensors as Python
  lists, several times the raw bytes for JSON numbers), so the default fits a 512 Mi pod.
* **Bounded by what it serves, not by what messages say.** Per-model metric labels are the models
  and versions that answered (at most ``max_model_labels`` pairs), any other is "other" with no version; per-model
  routes are bounded and evicted (:class:`~streaming.v2client.PerModelTransport`).
* **The event loop never blocks.** kafka-python is synchronous: every consumer call runs on one
  dedicated thread (the consumer is not thread-safe), producer sends on a small pool; V2 calls
  use grpc.aio / httpx's async client.
* **Graceful stop.** SIGTERM stops polling, flushes partial batches, waits up to
  ``drain_timeout_s`` for in-flight work, commits and leaves the group.
* **Pushed records, same contract.** With ``source="http"`` a Knative KafkaSource consumes the
  request topic and delivers each record as a CloudEvent (:mod:`streaming.http_source`): the same
  decoding, model call, results and dead letters follow, and the delivery is answered 200 once
  they are acknowledged. What would wait for a restart here -- a message whose model call ran out
  of its deadline during an outage, a result or dead letter the broker would not take in time --
  is answered 503 instead, so the KafkaSource delivers it again and, after its retries, to its own
  dead-letter sink. Nothing is committed here: the KafkaSource commits what was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from streaming.batching import MicroBatcher
from streaming.cloudevents import SPEC_VERSION, now
from streaming.http_source import HttpSource
from streaming.logs import TRACEPARENT, TRACEPARENT_HEADER, traceparent
from streaming.messages import BadMessage, DecodedRequest, DecodeOptions, decode
from streaming.messenger import CORRELATION_HEADER, HeaderList, Message, Messenger, PermanentSendError, Record
from streaming.metrics import BridgeMetrics, HealthServer
from streaming.retrying import HalfJitterBackoff, retry_after
from streaming.settings import BridgeSettings
from streaming.tensors import BatchSplitError, InferRequest, InferResponse, merge, split
from streaming.v2client import V2Client, V2Error

log = logging.getLogger(__name__)
R = TypeVar("R")

RESULT_TYPE = "org.kcp.inference.result"
DLQ_PREFIX = "kcp-dlq-"
MAX_REASON_BYTES = 1000  # a header value Pub/Sub accepts (1,024 bytes) with room to spare
MAX_KEY_BYTES = 256
RECORD_MARGIN = 1024  # record framing beyond value, key and headers, generously
FAILURES_NOT_READY = 5  # consecutive failed polls, or sends, after which /readyz answers 503 until one succeeds
STRANDED_BACKLOG = 100_000  # messages taken while one is stranded (~100 bytes of offset tracking each), then none
GC_YOUNG_THRESHOLD = 50_000  # net allocations between young-generation collections (Python's default: 700)


# How many times its raw size a message may occupy once decoded: a JSON number of two to four characters
# becomes an 8-byte list slot plus (for a float) a 24-byte object; the raw value stays alive beside it.
DECODED_EXPANSION = 10
ELEMENT_COST = 32  # list slot + float object (small ints are shared, so this over-counts them: the safe side)
BYTES_ELEMENT_COST = 40  # list slot + bytes/str object header


class SendGivenUp(Exception):
    """A record kept failing transiently until its time ran out."""


def _broker_trouble(exc: BaseException) -> bool:
    """A failed send worth trying again: not a refusal, not the end of its time, not a cancellation."""
    return isinstance(exc, Exception) and not isinstance(exc, PermanentSendError | SendGivenUp)


@dataclass
class Work:
    """One consumed message on its way through the bridge (``decoded`` is None for a bad one).

    ``weight`` is what the message holds in memory (raw value plus its decoded tensors), the unit of the
    pending-bytes budget; ``deadline`` (``time.monotonic()``) is when it is given up and dead-lettered."""

    message: Message
    decoded: DecodedRequest | None
    received: float
    deadline: float = 0.0
    weight: int = 0
    done: bool = False
    version: str = ""  # the model version that answered it (a metric label)


def decoded_bytes(decoded: DecodedRequest) -> int:
    """About how much memory a decoded request keeps alive beyond its raw value (its tensors, as Python lists)."""
    total = 0
    for t in decoded.request.inputs:
        if t.datatype == "BYTES":
            total += sum(BYTES_ELEMENT_COST + len(v) for v in t.data)
        else:
            total += ELEMENT_COST * len(t.data)
    return total


class Bridge:
    """Consume requests, call the model server over V2, publish results; see the module docstring."""

    def __init__(self, settings: BridgeSettings | None = None, *, source: Messenger | None = None,
                 sink: Messenger | None = None, client: V2Client | None = None) -> None:
        self.settings = s = settings or BridgeSettings()
        self.metrics = BridgeMetrics(s.v2.protocol)
        # source "http": records arrive as CloudEvents pushed by a Knative KafkaSource; what comes after is the same
        self.receiver: HttpSource | None = None
        if source is None and s.source == "http":
            self.receiver = HttpSource(s.request_topic, s.http_host, s.http_port, max_body_bytes=s.http_max_body_bytes,
                                       max_held=s.max_pending, max_held_bytes=s.max_pending_bytes // DECODED_EXPANSION)
            source = Messenger(s.request_topic, settings=s.messenger(), client=self.receiver)
        self.source = source or Messenger(s.request_topic, group=s.group, settings=s.messenger())
        self.sink = sink or Messenger(s.result_topic, settings=s.messenger())
        self.client = client or V2Client(s.v2, on_retry=self._on_v2_retry)
        if client is not None and client.on_retry is None:
            client.on_retry = self._on_v2_retry
        self.options = DecodeOptions(s.default_row_model, s.default_image_model, s.input_name, s.ids_input,
                                     tuple(s.row_features), s.max_id_chars)
        if s.backend == "kafka" and s.kafka.acks == "1":
            log.warning("KCP_KAFKA_ACKS=1: a result acknowledged by the partition leader alone is lost if the "
                        "leader fails before replicating it, after its request was committed; use 'all'")
        self.state = "starting"
        self.health_port: int | None = None
        self._consumer_thread = ThreadPoolExecutor(1, thread_name_prefix="kcp-consumer")
        self._producer_threads = ThreadPoolExecutor(4, thread_name_prefix="kcp-producer")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending = 0
        self._pending_bytes = 0
        self._produced_by_model: dict[tuple[str, str], Any] = {}
        self._model_labels: set[tuple[str, str]] = set()  # (model, version) that answered: the only label values
        # messages whose dead letter the broker refused too: never acknowledged, their dead letter tried again now
        # and then; meanwhile the bridge takes at most STRANDED_BACKLOG more messages (on Kafka each one finished
        # behind a stranded offset stays tracked until that offset is acknowledged)
        self._stranded: list[Work] = []
        self._taken_while_stranded = 0
        self._stranded_task: asyncio.Task[None] | None = None
        self._poll_failures = 0
        self._send_failures = 0  # consecutive failed produce attempts, reset by any acknowledged send
        self._result_fixed: HeaderList | None = None
        self._stop: asyncio.Event | None = None
        # Batches wait here for one of max_in_flight workers (an asyncio.Semaphore with hundreds of
        # waiters costs O(waiters) per acquire on Python 3.11: a burst made that the bridge's top frame).
        self._batches: asyncio.Queue[list[Work]] | None = None
        # Backpressure resumes once a batch's worth of messages finished, not at every single one.
        self._refill = max(1, min(s.max_batch_size, s.max_pending // 4))
        self._room = asyncio.Event()
        self._batcher: MicroBatcher[Work] = MicroBatcher(s.max_batch_size, s.max_batch_delay_ms / 1000,
                                                         self._on_batch)

    # --- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return (safe from a signal handler on the loop)."""
        if self._stop is not None:
            self._stop.set()

    async def run(self, *, install_signal_handlers: bool = False) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT when ``install_signal_handlers``)."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._batches = batches = asyncio.Queue()
        workers = [loop.create_task(self._call_worker(batches)) for _ in range(self.settings.max_in_flight)]
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        health = HealthServer(self.metrics, lambda: self.state, self.settings.health_host, self.settings.health_port,
                              lambda: {"assigned": list(self.source.assignment), "pending": self._pending,
                                      "pending_bytes": self._pending_bytes, "stranded": len(self._stranded)})
        self.health_port = await health.start()
        log.info("health and metrics on http://%s:%d/metrics", self.settings.health_host, self.health_port)
        if self.receiver is not None:
            await self.receiver.start()
            log.info("receiving CloudEvents on %s", self.receiver.assigned[0])
        try:
            await self._consume()
        finally:
            self.state = "draining"
            await self._drain(batches, workers)
            self.state = "stopped"
            await health.close()

    async def _in_consumer(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._consumer_thread, functools.partial(fn, *args))

    async def _consume(self) -> None:
        assert self._stop is not None
        s = self.settings
        log.info("bridge consuming %s (%s) -> %s, dead letters -> %s, model server via %s", s.request_topic,
                 "pushed over HTTP" if self.receiver else f"group {s.group}", s.result_topic, s.dead_letter_topic,
                 s.v2.protocol)
        failures = 0
        receive = self.metrics.measuring_lag(self.source)  # source.receive, also measuring the lag
        while not self._stop.is_set():
            room = s.max_pending_bytes - self._pending_bytes
            capacity = max(0, min(s.max_pending - self._pending, 500)) if room > 0 else 0
            if self._stranded and self._taken_while_stranded >= STRANDED_BACKLOG:
                capacity = room = 0  # stopped until the stranded messages are dead-lettered (or a restart)
            if capacity < self._refill and self._pending:
                # Full: wait on the loop for a batch's worth of room rather than in a paused poll, which would
                # hold the consumer thread for poll_timeout and drop what was fetched for the paused partitions.
                if await self._room_or_timeout(s.poll_timeout_ms / 1000):
                    continue
                capacity = 0  # still full: a paused poll keeps the group membership and serves rebalances
            try:
                # room counts decoded size: the raw bytes handed out may grow DECODED_EXPANSION times
                messages = await self._in_consumer(receive, s.poll_timeout_ms / 1000, capacity,
                                                   max(1, room // DECODED_EXPANSION))
            except Exception as exc:  # broker trouble: nothing was handed out, so nothing is lost by waiting
                failures += 1
                self._poll_failures = failures
                self.metrics.retries.labels("broker").inc()
                log.warning("polling %s failed (%s); retrying", s.request_topic, exc)
                self._update_state()
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                continue
            failures = self._poll_failures = 0
            if self.state == "starting":
                # What is alive now (modules, clients, settings) lives as long as the bridge: keep it out of the
                # cyclic GC's full collections, which would scan all of it again and pause the loop each time.
                # Refcounting still frees these objects; only cycles among them would stay.
                gc.freeze()
                self.state = "running"
            self._update_state()
            if messages:
                self._taken_while_stranded += len(messages)
                self.metrics.consumed.inc(len(messages))
                for message in messages:
                    self._accept(message)
                if len(messages) < capacity:
                    # What was fetched is drained: nothing more arrives before the next fetch returns, so
                    # waiting max_batch_delay_ms could not grow these batches, only delay them.
                    self._batcher.flush_all()
                self.metrics.pending.set(self._pending)

    def _update_state(self) -> None:
        """``running`` or ``failing`` (not ready): failing while polls or sends keep failing (a missing topic, a
        denied write), or once a message is stranded."""
        if self.state not in ("running", "failing"):
            return
        failing = (bool(self._stranded) or self._poll_failures >= FAILURES_NOT_READY
                   or self._send_failures >= FAILURES_NOT_READY)
        self.state = "failing" if failing else "running"

    def _has_room(self) -> bool:
        s = self.settings
        if self._stranded and self._taken_while_stranded >= STRANDED_BACKLOG:
            return False
        return (s.max_pending - self._pending >= self._refill or not self._pending) \
            and self._pending_bytes < s.max_pending_bytes

    async def _room_or_timeout(self, timeout_s: float) -> bool:
        """Wait until :meth:`_done` made room; False if ``timeout_s`` passed first (or on stop)."""
        assert self._stop is not None
        self._room.clear()
        if self._has_room():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), timeout_s)
        return self._room.is_set() and not self._stop.is_set()

    async def _drain(self, batches: asyncio.Queue[list[Work]], workers: list[asyncio.Task[None]]) -> None:
        if self.receiver is not None:
            self.receiver.stop_accepting()
        if self._stranded_task is not None:
            self._stranded_task.cancel()
        self._batcher.flush_all()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout_s
        log.info("draining %d batch(es) and %d task(s)", batches.qsize(), len(self._tasks))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(batches.join(), timeout=self.settings.drain_timeout_s)
        for worker in workers:  # calls still running past the drain timeout are abandoned: never committed
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - loop.time()))
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)
        if self._pending:
            log.warning("%d message(s) did not finish in %.0fs; they stay uncommitted",
                        self._pending, self.settings.drain_timeout_s)
        try:
            await self._in_consumer(self.source.close)  # commits acknowledged offsets, leaves the group
        except Exception:  # uncommitted work is redelivered, which is safe
            log.exception("closing the consumer failed")
        if self.receiver is not None:  # what did not finish is answered 503: the sender delivers it again
            await self.receiver.aclose()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await loop.run_in_executor(self._producer_threads, self.sink.close)
        await self.client.close()
        self._consumer_thread.shutdown(wait=False)
        self._producer_threads.shutdown(wait=False)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- per message -----------------------------------------------------------------------

    def _accept(self, message: Message) -> None:
        received = time.monotonic()
        work = Work(message, None, received, received + self.settings.message_deadline_s, len(message.value))
        self._pending += 1
        try:
            work.decoded = decode(message, self.options)
            work.weight += decoded_bytes(work.decoded)
        except BadMessage as exc:
            self._pending_bytes += work.weight
            self._spawn(self._guarded(work, self._dead_letter(work, exc.kind, exc.reason, None)))
            return
        except Exception as exc:  # a decoder bug must not stop the stream
            self._pending_bytes += work.weight
            log.exception("decoding %s failed unexpectedly", message.position)
            self._spawn(self._guarded(work, self._dead_letter(work, "internal", repr(exc), None)))
            return
        self._pending_bytes += work.weight
        self._batcher.add(work.decoded.request.batch_key(), work)

    def _on_batch(self, works: list[Work]) -> None:
        assert self._batches is not None
        self._batches.put_nowait(works)

    async def _call_worker(self, batches: asyncio.Queue[list[Work]]) -> None:
        """One of ``max_in_flight``: call the model server for a batch, hand its finishing to a task, repeat."""
        while True:
            works = await batches.get()
            try:
                self._spawn(self._finish_batch(works, await self._call(works)))
            finally:
                batches.task_done()

    async def _call(self, works: list[Work]) -> list[InferResponse | V2Error]:
        requests = [w.decoded.request for w in works if w.decoded is not None]
        model = requests[0].model_name
        self.metrics.in_flight.inc()
        started = time.monotonic()
        outcomes: list[InferResponse | V2Error] = []
        # the trace context the model call carries (streaming.logs): the first message's that has one
        TRACEPARENT.set(next((t for w in works if (t := traceparent(w.message.header(TRACEPARENT_HEADER)))),
                             None))
        try:
            outcomes = await self._infer(requests, min(w.deadline for w in works))
            return outcomes
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one batch take the bridge down
            log.exception("inference for %d request(s) failed unexpectedly", len(works))
            return [V2Error("internal", 500, repr(exc))] * len(works)
        finally:
            self.metrics.in_flight.dec()
            answered = next((o for o in outcomes if isinstance(o, InferResponse)), None)
            version = "" if answered is None else answered.model_version or ""
            if answered is not None:
                self._learn_model(model, version)
            self.metrics.v2_latency.labels(*self._model_labels_of(model, version), self.metrics.protocol).observe(
                time.monotonic() - started)

    def _learn_model(self, model: str, version: str) -> None:
        """A model version that answered becomes a label pair (up to ``max_model_labels`` of them)."""
        if len(self._model_labels) < self.settings.max_model_labels:
            self._model_labels.add((model, version))

    def _model_labels_of(self, model: str, version: str) -> tuple[str, str]:
        """``(model, version)`` if that pair ever answered, else ("other", ""): messages choose model strings
        (and a server's answer its version), labels must stay few."""
        return (model, version) if (model, version) in self._model_labels else ("other", "")

    async def _finish_batch(self, works: list[Work], outcomes: list[InferResponse | V2Error]) -> None:
        try:
            await self._finish_all(works, outcomes)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave the batch's messages unfinished for ever
            await asyncio.gather(*(self._guarded(w, _reraise(exc)) for w in works if not w.done))

    def _chunks(self, requests: list[InferRequest], max_rows: int | None = None) -> list[list[InferRequest]]:
        """Consecutive runs whose merged payload stays under ``max_call_bytes`` and ``max_rows`` rows (a request
        over either runs alone)."""
        cap = self.settings.v2.max_call_bytes
        rows_cap = max_rows or sys.maxsize
        chunks: list[list[InferRequest]] = []
        size = cap + 1
        rows = 0
        for r in requests:
            n = r.payload_bytes()
            if size + n > cap or rows + r.rows > rows_cap:
                chunks.append([])
                size = rows = 0
            chunks[-1].append(r)
            size += n
            rows += r.rows
        return chunks

    async def _infer(self, requests: list[InferRequest], deadline: float) -> list[InferResponse | V2Error]:
        first = requests[0]
        limit, published = self.settings.v2.max_batch_rows, False
        if len(requests) > 1 or first.rows > limit:
            limit, published = await self.client.row_limit(first.model_name, first.model_version)
        if len(requests) == 1:
            return [await self._infer_one(first, deadline, limit if published else None)]
        chunks = self._chunks(requests, limit)
        if len(chunks) == 1:  # the usual case: no task per chunk
            return await self._infer_merged(chunks[0], deadline, limit if published else None)
        parts = await asyncio.gather(*(self._infer_merged(c, deadline, limit if published else None)
                                       for c in chunks))
        return [o for part in parts for o in part]

    async def _infer_merged(self, requests: list[InferRequest], deadline: float,
                            limit: int | None) -> list[InferResponse | V2Error]:
        if len(requests) == 1:
            return [await self._infer_one(requests[0], deadline, limit)]
        self.metrics.batch_size.observe(len(requests))
        try:
            return list(split(await self.client.infer(merge(requests), deadline), requests))
        except V2Error as exc:
            if exc.kind == "deadline":  # no time left for one-by-one calls either
                return [exc] * len(requests)
            # One bad (too large, too slow) request fails the whole merged call: retry individually so only it fails.
            log.info("batch of %d for %s failed (%s); retrying one by one", len(requests), requests[0].model_name, exc)
        except BatchSplitError as exc:
            log.info("batch of %d for %s failed (%s); retrying one by one", len(requests), requests[0].model_name, exc)
        return list(await asyncio.gather(*(self._infer_one(r, deadline, limit) for r in requests)))

    async def _infer_one(self, request: InferRequest, deadline: float,
                         limit: int | None = None) -> InferResponse | V2Error:
        """One request alone; refused without a call when it has more rows than its model published."""
        if limit is not None and request.rows > limit:
            return V2Error("too-large", 413, f"{request.rows} rows exceed the limit of {limit} that model "
                                             f"'{request.model_name}' publishes in its metadata")
        self.metrics.batch_size.observe(1)
        try:
            return await self.client.infer(request, deadline)
        except V2Error as exc:
            return exc

    async def _guarded(self, work: Work, finishing: Any) -> None:
        """Run a message's last step; if it raises, a minimal dead letter plus the ack still end it."""
        try:
            await finishing
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("finishing %s failed; sending a minimal dead letter", work.message.position)
            if work.done:
                return
            value, key, headers = cut_dead_letter(work.message, "internal", f"finishing failed: {exc!r}", None, 0)
            try:
                await self._produce(self.settings.dead_letter_topic, value, key, headers,
                                    time.monotonic() + self.settings.dead_letter_timeout_s)
            except (PermanentSendError, SendGivenUp) as refused:
                self._strand(work, refused)
                return
            self.metrics.dead_lettered.labels("internal").inc()
            self._done(work)

    def _strand(self, work: Work, error: BaseException) -> None:
        """Even the minimal dead letter failed: leave the message unacknowledged (a later bridge gets it again),
        never acknowledge what was neither answered nor dead-lettered, and stop reporting ready. Pushed over HTTP,
        the message is refused instead: its sender keeps it and delivers it again."""
        if work.done:
            return
        if self.receiver is not None:
            self._refuse(work, f"its dead letter was refused too: {error}")
            return
        work.done = True  # finished here, but neither acknowledged nor freed: it stays pending until a restart
        if not self._stranded:
            self._taken_while_stranded = 0
            # not one of the drained tasks: a stop must not wait for the broker to change its mind
            self._stranded_task = asyncio.get_running_loop().create_task(self._retry_stranded())
        self._stranded.append(work)
        self.metrics.stranded.set(len(self._stranded))
        log.error("the dead letter for %s was refused too (%s); the message is left unacknowledged (delivered again "
                  "after a restart, its dead letter tried again every %.0fs meanwhile); /readyz now answers 503",
                  work.message.position, error, self.settings.dead_letter_timeout_s)
        self._update_state()

    async def _retry_stranded(self) -> None:
        """Try the stranded messages' minimal dead letters again until the broker takes them (the topic was
        created, the permission granted); each one taken is acknowledged, and readiness returns with the last."""
        while self._stranded:
            await asyncio.sleep(self.settings.dead_letter_timeout_s)
            for work in list(self._stranded):
                value, key, headers = cut_dead_letter(work.message, "internal", "its dead letter was refused at first",
                                                      None, 0)
                try:
                    await self._produce(self.settings.dead_letter_topic, value, key, headers,
                                        time.monotonic() + self.settings.dead_letter_timeout_s)
                except (PermanentSendError, SendGivenUp):
                    continue
                self._stranded.remove(work)
                self.metrics.stranded.set(len(self._stranded))
                self.metrics.dead_lettered.labels("internal").inc()
                work.done = False
                self._done(work)
                log.info("the dead letter for %s was taken at last; the message is acknowledged", work.message.position)
            self._update_state()

    async def _finish_all(self, works: list[Work], outcomes: list[InferResponse | V2Error]) -> None:
        """Publish a batch's results with one hand-off to the producer thread; failures go one by one."""
        stamp = now()  # one timestamp per batch: the results were made together
        ready: list[tuple[Work, bytes, HeaderList]] = []
        slow = []
        for w, o in zip(works, outcomes, strict=True):
            if isinstance(o, V2Error):
                slow.append(self._guarded(w, self._dead_letter(w, o.kind, str(o), o.status)))
                continue
            assert w.decoded is not None
            w.version = o.model_version or ""
            try:
                value, headers = self.result_record(w.decoded, o, w.message, stamp)
            except Exception as exc:  # an unencodable response must not leave the message unacknowledged
                log.exception("building the result for %s failed", w.message.position)
                slow.append(self._guarded(w, self._dead_letter(w, "internal", repr(exc), None)))
                continue
            ready.append((w, value, headers))
        if ready:
            topic = self.settings.result_topic
            errors = await self._send_all(topic, [(v, w.decoded.request_id.encode() if w.decoded else None, h)
                                                  for w, v, h in ready])
            published = []
            for (w, value, headers), error in zip(ready, errors, strict=True):
                if error is None:
                    published.append(w)
                else:
                    slow.append(self._guarded(w, self._publish(w, value, headers, error)))
            self._published_all(published)
        if slow:
            await asyncio.gather(*slow)

    async def _publish(self, work: Work, value: bytes, headers: HeaderList, error: BaseException) -> None:
        """Publish a result whose first send failed: again if that was transient, else dead-letter the request."""
        assert work.decoded is not None
        try:
            if isinstance(error, PermanentSendError):
                raise error
            self.metrics.retries.labels("broker").inc()
            log.warning("producing the result for %s failed (%s); retrying", work.message.position, error)
            await self._produce(self.settings.result_topic, value, work.decoded.request_id, headers, work.deadline)
        except PermanentSendError as exc:
            await self._dead_letter(work, "unpublishable-result", f"the result ({len(value)} bytes) was refused: "
                                                                  f"{exc}", None)
            return
        except SendGivenUp as exc:
            reason = f"the result ({len(value)} bytes) was not taken before the message's deadline: {exc}"
            if self.receiver is not None:  # broker trouble, not the message's fault: the sender delivers it again
                self._refuse(work, reason)
            else:
                await self._dead_letter(work, "unpublishable-result", reason, None)
            return
        self._published(work)

    def _published(self, work: Work) -> None:
        self._published_all([work])

    def _published_all(self, works: list[Work]) -> None:
        """Count a batch's acknowledged results per model version and finish them, one counter update per pair."""
        produced: dict[tuple[str, str], int] = {}
        for w in works:
            assert w.decoded is not None
            key = (w.decoded.request.model_name, w.version)
            produced[key] = produced.get(key, 0) + 1
        for (model, version), n in produced.items():
            self._learn_model(model, version)
            self._produced(self._model_labels_of(model, version)).inc(n)
        self._done_all(works)

    async def _dead_letter(self, work: Work, kind: str, reason: str, status: int | None) -> None:
        message = work.message
        if kind == "deadline" and self.receiver is not None:
            # the model server (or the broker) stayed unavailable: the KafkaSource retries, then dead-letters
            self._refuse(work, reason)
            return
        log.warning("dead-lettering %s (%s): %s", message.position, kind, reason[:MAX_REASON_BYTES])
        headers = list(message.headers) + dead_letter_headers(message, kind, reason, status)
        # a dead letter has its own time, even for a message whose deadline is what ended it
        deadline = time.monotonic() + self.settings.dead_letter_timeout_s
        try:
            await self._produce(self.settings.dead_letter_topic, message.value, message.key, headers, deadline)
        except PermanentSendError as exc:
            log.warning("the dead letter for %s was refused (%s); sending it cut to the limit", message.position, exc)
            await self._produce(self.settings.dead_letter_topic,
                                *cut_dead_letter(message, kind, reason, status, self.sink.max_record_bytes), deadline)
        self.metrics.dead_lettered.labels(kind).inc()
        self._done(work)

    def _done(self, work: Work) -> None:
        self._done_all([work])

    def _refuse(self, work: Work, reason: str) -> None:
        """Source "http": nothing was written for this delivery; answer it 503 so the sender delivers it again
        (and, after its retries, to its own dead-letter sink), and free its room."""
        assert self.receiver is not None
        if work.done:
            return
        work.done = True
        log.warning("refusing %s (the sender delivers it again): %s", work.message.position, reason[:MAX_REASON_BYTES])
        self.receiver.refuse(work.message, reason)
        self.metrics.refused.inc()
        self._free(1, work.weight)

    def _done_all(self, works: list[Work]) -> None:
        """Acknowledge finished work (each once) and free its room, with one update of the pending gauge."""
        finished = freed = 0
        ack, observe, now = self.source.ack, self.metrics.latency.observe, time.monotonic()
        for w in works:
            if w.done:
                continue
            w.done = True
            ack(w.message)
            finished += 1
            freed += w.weight
            observe(now - w.received)
        if finished:
            self._free(finished, freed)

    def _free(self, messages: int, weight: int) -> None:
        """Give back the room of finished messages, with one update of the pending gauge."""
        self._pending -= messages
        self._pending_bytes -= weight
        self.metrics.pending.set(self._pending)
        if not self._room.is_set() and self._has_room():
            self._room.set()

    async def _send_all(self, topic: str, records: list[Record]) -> list[BaseException | None]:
        """Send records in one hop to a producer thread and wait for every broker ack; each one's error or None.

        One wake-up of the loop per batch (the last ack), where a future per record would cost one each."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[list[BaseException | None]] = loop.create_future()

        def done(errors: list[BaseException | None]) -> None:  # on the producer's thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(_settle, waiter, errors)

        await loop.run_in_executor(self._producer_threads, functools.partial(self.sink.send_batch, records, done,
                                                                             topic=topic))
        errors = await waiter
        self._sent(any(e is None or isinstance(e, PermanentSendError) for e in errors))
        return errors

    def _sent(self, ok: bool) -> None:
        """Track whether the broker takes records at all (a refusal of one record is an answer, not trouble)."""
        if ok:
            if self._send_failures:
                self._send_failures = 0
                self._update_state()
        else:
            self._send_failures += 1
            if self._send_failures == FAILURES_NOT_READY:
                log.error("the broker refused %d sends in a row; /readyz answers 503 until one succeeds",
                          FAILURES_NOT_READY)
            self._update_state()

    async def _produce(self, topic: str, value: bytes, key: bytes | str | None, headers: HeaderList,
                       deadline: float) -> None:
        """Send and wait for the broker's ack; transient failures are retried with capped backoff until it
        succeeds, we are cancelled or ``deadline`` passes (:class:`SendGivenUp`); a permanent one raises
        :class:`PermanentSendError` at once."""
        loop = asyncio.get_running_loop()

        async def attempt() -> None:
            try:
                future = await loop.run_in_executor(
                    self._producer_threads,
                    functools.partial(self.sink.send_async, value, key=key, headers=headers, topic=topic))
                await asyncio.wrap_future(future)
            except (asyncio.CancelledError, PermanentSendError):
                raise
            except Exception as exc:  # broker trouble: keep the message, try again
                self._sent(False)
                if deadline - time.monotonic() <= 0:
                    raise SendGivenUp(f"producing to {topic} kept failing: {exc!r}") from exc
                raise
            self._sent(True)

        def retrying(state: RetryCallState) -> None:
            self.metrics.retries.labels("broker").inc()
            log.warning("producing to %s failed (%s); retrying in %.1fs", topic,
                        state.outcome.exception() if state.outcome else None, state.upcoming_sleep)

        try:
            await attempt()
            return
        except Exception as exc:
            first = exc
        await retry_after(first, attempt, AsyncRetrying(
            retry=retry_if_exception(_broker_trouble), before_sleep=retrying, reraise=True,
            wait=HalfJitterBackoff(0.2, 5.0, deadline)))

    def _produced(self, labels: tuple[str, str]) -> Any:
        counter = self._produced_by_model.get(labels)
        if counter is None:
            counter = self._produced_by_model[labels] = self.metrics.produced.labels(*labels)
        return counter

    def _on_v2_retry(self, error: V2Error) -> None:
        self.metrics.retries.labels("model-server").inc()
        log.warning("model server call failed (%s); retrying", error)

    # --- record formats --------------------------------------------------------------------

    def result_record(self, d: DecodedRequest, response: InferResponse, source: Message,
                      stamp: str | None = None) -> tuple[bytes, HeaderList]:
        """The result value (JSON) and headers (CloudEvents binary mode + correlation).

        The headers are those :func:`~streaming.cloudevents.to_kafka_headers` writes for the result event (same
        names, order and values), built directly: the attributes that never change are encoded once."""
        model = response.model_name or d.request.model_name
        version = response.model_version or d.request.model_version
        body: dict[str, Any] = {
            "id": d.request_id,
            "model_name": model,
            "model_version": version,
            "outputs": [t.to_json() for t in response.outputs],
            "form": d.form,
        }
        if d.true_label is not None:
            body["true_label"] = d.true_label
        body.update(d.extra)
        body["source"] = {"topic": source.topic, "partition": source.partition, "offset": source.offset,
                          "position": source.position}
        if self._result_fixed is None:
            self._result_fixed = [("ce_source", self.settings.cloudevents_source.encode()),
                                  ("ce_specversion", SPEC_VERSION.encode()), ("ce_type", RESULT_TYPE.encode()),
                                  ("content-type", b"application/json")]
        correlation = d.correlation_id.encode()
        model_b = model.encode()
        headers = [("ce_id", d.request_id.encode()), *self._result_fixed, ("ce_subject", model_b),
                   ("ce_time", (stamp or now()).encode())]
        if correlation:
            headers.append(("ce_correlationid", correlation))
        version_b = version.encode() if version else b""
        if version_b:
            headers.append(("ce_modelversion", version_b))
        if d.cloudevent is not None:
            extensions = d.cloudevent.extensions
            for name in ("traceparent", "tracestate"):
                if extensions.get(name):
                    headers.append(("ce_" + name, extensions[name].encode()))
        headers += [(CORRELATION_HEADER, correlation), ("kcp-model", model_b)]
        if version_b:
            headers.append(("kcp-model-version", version_b))
        return to_json(body), headers


def to_json(doc: Any) -> bytes:
    """Compact JSON: orjson (several times faster per result), else the standard library for what orjson
    refuses (text holding lone surrogates, integers over 64 bits), which it escapes."""
    try:
        return orjson.dumps(doc, default=str)
    except TypeError:
        return json.dumps(doc, separators=(",", ":"), default=str).encode()


async def _reraise(exc: BaseException) -> None:
    raise exc


def _settle(waiter: asyncio.Future[R], value: R) -> None:
    if not waiter.done():
        waiter.set_result(value)


def _cut(text: str, limit: int) -> bytes:
    """UTF-8 of ``text`` cut to ``limit`` bytes on a character boundary (lone surrogates escaped)."""
    raw = text.encode("utf-8", errors="backslashreplace")
    return raw if len(raw) <= limit else raw[:limit].decode("utf-8", errors="ignore").encode("utf-8")


def dead_letter_headers(message: Message, kind: str, reason: str, status: int | None) -> HeaderList:
    """``kcp-dlq-*`` headers added to the original ones (the original CloudEvent stays intact)."""
    headers = [(f"{DLQ_PREFIX}kind", kind), (f"{DLQ_PREFIX}reason", reason),
               (f"{DLQ_PREFIX}source-topic", message.topic), (f"{DLQ_PREFIX}position", message.position),
               (f"{DLQ_PREFIX}time", now())]
    if message.partition is not None:
        headers.append((f"{DLQ_PREFIX}source-partition", str(message.partition)))
    if message.offset is not None:
        headers.append((f"{DLQ_PREFIX}source-offset", str(message.offset)))
    if status is not None:
        headers.append((f"{DLQ_PREFIX}status", str(status)))
    return [(k, _cut(v, MAX_REASON_BYTES)) for k, v in headers]


def cut_dead_letter(message: Message, kind: str, reason: str, status: int | None,
                    limit: int) -> tuple[bytes, bytes | None, HeaderList]:
    """A dead letter that fits ``limit`` bytes: the original headers dropped, a key over 256 bytes replaced by
    ``sha256:<hex>``, the value truncated; ``kcp-dlq-truncated`` gives the original value and key sizes."""
    key = message.key
    if key is not None and len(key) > MAX_KEY_BYTES:
        key = b"sha256:" + hashlib.sha256(key).hexdigest().encode()
    headers = dead_letter_headers(message, kind, reason, status)
    original = f"value={len(message.value)} key={len(message.key or b'')} headers={len(message.headers)}"
    headers.append((f"{DLQ_PREFIX}truncated", original.encode()))
    room = limit - RECORD_MARGIN - len(key or b"") - sum(len(k) + len(v) for k, v in headers)
    return message.value[:max(0, room)], key, headers


def run_bridge(settings: BridgeSettings) -> None:
    """Blocking entry point used by ``python -m streaming bridge``."""
    # Each message allocates a few dozen container objects (kafka-python records and futures, tensors, dicts) that
    # mostly die young, but with hundreds of messages in flight many live through a young collection, so at
    # Python's default threshold the cyclic GC runs often and promotes them into costly older collections. A
    # higher threshold makes collections rare; cyclic garbage (rare here) waits a little longer, a bounded amount
    # of memory. The process is the bridge's own, so the setting is made here rather than in Bridge.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    bridge = Bridge(settings)
    asyncio.run(bridge.run(install_signal_handlers=True))
