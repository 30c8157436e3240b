"""Write-behind prediction log: the response never waits for the database.

Every answered request records its prediction ids so feedback can refer to them later.
Committing before answering made the log the largest single cost of serving a small model,
and a database that stopped answering stalled every prediction. :class:`WriteBehindLog` instead
puts rows in a bounded in-memory queue that one writer task flushes every
``flush_interval_s`` (``KCP_PREDICTION_LOG_FLUSH_MS``) or ``flush_rows`` rows, whichever comes first, one
``record_predictions`` call (one transaction) per model version in the flush.

What it guarantees, and how:

* **nothing dropped silently.** A flush that fails because the database cannot be reached
  keeps its rows at the head of the queue and is retried with exponential backoff (up to
  ``max_backoff_s``) until the database answers; rows are idempotent upserts of unique ids,
  so retrying a half-written flush is harmless.
* **one bad row does not wedge the log.** A flush refused for a reason that lies in its
  rows (the database rejects a value: PostgreSQL refuses a NUL character in text, say) would
  fail the same way forever, and every row behind it would wait and then be dropped. Such a
  flush is split in halves and written again, down to single rows; a single row still
  refused is *set aside*: counted in ``classifier_prediction_log_rejected_rows_total``,
  logged with its id, kept in :attr:`WriteBehindLog.set_aside`, never retried. Every other
  row of the flush is written.
* **backpressure.** When ``capacity`` rows are waiting, :meth:`record` waits for room, so
  clients slow to the database's pace. Only while the database is failing (the writer is
  backing off, so there is no pace to follow) does a full queue turn rows away, each one
  counted in ``classifier_prediction_log_dropped_rows_total`` and logged: inference keeps
  answering through an outage longer than the buffer.
* **feedback finds fresh predictions.** :meth:`flush` commits everything queued so far;
  the feedback API awaits it before looking up ids.
* **shutdown loses nothing.** :meth:`close` (on SIGTERM) flushes everything (a poisoned row
  is set aside, not waited for). A SIGKILL loses at most the rows of the last
  ``flush_interval_s`` (and whatever an unreachable database had not yet accepted).

Queue depth, rows written, failed flushes, dropped rows and whether the last flush worked
are Prometheus metrics, the state an operator needs during a database outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge
from sqlalchemy.exc import DataError, IntegrityError

logger = logging.getLogger(__name__)

QUEUED_ROWS = Gauge("classifier_prediction_log_queued_rows", "Prediction-log rows waiting to be written")
WRITTEN_ROWS = Counter("classifier_prediction_log_written_rows_total", "Prediction-log rows committed")
FAILED_FLUSHES = Counter("classifier_prediction_log_flush_failures_total",
                         "Prediction-log flushes that failed (retried with backoff)")
DROPPED_ROWS = Counter("classifier_prediction_log_dropped_rows_total",
                       "Prediction-log rows turned away: queue full while the database was failing")
REJECTED_ROWS = Counter("classifier_prediction_log_rejected_rows",
                        "Prediction-log rows set aside: the database refused the row itself (never retried)")
STORE_UP = Gauge("classifier_prediction_log_store_up", "1 when the last prediction-log flush succeeded, else 0")

SET_ASIDE_KEPT = 1000
"""How many set-aside rows :attr:`WriteBehindLog.set_aside` keeps for inspection (the newest)."""

_ROW_ERRORS: tuple[type[BaseException], ...] = (DataError, IntegrityError, UnicodeError, ValueError)
"""Errors that lie in the rows written, not in the database's reachability: retrying the same rows fails
the same way. (SQLAlchemy's ``DataError``/``IntegrityError`` wrap the driver's; encoding errors and bad
values may be raised by the driver before anything is sent.)"""


def is_row_error(exc: BaseException) -> bool:
    """Whether a failed write is the rows' fault (split and set aside) rather than the database's (retry)."""
    return isinstance(exc, _ROW_ERRORS) or isinstance(getattr(exc, "orig", None), _ROW_ERRORS)


@dataclass(frozen=True, slots=True)
class SetAside:
    """A prediction-log row the database refused: what it was and why."""

    model: str
    version: str
    prediction_id: str
    label: int
    error: str


class PredictionLog(Protocol):
    """Where served predictions are recorded so feedback can refer to them by id."""

    def record_predictions(self, model: str, version: str, rows: list[tuple[str, int]]) -> int | None: ...


@dataclass(eq=False, slots=True)
class _Entry:
    model: str
    version: str
    rows: Sequence[tuple[str, int]]
    seq: int
    enqueued: float


class WriteBehindLog:
    """Record prediction rows through ``log`` from one background writer (see the module docstring)."""

    def __init__(self, log: PredictionLog, *, flush_interval_s: float = 0.05, flush_rows: int = 512,
                 capacity: int = 100_000, max_backoff_s: float = 5.0) -> None:
        if flush_interval_s <= 0 or flush_rows < 1 or capacity < 1:
            raise ValueError("flush_interval_s, flush_rows and capacity must be positive")
        self.log = log
        self.flush_interval_s = flush_interval_s
        self.flush_rows = flush_rows
        self.capacity = capacity
        self.max_backoff_s = max_backoff_s
        self._queue: deque[_Entry] = deque()
        self._queued_rows = 0
        self._seq = 0  # of the last entry queued
        self._committed = 0  # every entry with seq <= this is written
        self._failing = False
        self._closing = False
        self._urgent = False  # a flush() or close() waits: write without waiting for the interval
        self._wakeup: asyncio.Event | None = None
        self._progress: asyncio.Event | None = None  # set after each flush attempt and on state changes
        self._worker: asyncio.Task | None = None
        self.set_aside: deque[SetAside] = deque(maxlen=SET_ASIDE_KEPT)
        """The newest rows the database refused (see the module docstring)."""
        STORE_UP.set(1)

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def failing(self) -> bool:
        """Whether the last flush failed (the writer is backing off and retrying)."""
        return self._failing

    async def record(self, model: str, version: str, rows: Sequence[tuple[str, int]]) -> None:
        """Queue ``rows``; returns at once unless the queue is full (then waits for room, see above)."""
        if not rows:
            return
        self._ensure_worker()
        while self._queued_rows and self._queued_rows + len(rows) > self.capacity:
            if self._failing:
                DROPPED_ROWS.inc(len(rows))
                logger.error("prediction log full (%d rows) while the database fails: %d rows of model %s not "
                             "logged", self._queued_rows, len(rows), model)
                return
            await self._wait_progress()
        idle = not self._queue
        self._seq += 1
        self._queue.append(_Entry(model, version, rows, self._seq, time.monotonic()))
        self._queued_rows += len(rows)
        QUEUED_ROWS.set(self._queued_rows)
        if idle or self._queued_rows >= self.flush_rows:
            # Only what can end the writer's wait: the first row (it starts the flush interval) or a full
            # flush. Waking it for every row cost a task switch and a new timer per request.
            assert self._wakeup is not None
            self._wakeup.set()

    async def flush(self, timeout: float | None = None) -> bool:
        """Write everything queued so far; False if it is not written within ``timeout`` seconds."""
        target = self._seq
        if self._committed >= target:
            return True
        self._ensure_worker()
        self._urgent = True
        assert self._wakeup is not None
        self._wakeup.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._committed < target:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._wait_progress(), remaining)
            except TimeoutError:
                return False
        return True

    async def close(self, timeout: float | None = 30.0) -> bool:
        """Flush everything (retrying a failing database until ``timeout``), then stop the writer."""
        self._closing = True
        flushed = await self.flush(timeout)
        if not flushed:
            logger.error("prediction log: %d rows not written at shutdown (database failing)", self._queued_rows)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        return flushed

    # -- the writer ------------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        """Start the writer on the running loop (lazily: models load before the server's loop exists)."""
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._progress = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="prediction-log-writer")

    async def _wait_progress(self) -> None:
        assert self._progress is not None
        self._progress.clear()
        await self._progress.wait()

    def _signal_progress(self) -> None:
        assert self._progress is not None
        self._progress.set()

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        backoff = self.flush_interval_s
        while True:
            while not self._queue:
                self._urgent = False
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._gather_rows()
            batch = self._take()
            try:
                rejected = await loop.run_in_executor(None, self._write, batch)
            except Exception:  # keep the rows, retry after a pause; never lose them
                self._queue.extendleft(reversed(batch))
                FAILED_FLUSHES.inc()
                STORE_UP.set(0)
                if not self._failing:
                    logger.exception("prediction log: flush of %d rows failed; retrying with backoff",
                                     sum(len(e.rows) for e in batch))
                self._failing = True
                self._signal_progress()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            taken = sum(len(e.rows) for e in batch)
            self._queued_rows -= taken
            QUEUED_ROWS.set(self._queued_rows)
            WRITTEN_ROWS.inc(taken - len(rejected))
            if rejected:
                REJECTED_ROWS.inc(len(rejected))
                self.set_aside.extend(rejected)
            if self._failing:
                logger.info("prediction log: database answers again; %d rows still queued", self._queued_rows)
            self._failing = False
            STORE_UP.set(1)
            backoff = self.flush_interval_s
            self._committed = batch[-1].seq
            self._signal_progress()

    async def _gather_rows(self) -> None:
        """Wait until ``flush_rows`` rows are queued or the oldest has waited ``flush_interval_s``."""
        assert self._wakeup is not None
        deadline = self._queue[0].enqueued + self.flush_interval_s
        while self._queued_rows < self.flush_rows and not (self._urgent or self._closing):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Entry]:
        """Entries for one flush: at least one, then up to ``flush_rows`` rows."""
        batch = [self._queue.popleft()]
        rows = len(batch[0].rows)
        while self._queue and rows + len(self._queue[0].rows) <= self.flush_rows:
            entry = self._queue.popleft()
            batch.append(entry)
            rows += len(entry.rows)
        return batch

    def _write(self, batch: list[_Entry]) -> list[SetAside]:
        """One ``record_predictions`` call (one transaction) per (model, version), rows in arrival order.

        Returns the rows set aside (see the module docstring); raises when the database cannot be
        reached, and the caller keeps the whole batch for the retry.
        """
        groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for entry in batch:
            groups.setdefault((entry.model, entry.version), []).extend(entry.rows)
        rejected: list[SetAside] = []
        for (model, version), rows in groups.items():
            rejected += self._write_splitting(model, version, rows)
        return rejected

    def _write_splitting(self, model: str, version: str, rows: Sequence[tuple[str, int]]) -> list[SetAside]:
        """Write ``rows``; when the database refuses them for a row's fault, halve until the culprits stand alone.

        Bisection costs about two statements per level for each bad row, instead of one per row, and
        writes every good row in the same pass. Any other error propagates (the batch is retried).
        """
        try:
            self.log.record_predictions(model, version, list(rows))
            return []
        except Exception as exc:
            if not is_row_error(exc):
                raise
            if len(rows) > 1:
                middle = len(rows) // 2
                return (self._write_splitting(model, version, rows[:middle])
                        + self._write_splitting(model, version, rows[middle:]))
            prediction_id, label = rows[0]
            cause = getattr(exc, "orig", None) or exc
            error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ''}"
            logger.error("prediction log: model %s version %s: the database refused prediction id %r (%s); "
                         "set aside, not retried", model, version, prediction_id[:300], error)
            return [SetAside(model, version, prediction_id, int(label), error)]
