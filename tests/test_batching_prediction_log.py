"""The write-behind prediction log against a real SQLite feedback store.

What callers rely on: ``record`` returns without waiting for the database (unless the queue
is full), ``flush`` makes everything recorded so far visible to feedback, a failing database
loses no row (retried until it answers), a full queue slows callers down instead of dropping
rows (except while the database fails, when drops are counted), and ``close`` writes everything.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import REGISTRY

from predictors.feedback import FeedbackStore
from predictors.feedback.prediction_log import WriteBehindLog

LIVENESS_S = 30.0  # a hang fails the test; not a speed check
T = TypeVar("T")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    s = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield s
    s.close()


class GatedStore:
    """The real store, counting write calls; writes wait while ``gate`` is clear, fail while ``down``."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self.calls: list[tuple[str, str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.down = False
        self.failures = 0

    def record_predictions(self, model: str, version: str, rows: Sequence[tuple[str, int]]) -> int:
        self.started.set()
        self.gate.wait(LIVENESS_S)
        if self.down:
            self.failures += 1
            raise ConnectionError("database unreachable")
        self.calls.append((model, version, len(rows)))
        return self.store.record_predictions(model, version, rows)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, LIVENESS_S))


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_record_does_not_wait_for_the_database_and_flush_makes_rows_visible(store):
    gated = GatedStore(store)
    gated.gate.clear()  # the database hangs
    writer = WriteBehindLog(gated, flush_interval_s=0.01)

    async def main() -> None:
        await writer.record("iris", "1", [("a:1", 0)])  # returns although nothing can be written
        assert store.prediction_count("iris") == 0
        gated.gate.set()
        assert await writer.flush()
        store.add_feedback_by_ids("iris", [("a:1", 0)])  # raises if the id were missing
        await writer.close()

    run(main())
    assert store.feedback_count("iris") == 1


def test_concurrent_records_share_one_write_per_model_version(store):
    gated = GatedStore(store)
    writer = WriteBehindLog(gated, flush_interval_s=0.05, flush_rows=10_000)

    async def main() -> None:
        await asyncio.gather(*(writer.record("iris", "1", [(f"r{i}/{k}", k) for k in range(3)]) for i in range(40)),
                             writer.record("mnist", "2", [("m", 7)]))
        await writer.close()

    run(main())
    assert sorted(gated.calls) == [("iris", "1", 120), ("mnist", "2", 1)]
    assert store.prediction_count("iris") == 120


def test_a_full_batch_of_rows_is_written_without_waiting_for_the_interval(store):
    gated = GatedStore(store)
    writer = WriteBehindLog(gated, flush_interval_s=LIVENESS_S * 2, flush_rows=50)

    async def main() -> None:
        for i in range(50):
            await writer.record("iris", "1", [(f"r{i}", 0)])
        await asyncio.to_thread(gated.started.wait, LIVENESS_S)  # would time out if it waited for the interval
        await writer.close()

    run(main())
    assert gated.calls[0] == ("iris", "1", 50)


def test_failed_flushes_are_retried_until_the_database_returns(store):
    gated = GatedStore(store)
    gated.down = True
    writer = WriteBehindLog(gated, flush_interval_s=0.01, max_backoff_s=0.05)
    failures_before = metric("classifier_prediction_log_flush_failures_total")

    async def main() -> None:
        await writer.record("iris", "1", [("kept-1", 0), ("kept-2", 1)])
        assert not await writer.flush(timeout=0.3)  # down: not written, not lost
        assert writer.failing and writer.queued_rows == 2
        assert metric("classifier_prediction_log_store_up") == 0
        await writer.record("iris", "1", [("kept-3", 2)])
        gated.down = False
        assert await writer.flush()
        assert not writer.failing and writer.queued_rows == 0
        await writer.close()

    run(main())
    assert gated.failures >= 2
    assert metric("classifier_prediction_log_flush_failures_total") - failures_before == gated.failures
    assert metric("classifier_prediction_log_store_up") == 1
    assert store.prediction_count("iris") == 3


def test_a_full_queue_makes_callers_wait_instead_of_dropping(store):
    gated = GatedStore(store)
    gated.gate.clear()  # a slow (not failing) database
    writer = WriteBehindLog(gated, flush_interval_s=0.01, flush_rows=4, capacity=4)

    async def main() -> None:
        await writer.record("iris", "1", [(f"a{i}", 0) for i in range(4)])
        blocked = asyncio.ensure_future(writer.record("iris", "1", [("b", 0)]))
        await asyncio.to_thread(gated.started.wait, LIVENESS_S)
        await asyncio.sleep(0.05)
        assert not blocked.done()  # backpressure: waits for room
        gated.gate.set()
        await blocked
        await writer.close()

    run(main())
    assert store.prediction_count("iris") == 5


