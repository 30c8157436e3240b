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
* **Bad messages never block.** Decoding failures and 4xx rejections become dead-letter records
  (original value, key and headers, plus ``kcp-dlq-*`` headers with the reason) and are
  acknowledged like results. A batch the server rejects is retried one request at a time, so one
  bad request does not dead-letter its neighbours.
* **Outages are waited out.** Connection refused / UNAVAILABLE / 503 are retried with backoff
  forever (:mod:`streaming.v2client`); the messages stay pending, the consumer pauses its
  partitions once ``max_pending`` are waiting, and keeps its group membership meanwhile.
* **The event loop never blocks.** kafka-python is synchronous: every consumer call runs on one
  dedicated thread (the consumer is not thread-safe), producer sends on a small pool; V2 calls
  use grpc.aio / httpx's async client.
* **Graceful stop.** SIGTERM stops polling, flushes partial batches, waits up to
  ``drain_timeout_s`` for in-flight work, commits and leaves the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from streaming.batching import MicroBatcher
from streaming.cloudevents import CloudEvent, now, to_kafka_headers
from streaming.messages import BadMessage, DecodedRequest, DecodeOptions, decode
from streaming.messenger import CORRELATION_HEADER, HeaderList, Message, Messenger
from streaming.metrics import BridgeMetrics, HealthServer
from streaming.settings import BridgeSettings
from streaming.tensors import BatchSplitError, InferResponse, merge, split
from streaming.v2client import V2Client, V2Error

log = logging.getLogger(__name__)
R = TypeVar("R")

RESULT_TYPE = "org.kcp.inference.result"
DLQ_PREFIX = "kcp-dlq-"


@dataclass
class Work:
    """One decoded message on its way through the bridge."""

    message: Message
    decoded: DecodedRequest
    received: float


