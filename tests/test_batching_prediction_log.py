"""Group commit of the prediction log against a real SQLite feedback store.

The guarantee callers rely on: when ``record`` returns, the rows are committed (feedback
sent right after the response finds its prediction). The point of grouping: concurrent
callers share transactions instead of queueing for SQLite's write lock one by one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from predictors.feedback import FeedbackStore
from predictors.prediction_log import GroupCommitLog

LIVENESS_S = 30.0  # a hang fails the test; not a speed check
T = TypeVar("T")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FeedbackStore]:
    s = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    yield s
    s.close()


class CountingStore:
    """The real store, counting write calls; optionally holding the first one until released."""

    def __init__(self, store: FeedbackStore, hold_first: bool = False) -> None:
        self.store = store
        self.calls: list[tuple[str, str, int]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold_first:
            self.release.set()

    def record_predictions(self, model: str, version: str, rows: Sequence[tuple[str, int]]) -> int:
        self.started.set()
        self.release.wait(LIVENESS_S)
        self.calls.append((model, version, len(rows)))
        return self.store.record_predictions(model, version, rows)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, LIVENESS_S))


def test_rows_are_committed_when_record_returns(store):
    """Each caller can submit feedback for its own ids the moment ``record`` returns."""
    writer = GroupCommitLog(store)

    async def caller(i: int) -> None:
        ids = [f"req-{i}/{k}" for k in range(3)]
        await writer.record("iris", "1", [(pid, k % 3) for k, pid in enumerate(ids)])
        store.add_feedback_by_ids("iris", [(pid, 0) for pid in ids])  # raises if any id were missing

    async def main() -> None:
        await asyncio.gather(*(caller(i) for i in range(40)))

    run(main())
    assert store.prediction_count("iris") == 120
    assert store.feedback_count("iris") == 120


def test_concurrent_callers_share_transactions(store):
    counting = CountingStore(store, hold_first=True)
    writer = GroupCommitLog(counting)

    async def main() -> None:
        first = asyncio.ensure_future(writer.record("iris", "1", [("a", 0)]))
        await asyncio.to_thread(counting.started.wait, LIVENESS_S)  # the first commit is under way
        rest = [asyncio.ensure_future(writer.record("iris", "1", [(f"b{i}", 1)])) for i in range(50)]
        await asyncio.sleep(0)
        counting.release.set()
        await asyncio.gather(first, *rest)

    run(main())
    assert counting.calls == [("iris", "1", 1), ("iris", "1", 50)]
    assert store.prediction_count("iris") == 51


def test_models_and_versions_are_written_separately_and_first_ids_stay(store):
    counting = CountingStore(store, hold_first=True)
    writer = GroupCommitLog(counting)

    async def main() -> None:
        first = asyncio.ensure_future(writer.record("iris", "1", [("warm", 0)]))
        await asyncio.to_thread(counting.started.wait, LIVENESS_S)
        queued = [writer.record("iris", "1", [("x", 0)]), writer.record("mnist", "2", [("y", 7)]),
                  writer.record("iris", "1", [("x", 2)])]  # a client re-using an id: the first answer is kept
        tasks = [asyncio.ensure_future(q) for q in queued]
        await asyncio.sleep(0)
        counting.release.set()
        await asyncio.gather(first, *tasks)

    run(main())
    assert sorted(counting.calls[1:]) == [("iris", "1", 2), ("mnist", "2", 1)]
    # feedback joins with the logged prediction: "x" must carry the first predicted label, 0
    store.add_feedback_by_ids("iris", [("x", 2)])
    assert store.confusion("iris", [0, 1, 2])[2, 0] == 1


def test_a_failed_write_reaches_its_callers_and_the_writer_recovers(store):
    class Flaky(CountingStore):
        fail_next = True

        def record_predictions(self, model: str, version: str, rows: Sequence[tuple[str, int]]) -> int:
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("database is locked")
            return super().record_predictions(model, version, rows)

    writer = GroupCommitLog(Flaky(store))

    async def main() -> tuple[BaseException | None, None]:
        try:
            await writer.record("iris", "1", [("lost", 0)])
        except RuntimeError as exc:
            error: BaseException | None = exc
        else:
            error = None
        return error, await writer.record("iris", "1", [("kept", 1)])

    error, _ = run(main())
    assert isinstance(error, RuntimeError)
    assert store.prediction_count("iris") == 1
