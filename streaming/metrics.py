"""The bridge's Prometheus metrics and its small health/metrics HTTP endpoint.

Served by a few lines of ``asyncio`` rather than ``prometheus_client.start_http_server`` so it
runs on the bridge's own event loop (no extra thread) and can answer health probes with the
bridge's real state: ``/healthz`` (liveness: the loop is turning), ``/readyz`` (consuming: not
starting, draining, or failing, which means polls keep failing or a message could be neither
answered nor dead-lettered) and ``/metrics`` (Prometheus text format). Each bridge has its own
registry, so tests can run several in one process.

Names follow the server's convention (:mod:`predictors.protocol.observability`): ``kcp_bridge_``
prefix, ``*_seconds`` histograms, ``*_total`` counters, and the same label names (``model``;
``topic``/``partition`` for the consumer lag).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from streaming.logs import use_json_logs

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 2.0
"""How often the lag is measured: often enough for a 1 s scrape to follow it, rarely enough that the broker
round trip it may take (when no fetch has reported an end offset yet) stays out of the consume loop's way."""


class BridgeMetrics:
    """Counters and histograms the bridge updates; names are ``kcp_bridge_*``."""

    def __init__(self, protocol: str = "grpc") -> None:
        self.protocol = protocol  # how the bridge calls the model server: the server's ``protocol`` label values
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter("kcp_bridge_consumed", "Request messages consumed", registry=r)
        self.produced = Counter("kcp_bridge_produced", "Result messages produced and acknowledged",
                                ["model", "version"], registry=r)
        self.dead_lettered = Counter("kcp_bridge_dead_lettered", "Messages sent to the dead-letter topic",
                                     ["kind"], registry=r)
        self.refused = Counter("kcp_bridge_refused", "Pushed deliveries answered 503 (model server or broker "
                               "unavailable until the deadline, or stopping): the sender delivers them again",
                               registry=r)
        self.retries = Counter("kcp_bridge_retries", "Retried calls (model server or broker)", ["target"],
                               registry=r)
        self.latency = Histogram("kcp_bridge_latency_seconds", "Consume to acknowledged result",
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                                 registry=r)
        # model: one that answered at least once, else "other" (message strings must not create series)
        self.v2_latency = Histogram("kcp_bridge_v2_call_seconds", "Model server call time (with retries)",
                                    ["model", "version", "protocol"], registry=r)
        self.batch_size = Histogram("kcp_bridge_batch_size", "Requests merged per model server call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.pending = Gauge("kcp_bridge_pending", "Messages consumed but not yet acknowledged", registry=r)
        self.in_flight = Gauge("kcp_bridge_in_flight_calls", "Model server calls in progress", registry=r)
        self.consumer_lag = Gauge("kcp_bridge_consumer_lag", "Records of an assigned request partition not fetched "
                                  "yet: the broker's end offset minus the consumer's position",
                                  ["topic", "partition"], registry=r)
        self.stranded = Gauge("kcp_bridge_stranded", "Messages whose dead letter the broker refused too: left "
                                                     "unacknowledged until a restart", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def measuring_lag(self, source: Any, interval_s: float = LAG_INTERVAL_S) -> Callable[..., Any]:
        """``source.receive``, which also refreshes ``kcp_bridge_consumer_lag`` at most every ``interval_s``.

        It runs where ``receive`` runs, on the consumer thread: kafka-python's consumer is not thread-safe, so the
        lag cannot be read from the metrics endpoint. A source without a Kafka consumer (Pub/Sub) exports no lag.
        """
        receive = source.receive
        lag = ConsumerLag(self.consumer_lag)

        def receive_measuring(*args: Any, **kwargs: Any) -> Any:
            messages = receive(*args, **kwargs)
            now = time.monotonic()
            if now >= lag.next_at:
                lag.next_at = now + interval_s
                lag.update(kafka_consumer(source))
            return messages

        return receive_measuring


def kafka_consumer(source: Any) -> Any:
    """The kafka-python consumer behind a :class:`~streaming.messenger.Messenger`, or None (another backend, or not
    subscribed yet)."""
    return getattr(getattr(source, "_client", None), "_consumer", None)


class ConsumerLag:
    """Sets the lag gauge from one consumer: per assigned partition, the end offset (the highwater mark the last
    fetch reported, else asked of the broker) minus the position, never below zero. Partitions no longer
    assigned lose their series, so a rebalance does not leave stale lag behind."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self.next_at = 0.0
        self._series: set[tuple[str, str]] = set()

    def update(self, consumer: Any) -> None:
        if consumer is None:
            return
        try:
            assigned = list(consumer.assignment())
            ends = {tp: consumer.highwater(tp) for tp in assigned}
            unknown = [tp for tp, end in ends.items() if end is None]
            if unknown:
                ends.update(consumer.end_offsets(unknown))
            lags = {(tp.topic, str(tp.partition)): max(0, int(ends[tp]) - int(consumer.position(tp, timeout_ms=1000)))
                    for tp in assigned if ends.get(tp) is not None}
        except Exception as exc:  # a metric must never fail the consume loop; the next attempt may succeed
            log.debug("measuring the consumer lag failed: %s", exc)
            return
        for gone in self._series - lags.keys():
            self.gauge.remove(*gone)
        for key, value in lags.items():
            self.gauge.labels(*key).set(value)
        self._series = set(lags)


class HealthServer:
    """``GET /healthz``, ``/readyz``, ``/metrics`` on the running event loop."""

    def __init__(self, metrics: BridgeMetrics, state: Callable[[], str], host: str, port: int,
                 details: Callable[[], dict[str, Any]] | None = None) -> None:
        self.metrics = metrics
        self.state = state
        self.details = details or dict
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        use_json_logs()  # KCP_LOG_FORMAT: logging is configured by now, whatever imported this module first
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while await asyncio.wait_for(reader.readline(), timeout=5) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            status, body, ctype = self._route(parts[0] if parts else "", path)
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[str, bytes, str]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"", "text/plain"
        state = self.state()
        if path == "/metrics":
            return "200 OK", self.metrics.render(), CONTENT_TYPE_LATEST
        if path in ("/healthz", "/livez"):
            ok = state != "stopped"
        elif path == "/readyz":
            ok = state == "running"
        else:
            return "404 Not Found", b"not found\n", "text/plain"
        body = json.dumps({"status": state, **self.details()}).encode() + b"\n"
        return ("200 OK" if ok else "503 Service Unavailable"), body, "application/json"
