"""Adaptive batching: concurrent requests for one model share one ``predict`` call.

KServe's Python server has no V2 batching. Here each model owns a :class:`Batcher`.
Requests put their (already validated) feature arrays on a queue; one worker task takes
whatever is waiting — up to ``max_batch_size`` rows, waiting at most ``max_latency_ms``
for more once the first arrives — concatenates them, runs the model once in the thread
pool and hands each caller its own slice. Under light load a request waits at most
``max_latency_ms``; under heavy load batches fill up and throughput rises.

A failing batch is retried request by request, so one poisoned request cannot fail its
batch-mates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram

BATCH_ROWS = Histogram(
    "classifier_batch_rows", "Rows per batched model call", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_REQUESTS = Histogram(
    "classifier_batch_requests", "Requests merged into one model call", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
QUEUE_SECONDS = Histogram(
    "classifier_batch_queue_seconds", "Time a request waited for its batch", ["model"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)

PredictFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Merge concurrent ``submit`` calls into batched ``predict_fn`` calls."""

    def __init__(self, model_name: str, predict_fn: PredictFn, max_batch_size: int, max_latency_ms: float) -> None:
        self.model_name = model_name
        self.predict_fn = predict_fn
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self._queue: asyncio.Queue[_Pending | None] | None = None
        self._worker: asyncio.Task | None = None
        self._closed = False

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Predict ``rows`` (a batch of one request), sharing a model call with concurrent requests."""
        if self._closed:  # the model is being unloaded or swapped: finish this request on its own
            return await asyncio.get_running_loop().run_in_executor(None, self.predict_fn, rows)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run(), name=f"batcher-{self.model_name}")
        pending = _Pending(rows, asyncio.get_running_loop().create_future())
        await self._queue.put(pending)
        return await pending.future

    async def _collect(self) -> list[_Pending]:
        """Up to max_batch_size rows of waiting requests; empty once the close sentinel is reached."""
        assert self._queue is not None
        first = await self._queue.get()
        if first is None:
            return []
        batch, rows = [first], len(first.rows)
        deadline = time.perf_counter() + self.max_latency_s
        while rows < self.max_batch_size:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if nxt is None:  # closed: answer this batch, then the worker stops
                self._queue.put_nowait(None)
                break
            batch.append(nxt)
            rows += len(nxt.rows)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                return
            now = time.perf_counter()
            for p in batch:
                QUEUE_SECONDS.labels(self.model_name).observe(now - p.enqueued)
            BATCH_REQUESTS.labels(self.model_name).observe(len(batch))
            merged = np.concatenate([p.rows for p in batch]) if len(batch) > 1 else batch[0].rows
            BATCH_ROWS.labels(self.model_name).observe(len(merged))
            try:
                result = await loop.run_in_executor(None, self.predict_fn, merged)
            except Exception:
                await self._one_by_one(batch)
                continue
            start = 0
            for p in batch:
                end = start + len(p.rows)
                if not p.future.done():
                    p.future.set_result(result[start:end])
                start = end

    async def _one_by_one(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        for p in batch:
            try:
                result = await loop.run_in_executor(None, self.predict_fn, p.rows)
            except Exception as exc:
                if not p.future.done():
                    p.future.set_exception(exc)
            else:
                if not p.future.done():
                    p.future.set_result(result)

    def close(self) -> None:
        """Stop taking new requests into batches; requests already queued are still answered."""
        self._closed = True
        if self._queue is not None:
            self._queue.put_nowait(None)  # sentinel after everything already queued
