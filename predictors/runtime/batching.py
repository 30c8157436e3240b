"""Adaptive batching: concurrent requests for one model share one ``predict`` call.

KServe's Python server has no V2 batching (its batcher is a V1-only sidecar). Here each
model owns a :class:`Batcher`. Requests put their (already validated) feature arrays in a
queue; one worker task takes what is waiting — never more than ``max_batch_size`` rows,
unless a single request is larger — concatenates it, runs the model once in the thread
pool and hands each caller its own slice of the result.

Why it is *adaptive* and not a fixed timer:

* only one model call per model is in flight; requests that arrive meanwhile queue up, so
  the batch size follows the load by itself ("natural batching"): one row at a time when
  idle, full batches under heavy load;
* a request to a cheap (inline) model that finds nothing queued or held and no batch-mate
  expected is predicted by its own caller: a lone client skips the worker hand-off (a future,
  a wake-up and two task switches: about a tenth of a lone gRPC call's server CPU). Such a
  request never yields, so concurrent clients could not be seen while all requests took that
  path: after ``PROBE_EVERY`` in a row, one goes through the queue;
* ``max_latency_ms`` bounds how long a request waits *in total* for batch-mates, counted
  from the moment it was queued, not from the moment the worker looked at it. Requests
  that already waited behind a busy model are dispatched at once; only an idle model with
  a part-full batch waits, and never longer than the first request's remaining budget.
  ``max_latency_ms=0`` is pure natural batching (never wait on purpose).
* and it waits only when batch-mates are actually likely: the batcher remembers the peak
  number of outstanding requests (submitted, not yet answered) over the last couple of
  seconds — the offered concurrency — and waits only while that peak exceeds what is
  already waiting here; a window that runs out first resets the peak to what showed up. A
  single client sending one request at a time therefore never waits for a batch-mate that
  cannot come (its next request follows this answer), while many concurrent clients fill
  batches. A fixed wait would instead charge every lone request the whole window, which for
  a fast model is a large share of its time.

Correctness rules the tests pin down:

* each caller gets exactly the rows of its own request (slices by position; a model that
  returns the wrong number of rows for a merged batch is treated as a failure, never
  split);
* a failing batch is bisected until the failing request is alone, so one poisoned request
  fails only itself and its batch-mates are answered (O(log n) extra calls, not n);
* ``close()`` stops batching new requests but answers every request already queued.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Histogram

logger = logging.getLogger(__name__)

BATCH_ROWS = Histogram(
    "classifier_batch_rows", "Rows per batched model call", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_REQUESTS = Histogram(
    "classifier_batch_requests", "Requests merged into one model call", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
BATCH_SPLITS = Counter(
    "classifier_batch_splits_total", "Merged model calls that failed and were split to isolate the failing request",
    ["model"],
)
QUEUE_SECONDS = Histogram(
    "classifier_batch_queue_seconds", "Time a request waited for its batch", ["model"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)

PredictFn = Callable[[np.ndarray], np.ndarray]


class BatchSizeMismatch(RuntimeError):
    """The model returned a different number of rows than it was given: results cannot be split safely."""


PEAK_MEMORY_S = 2.0  # how fast the remembered peak concurrency fades back to 1 once load drops
# A request predicted by its own caller never yields to the event loop, so concurrent requests cannot
# be seen while every request takes that path: at most this many in a row do, then one is queued.
PROBE_EVERY = 8


@dataclass(eq=False)
class _Pending:
    rows: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    outstanding: bool = True  # counted in Batcher._outstanding until answered, failed or cancelled


class Batcher:
    """Merge concurrent :meth:`submit` calls into batched ``predict_fn`` calls (see the module docstring)."""

    def __init__(self, model_name: str, predict_fn: PredictFn, max_batch_size: int, max_latency_ms: float,
                 executor: Executor | None = None, inline_max_rows: int = 0) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_latency_ms < 0:
            raise ValueError("max_latency_ms must not be negative")
        self.model_name = model_name
        self.predict_fn = predict_fn
        self.max_batch_size = max_batch_size
        self.max_latency_s = max_latency_ms / 1000.0
        self.executor = executor  # None: the event loop's default thread pool, like unbatched predicts
        self.inline_max_rows = inline_max_rows  # batches up to this many rows run on the loop (a cheap model)
        self._queue: deque[_Pending] = deque()
        self._worker: asyncio.Task | None = None
        # While the worker sleeps: the future that wakes it, and how many newly queued rows should (one when
        # idle; the room left in the batch while it gathers batch-mates: a wake-up per arrival cost more
        # than the model call per row on 64 gRPC clients).
        self._waiter: asyncio.Future | None = None
        self._wake_at_rows = 1
        self._arrived_rows = 0
        self._in_flight: list[_Pending] = []
        self._closed = False
        self._outstanding = 0  # submitted, not yet answered
        self._alone_streak = 0  # requests in a row predicted by their caller (see PROBE_EVERY)
        self._peak = 1.0  # recent peak of _outstanding, fading towards 1 (see _peak_now)
        self._peak_at = time.perf_counter()
        # Bound once: a labelled child lookup per request is measurable at thousands of requests/s.
        self._rows_metric = BATCH_ROWS.labels(model_name)
        self._requests_metric = BATCH_REQUESTS.labels(model_name)
        self._queue_metric = QUEUE_SECONDS.labels(model_name)
        self._splits_metric = BATCH_SPLITS.labels(model_name)

    @property
    def closed(self) -> bool:
        return self._closed

    async def submit(self, rows: np.ndarray) -> np.ndarray:
        """Predict ``rows`` (one request's batch), sharing a model call with concurrent requests."""
        loop = asyncio.get_running_loop()
        if self._closed:  # the model is being unloaded or swapped: finish this request on its own
            return await loop.run_in_executor(self.executor, self.predict_fn, rows)
        now = time.perf_counter()
        self._outstanding += 1
        self._peak, self._peak_at = max(float(self._outstanding), self._peak_now(now)), now
        if (not self._queue and not self._in_flight and len(rows) <= self.inline_max_rows
                and not self._expect_more() and self._alone_streak < PROBE_EVERY):
            self._alone_streak += 1
            return self._predict_alone(rows)
        self._alone_streak = 0
        if self._worker is None or self._worker.done():
            # Lazily, because models load before the server's event loop exists; restarted if it ever died.
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.model_name}")
        pending = _Pending(rows, loop.create_future(), now)
        self._queue.append(pending)
        if self._waiter is not None:
            self._arrived_rows += len(rows)
            if self._arrived_rows >= self._wake_at_rows or not self._expect_more():
                self._wake()
        try:
            return await pending.future
        finally:
            self._settle(pending)  # no-op if the worker already did; counts a cancelled caller out

    def close(self) -> None:
        """Stop batching new requests; requests already queued are still answered, then the worker ends."""
        self._closed = True
        self._wake()

    def _predict_alone(self, rows: np.ndarray) -> np.ndarray:
        """A cheap model, nothing queued or held and no batch-mate expected: predict right here.

        What the worker would do for a batch of one, without its future, wake-up and task switch
        (a lone gRPC client's call spent about a tenth of its server time on that hand-off).
        """
        try:
            self._queue_metric.observe(0.0)
            self._requests_metric.observe(1)
            self._rows_metric.observe(len(rows))
            return self._checked(self.predict_fn(rows), rows)
        finally:
            self._outstanding -= 1

    def _checked(self, result: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``result``, unless the model returned a different number of rows than it was given."""
        if len(result) != len(rows):
            raise BatchSizeMismatch(f"model {self.model_name} returned {len(result)} rows for {len(rows)}")
        return result

    # -- the worker ------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if not batch:
                    return
                await self._dispatch(batch)
        except BaseException as exc:  # cancelled with the event loop, or a bug: never leave a caller hanging
            self._fail_all(exc)
            raise

    async def _next_batch(self) -> list[_Pending]:
        """The next batch to run; empty once closed and drained."""
        batch: list[_Pending] = []
        rows = 0
        while not batch:
            while not self._queue:
                if self._closed:
                    return []
                await self._sleep(1, None)
            batch, rows = self._take(batch, rows)  # empty only if every queued caller was cancelled
        self._in_flight = batch  # held from here: answered by _fail_all too, and no request overtakes it
        deadline = batch[0].enqueued + self.max_latency_s
        while rows < self.max_batch_size and not self._closed:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            timed_out = False
            if not self._queue:
                if not self._expect_more():
                    break
                timed_out = not await self._sleep(self.max_batch_size - rows, remaining)
                if timed_out:
                    self._forget_peak()  # before taking what came: the peak becomes what actually showed up
            size_before = len(batch)
            batch, rows = self._take(batch, rows)
            if timed_out or (len(batch) == size_before and self._queue):  # out of time, or the head does not fit
                break
        return batch

    async def _sleep(self, wake_at_rows: int, timeout: float | None) -> bool:
        """Sleep until ``wake_at_rows`` rows were queued, batch-mates stop being expected, or :meth:`close`;
        False if ``timeout`` ran out first."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._wake_at_rows, self._arrived_rows = wake_at_rows, 0
        timer = None if timeout is None else loop.call_later(timeout, _resolve, waiter, False)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _wake(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter, result=True)

    def _peak_now(self, now: float) -> float:
        return 1.0 + (self._peak - 1.0) * math.exp(-(now - self._peak_at) / PEAK_MEMORY_S)

    def _forget_peak(self) -> None:
        """The window ran out before the expected batch-mates came: remember only the concurrency that did
        show up, so a lone client after a burst waits one window, not on every request until the peak fades."""
        self._peak, self._peak_at = float(max(self._outstanding, 1)), time.perf_counter()

    def _expect_more(self) -> bool:
        """Whether another request is likely to arrive soon: recent concurrency above what is waiting here.

        Senders of requests already queued here wait for their answers before sending again, so
        only concurrency beyond ``_outstanding`` can bring a batch-mate.
        """
        return self._peak_now(time.perf_counter()) - self._outstanding >= 0.5

    def _settle(self, pending: _Pending) -> None:
        if pending.outstanding:
            pending.outstanding = False
            self._outstanding -= 1

    def _take(self, batch: list[_Pending], rows: int) -> tuple[list[_Pending], int]:
        """Move queued requests into ``batch`` while they fit in ``max_batch_size`` rows (the first always fits)."""
        queue = self._queue
        while queue:
            head = queue[0]
            if head.future.done():  # its caller went away (cancelled): skip the model work
                self._settle(queue.popleft())
                continue
            n = len(head.rows)
            if batch and rows + n > self.max_batch_size:
                break
            queue.popleft()
            batch.append(head)
            rows += n
            if rows >= self.max_batch_size:
                break
        return batch, rows

    async def _dispatch(self, batch: list[_Pending]) -> None:
        now = time.perf_counter()
        for p in batch:
            self._queue_metric.observe(now - p.enqueued)
        self._requests_metric.observe(len(batch))
        try:
            await self._predict(batch, record_rows=True)
        finally:
            self._in_flight = []

    async def _predict(self, batch: list[_Pending], record_rows: bool = False) -> None:
        """Run ``batch`` as one model call; on failure bisect it so only the failing request(s) fail."""
        loop = asyncio.get_running_loop()
        try:
            merged = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
            if record_rows:
                self._rows_metric.observe(len(merged))
            if len(merged) <= self.inline_max_rows:
                result = self.predict_fn(merged)
            else:
                result = await loop.run_in_executor(self.executor, self.predict_fn, merged)
            self._checked(result, merged)
        except Exception as exc:  # isolated below, then delivered to its own caller
            if len(batch) == 1:
                self._answer(batch[0], exception=exc)
                return
            self._splits_metric.inc()
            half = len(batch) // 2
            await self._predict(batch[:half])
            await self._predict(batch[half:])
            return
        start = 0
        for p in batch:
            end = start + len(p.rows)
            self._answer(p, result=result[start:end])
            start = end

    def _answer(self, pending: _Pending, *, result: object = None, exception: BaseException | None = None) -> None:
        self._settle(pending)
        _resolve(pending.future, result=result, exception=exception)

    def _fail_all(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, Exception) else RuntimeError(f"batcher for {self.model_name} stopped")
        for p in self._in_flight:
            self._answer(p, exception=error)
        while self._queue:
            self._answer(self._queue.popleft(), exception=error)


def _resolve(future: asyncio.Future, result: object = None, *, exception: BaseException | None = None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