def test_a_full_queue_while_the_database_fails_drops_and_counts(store):
    gated = GatedStore(store)
    gated.down = True
    writer = WriteBehindLog(gated, flush_interval_s=0.01, max_backoff_s=0.02, capacity=3)
    dropped_before = metric("classifier_prediction_log_dropped_rows_total")

    async def main() -> None:
        await writer.record("iris", "1", [("a", 0), ("b", 0), ("c", 0)])
        await writer.flush(timeout=0.2)
        assert writer.failing
        await writer.record("iris", "1", [("d", 0)])  # answered at once, the row counted as dropped
        gated.down = False
        assert await writer.close()

    run(main())
    assert metric("classifier_prediction_log_dropped_rows_total") - dropped_before == 1
    assert store.prediction_count("iris") == 3


def test_close_writes_everything_queued(store):
    writer = WriteBehindLog(store, flush_interval_s=LIVENESS_S * 2, flush_rows=10_000)

    async def main() -> None:
        for i in range(100):
            await writer.record("iris", "1", [(f"r{i}", i % 3)])
        assert store.prediction_count("iris") == 0
        assert await writer.close()

    run(main())
    assert store.prediction_count("iris") == 100


# --- rows the database refuses (real PostgreSQL: it refuses a NUL character in text) ----------------


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[FeedbackStore]:
    s = FeedbackStore(postgres_url)
    yield s
    s.close()


def test_a_row_the_database_refuses_is_set_aside_and_every_other_row_written(pg_store):
    """One NUL in 300 ids: the flush is split until the bad row stands alone; nothing else waits or is lost."""
    writer = WriteBehindLog(pg_store, flush_interval_s=0.01, flush_rows=10_000, max_backoff_s=0.05)
    rejected_before = metric("classifier_prediction_log_rejected_rows_total")
    poisoned = "req\x00uest:1"
    rows = [(f"ok-{i}", i % 3) for i in range(300)]
    rows.insert(137, (poisoned, 1))

    async def main() -> None:
        await writer.record("iris", "1", rows[:200])
        await writer.record("iris", "1", rows[200:])
        await writer.record("mnist", "2", [("digit\x01with-a-control-character", 7)])  # stored as it is
        assert await writer.flush(timeout=LIVENESS_S)  # not stuck behind the bad row
        assert not writer.failing and writer.queued_rows == 0
        pg_store.add_feedback_by_ids("iris", [("ok-0", 0), ("ok-299", 2)])  # the id form works for the others
        await writer.record("iris", "1", [("after", 0)])
        assert await writer.close()

    run(main())
    assert pg_store.prediction_count("iris") == 301 and pg_store.prediction_count("mnist") == 1
    assert [(r.model, r.version, r.prediction_id, r.label) for r in writer.set_aside] == [("iris", "1", poisoned, 1)]
    assert "DataError" in writer.set_aside[0].error
    assert metric("classifier_prediction_log_rejected_rows_total") - rejected_before == 1
    assert pg_store.feedback_count("iris") == 2


def test_close_writes_everything_queued_behind_a_refused_row(pg_store):
    writer = WriteBehindLog(pg_store, flush_interval_s=LIVENESS_S * 2, flush_rows=10_000)

    async def main() -> None:
        await writer.record("iris", "1", [("\x00", 0)])
        for i in range(100):
            await writer.record("iris", "1", [(f"r{i}", i % 3)])
        assert pg_store.prediction_count("iris") == 0
        assert await writer.close()

    run(main())
    assert pg_store.prediction_count("iris") == 100
    assert [r.prediction_id for r in writer.set_aside] == ["\x00"]


def test_an_unreachable_database_is_retried_not_set_aside(tmp_path):
    """Only the rows' own faults are set aside: a database that cannot be reached keeps every row queued."""
    store = FeedbackStore(f"sqlite:///{tmp_path / 'missing-dir' / 'feedback.db'}", retry_after_s=0.05)
    writer = WriteBehindLog(store, flush_interval_s=0.01, max_backoff_s=0.05)

    async def main() -> None:
        await writer.record("iris", "1", [("a", 0), ("b", 1)])
        assert not await writer.flush(timeout=0.3)
        assert writer.failing and writer.queued_rows == 2 and not writer.set_aside
        (tmp_path / "missing-dir").mkdir()
        assert await writer.close(timeout=LIVENESS_S)

    run(main())
    assert store.prediction_count("iris") == 2 and not writer.set_aside
    store.close()