class Bridge:
    """Consume requests, call the model server over V2, publish results; see the module docstring."""

    def __init__(self, settings: BridgeSettings | None = None, *, source: Messenger | None = None,
                 sink: Messenger | None = None, client: V2Client | None = None) -> None:
        self.settings = s = settings or BridgeSettings()
        self.metrics = BridgeMetrics()
        self.source = source or Messenger(s.request_topic, group=s.group, settings=s.messenger())
        self.sink = sink or Messenger(s.result_topic, settings=s.messenger())
        self.client = client or V2Client(s.v2, on_retry=self._on_v2_retry)
        if client is not None and client.on_retry is None:
            client.on_retry = self._on_v2_retry
        self.options = DecodeOptions(s.default_row_model, s.default_image_model, s.input_name, s.ids_input,
                                     tuple(s.row_features))
        self.state = "starting"
        self.health_port: int | None = None
        self._consumer_thread = ThreadPoolExecutor(1, thread_name_prefix="kcp-consumer")
        self._producer_threads = ThreadPoolExecutor(4, thread_name_prefix="kcp-producer")
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending = 0
        self._stop: asyncio.Event | None = None
        self._inflight: asyncio.Semaphore | None = None
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
        self._inflight = asyncio.Semaphore(self.settings.max_in_flight)
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        health = HealthServer(self.metrics, lambda: self.state, self.settings.health_host, self.settings.health_port,
                              lambda: {"assigned": list(self.source.assignment), "pending": self._pending})
        self.health_port = await health.start()
        log.info("health and metrics on http://%s:%d/metrics", self.settings.health_host, self.health_port)
        try:
            await self._consume()
        finally:
            self.state = "draining"
            await self._drain()
            self.state = "stopped"
            await health.close()

    async def _in_consumer(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._consumer_thread, functools.partial(fn, *args))

    async def _consume(self) -> None:
        assert self._stop is not None
        s = self.settings
        log.info("bridge consuming %s (group %s) -> %s, dead letters -> %s, model server via %s",
                 s.request_topic, s.group, s.result_topic, s.dead_letter_topic, s.v2.protocol)
        failures = 0
        while not self._stop.is_set():
            capacity = max(0, min(s.max_pending - self._pending, 500))
            try:
                messages = await self._in_consumer(self.source.receive, s.poll_timeout_ms / 1000, capacity)
            except Exception as exc:  # broker trouble: nothing was handed out, so nothing is lost by waiting
                failures += 1
                self.metrics.retries.labels("broker").inc()
                log.warning("polling %s failed (%s); retrying", s.request_topic, exc)
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                continue
            failures = 0
            self.state = "running"
            for message in messages:
                self._accept(message)

    async def _drain(self) -> None:
        self._batcher.flush_all()
        if self._tasks:
            log.info("draining %d in-flight task(s)", len(self._tasks))
            _, late = await asyncio.wait(set(self._tasks), timeout=self.settings.drain_timeout_s)
            for task in late:
                task.cancel()
            if late:
                log.warning("%d task(s) did not finish in %.0fs; their messages stay uncommitted",
                            len(late), self.settings.drain_timeout_s)
                await asyncio.gather(*late, return_exceptions=True)
        try:
            await self._in_consumer(self.source.close)  # commits acknowledged offsets, leaves the group
        except Exception:  # uncommitted work is redelivered, which is safe
            log.exception("closing the consumer failed")
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
        self._pending += 1
        self.metrics.consumed.inc()
        self.metrics.pending.set(self._pending)
        received = time.monotonic()
        try:
            decoded = decode(message, self.options)
        except BadMessage as exc:
            self._spawn(self._dead_letter(message, exc.kind, exc.reason, None, received))
            return
        except Exception as exc:  # a decoder bug must not stop the stream
            log.exception("decoding %s failed unexpectedly", message.position)
            self._spawn(self._dead_letter(message, "internal", repr(exc), None, received))
            return
        work = Work(message, decoded, received)
        self._batcher.add(decoded.request.batch_key(), work)

    def _on_batch(self, works: list[Work]) -> None:
        self._spawn(self._process(works))

    async def _process(self, works: list[Work]) -> None:
        assert self._inflight is not None
        model = works[0].decoded.request.model_name
        try:
            async with self._inflight:
                self.metrics.in_flight.inc()
                started = time.monotonic()
                try:
                    outcomes = await self._infer(works)
                finally:
                    self.metrics.in_flight.dec()
                    self.metrics.v2_latency.labels(model).observe(time.monotonic() - started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one batch take the bridge down
            log.exception("inference for %d request(s) failed unexpectedly", len(works))
            outcomes = [V2Error("internal", 500, repr(exc))] * len(works)
        await asyncio.gather(*(self._finish(w, o) for w, o in zip(works, outcomes, strict=True)))

    async def _infer(self, works: list[Work]) -> list[InferResponse | V2Error]:
        requests = [w.decoded.request for w in works]
        if len(requests) == 1:
            return [await self._infer_one(requests[0])]
        self.metrics.batch_size.observe(len(requests))
        try:
            return list(split(await self.client.infer(merge(requests)), requests))
        except (V2Error, BatchSplitError) as exc:
            # One bad request fails the whole merged call: retry individually so only it is rejected.
            log.info("batch of %d for %s failed (%s); retrying one by one", len(requests), requests[0].model_name, exc)
        return list(await asyncio.gather(*(self._infer_one(r) for r in requests)))

    async def _infer_one(self, request: Any) -> InferResponse | V2Error:
        self.metrics.batch_size.observe(1)
        try:
            return await self.client.infer(request)
        except V2Error as exc:
            return exc

    async def _finish(self, work: Work, outcome: InferResponse | V2Error) -> None:
        if isinstance(outcome, V2Error):
            kind = "rejected" if outcome.kind == "rejected" else outcome.kind
            await self._dead_letter(work.message, kind, str(outcome), outcome.status, work.received)
            return
        d = work.decoded
        try:
            value, headers = self.result_record(d, outcome, work.message)
        except Exception as exc:  # an unencodable response must not leave the message unacknowledged
            log.exception("building the result for %s failed", work.message.position)
            await self._dead_letter(work.message, "internal", repr(exc), None, work.received)
            return
        await self._produce(self.settings.result_topic, value, d.request_id, headers)
        self.metrics.produced.labels(d.request.model_name).inc()
        self._done(work.message, work.received)

    async def _dead_letter(self, message: Message, kind: str, reason: str, status: int | None,
                           received: float) -> None:
        log.warning("dead-lettering %s (%s): %s", message.position, kind, reason)
        headers = list(message.headers) + dead_letter_headers(message, kind, reason, status)
        await self._produce(self.settings.dead_letter_topic, message.value, message.key, headers)
        self.metrics.dead_lettered.labels(kind).inc()
        self._done(message, received)

    def _done(self, message: Message, received: float) -> None:
        self.source.ack(message)
        self._pending -= 1
        self.metrics.pending.set(self._pending)
        self.metrics.latency.observe(time.monotonic() - received)

    async def _produce(self, topic: str, value: bytes, key: bytes | str | None, headers: HeaderList) -> None:
        """Send and wait for the broker's ack, retrying (with backoff) until it succeeds or we are cancelled."""
        loop = asyncio.get_running_loop()
        delay = 0.2
        while True:
            try:
                future = await loop.run_in_executor(
                    self._producer_threads,
                    functools.partial(self.sink.send_async, value, key=key, headers=headers, topic=topic))
                await asyncio.wrap_future(future)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker trouble: keep the message, try again
                self.metrics.retries.labels("broker").inc()
                log.warning("producing to %s failed (%s); retrying in %.1fs", topic, exc, delay)
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, 5.0)

    def _on_v2_retry(self, error: V2Error) -> None:
        self.metrics.retries.labels("model-server").inc()
        log.warning("model server call failed (%s); retrying", error)

    # --- record formats --------------------------------------------------------------------

    def result_record(self, d: DecodedRequest, response: InferResponse, source: Message) -> tuple[bytes, HeaderList]:
        """The result value (JSON) and headers (CloudEvents binary mode + correlation)."""
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
        extensions = {"correlationid": d.correlation_id, "modelversion": version or ""}
        if d.cloudevent is not None:
            for name in ("traceparent", "tracestate"):
                if name in d.cloudevent.extensions:
                    extensions[name] = d.cloudevent.extensions[name]
        event = CloudEvent(id=d.request_id, source=self.settings.cloudevents_source, type=RESULT_TYPE,
                           subject=model, time=now(), datacontenttype="application/json",
                           extensions={k: v for k, v in extensions.items() if v})
        headers = [*to_kafka_headers(event), (CORRELATION_HEADER, d.correlation_id.encode()),
                   ("kcp-model", model.encode())]
        if version:
            headers.append(("kcp-model-version", version.encode()))
        return json.dumps(body, separators=(",", ":"), default=str).encode(), headers


def dead_letter_headers(message: Message, kind: str, reason: str, status: int | None) -> HeaderList:
    """``kcp-dlq-*`` headers added to the original ones (the original CloudEvent stays intact)."""
    headers = [(f"{DLQ_PREFIX}kind", kind), (f"{DLQ_PREFIX}reason", reason[:4000]),
               (f"{DLQ_PREFIX}source-topic", message.topic), (f"{DLQ_PREFIX}position", message.position),
               (f"{DLQ_PREFIX}time", now())]
    if message.partition is not None:
        headers.append((f"{DLQ_PREFIX}source-partition", str(message.partition)))
    if message.offset is not None:
        headers.append((f"{DLQ_PREFIX}source-offset", str(message.offset)))
    if status is not None:
        headers.append((f"{DLQ_PREFIX}status", str(status)))
    return [(k, v.encode("utf-8")) for k, v in headers]


def run_bridge(settings: BridgeSettings) -> None:
    """Blocking entry point used by ``python -m streaming bridge``."""
    bridge = Bridge(settings)
    asyncio.run(bridge.run(install_signal_handlers=True))
