"""The adaptive Batcher on its own event loop: batch limits, flushing, draining, failure isolation.

The model is a real fitted scikit-learn classifier (plus thin wrappers that record what it
was called with, or fail on purpose); nothing here asserts on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from predictors.runtime.batching import Batcher, BatchSizeMismatch

LIVENESS_S = 30.0  # generous upper bound so a hang fails the test instead of the suite; not a speed check


@pytest.fixture(scope="module")
def classifier() -> LogisticRegression:
    x, y = load_iris(return_X_y=True)
    return LogisticRegression(max_iter=500).fit(x, y)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """Distinct rows, so a crossed result would be visible."""
    x, _ = load_iris(return_X_y=True)
    return x + np.random.default_rng(0).normal(0.0, 0.05, x.shape)


class Recording:
    """Wraps a predict function and records the size of every call it receives."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.fn = fn
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, features: np.ndarray) -> np.ndarray:
        with self._lock:
            self.calls.append(len(features))
        return self.fn(features)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, LIVENESS_S))


def test_each_caller_gets_its_own_rows(classifier, rows):
    predict = Recording(classifier.predict_proba)

    async def main() -> list[np.ndarray]:
        batcher = Batcher("unit-own-rows", predict, max_batch_size=32, max_latency_ms=5)
        sizes = [1 + i % 3 for i in range(40)]
        starts = np.cumsum([0, *sizes[:-1]])
        requests = [rows[s:s + n] for s, n in zip(starts, sizes, strict=True)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        batcher.close()
        return [(r, res) for r, res in zip(requests, results, strict=True)]

    for request, result in run(main()):
        assert result.shape == (len(request), 3)
        np.testing.assert_allclose(result, classifier.predict_proba(request), rtol=1e-12, atol=1e-15)
    assert max(predict.calls) > 1, "concurrent requests should have shared model calls"


def test_batches_never_exceed_max_batch_size(classifier, rows):
    predict = Recording(classifier.predict_proba)

    async def main() -> None:
        batcher = Batcher("unit-max-size", predict, max_batch_size=4, max_latency_ms=0)
        await asyncio.gather(*(batcher.submit(rows[i:i + 1]) for i in range(10)))
        batcher.close()

    run(main())
    assert predict.calls == [4, 4, 2]


def test_a_request_that_does_not_fit_waits_for_the_next_batch(classifier, rows):
    predict = Recording(classifier.predict_proba)

    async def main() -> list[np.ndarray]:
        batcher = Batcher("unit-no-split", predict, max_batch_size=4, max_latency_ms=0)
        sizes = [3, 3, 1, 6]  # 3 | 3+1 | 6 (larger than the limit: runs alone, never split)
        requests = [rows[10 * i:10 * i + n] for i, n in enumerate(sizes)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        batcher.close()
        return list(zip(requests, results, strict=True))

    for request, result in run(main()):
        np.testing.assert_allclose(result, classifier.predict_proba(request), rtol=1e-12, atol=1e-15)
    assert predict.calls == [3, 4, 6]


def test_a_lone_request_is_flushed_without_batch_mates(classifier, rows):
    """max_batch_size is never reached: the latency bound sends the batch anyway."""
    predict = Recording(classifier.predict_proba)

    async def main() -> np.ndarray:
        batcher = Batcher("unit-flush", predict, max_batch_size=1000, max_latency_ms=20)
        result = await batcher.submit(rows[:2])
        batcher.close()
        return result

    np.testing.assert_allclose(run(main()), classifier.predict_proba(rows[:2]), rtol=1e-12)
    assert predict.calls == [2]


def test_with_concurrent_clients_a_batch_waits_for_mates_and_goes_when_full(classifier, rows):
    """Once arrivals show concurrency, a part-full batch waits (up to an hour here) and goes as soon as it is full."""
    predict = Recording(classifier.predict_proba)

    async def main() -> None:
        batcher = Batcher("unit-full", predict, max_batch_size=4, max_latency_ms=3_600_000)
        await asyncio.gather(*(batcher.submit(rows[i:i + 1]) for i in range(8)))  # 8 clients at once
        early = [asyncio.ensure_future(batcher.submit(rows[i:i + 1])) for i in (8, 9)]
        for _ in range(3):
            await asyncio.sleep(0)  # the worker takes these two and, expecting more, waits
        await asyncio.gather(*early, batcher.submit(rows[10:11]), batcher.submit(rows[11:12]))
        batcher.close()

    run(main())
    assert predict.calls == [4, 4, 4]  # without waiting the last batch would have gone as 2 + 2


def test_one_client_at_a_time_never_waits_for_batch_mates(classifier, rows):
    """A lone client sends its next request only after this answer: waiting for a batch-mate (an hour here)
    would only add latency, so the batcher does not."""
    predict = Recording(classifier.predict_proba)

    async def main() -> list[np.ndarray]:
        batcher = Batcher("unit-sparse", predict, max_batch_size=64, max_latency_ms=3_600_000)
        answers = [await batcher.submit(rows[i:i + 1]) for i in range(5)]
        batcher.close()
        return answers

    for i, answer in enumerate(run(main())):
        np.testing.assert_allclose(answer, classifier.predict_proba(rows[i:i + 1]), rtol=1e-12)
    assert predict.calls == [1, 1, 1, 1, 1]


def test_a_lone_client_after_a_burst_waits_out_one_window_not_the_fading_peak(classifier, rows):
    """After 8 concurrent clients the batcher expects batch-mates for seconds; once a wait runs out with
    nobody arriving it forgets them, so a lone client then pays one window, not one per request. The
    bound is in windows (six would be waited without forgetting), far from any machine's speed."""
    window_s = 0.4
    predict = Recording(classifier.predict_proba)

    async def main() -> float:
        batcher = Batcher("unit-forget", predict, max_batch_size=64, max_latency_ms=1000 * window_s)
        await asyncio.gather(*(batcher.submit(rows[i:i + 1]) for i in range(8)))
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(8, 14):
            await batcher.submit(rows[i:i + 1])
        batcher.close()
        return loop.time() - start

    windows_waited = run(main()) / window_s
    assert predict.calls[-6:] == [1] * 6
    assert 0.9 <= windows_waited < 3


def test_requests_arriving_while_the_model_is_busy_form_the_next_batch(classifier, rows):
    """Natural batching: no timer needed (max_latency_ms=0); the queue fills while a call runs."""
    release = threading.Event()
    started = threading.Event()

    def slow(features: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(LIVENESS_S)
        return classifier.predict_proba(features)

    predict = Recording(slow)

    async def main() -> None:
        batcher = Batcher("unit-natural", predict, max_batch_size=64, max_latency_ms=0)
        first = asyncio.ensure_future(batcher.submit(rows[0:1]))
        await asyncio.to_thread(started.wait, LIVENESS_S)
        rest = [asyncio.ensure_future(batcher.submit(rows[i:i + 1])) for i in range(1, 11)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *rest)
        batcher.close()

    run(main())
    assert predict.calls == [1, 10]


def test_close_answers_everything_already_queued(classifier, rows):
    release = threading.Event()
    started = threading.Event()

    def slow(features: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(LIVENESS_S)
        return classifier.predict_proba(features)

    predict = Recording(slow)

    async def main() -> tuple[list[np.ndarray], np.ndarray, Batcher]:
        batcher = Batcher("unit-close", predict, max_batch_size=4, max_latency_ms=1000)
        queued = [asyncio.ensure_future(batcher.submit(rows[i:i + 1])) for i in range(4)]
        await asyncio.to_thread(started.wait, LIVENESS_S)  # first batch of 4 is running
        queued += [asyncio.ensure_future(batcher.submit(rows[i:i + 1])) for i in range(4, 10)]
        await asyncio.sleep(0)
        batcher.close()
        release.set()
        answers = await asyncio.gather(*queued)
        after = await batcher.submit(rows[20:22])  # after close: served on its own, not lost
        return answers, after, batcher

    answers, after, batcher = run(main())
    assert batcher.closed
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer, classifier.predict_proba(rows[i:i + 1]), rtol=1e-12)
    np.testing.assert_allclose(after, classifier.predict_proba(rows[20:22]), rtol=1e-12)
    assert predict.calls[:3] == [4, 4, 2]  # queued requests drained in full batches, without waiting
    assert predict.calls[3:] == [2]


def test_one_poisoned_request_fails_alone(classifier, rows):
    """A batch that fails is bisected: the bad request gets its error, its batch-mates their answers."""

    def fragile(features: np.ndarray) -> np.ndarray:
        if (features > 1000).any():
            raise ValueError("feature out of range")
        return classifier.predict_proba(features)

    predict = Recording(fragile)
    poisoned = 11

    async def main() -> list[Any]:
        batcher = Batcher("unit-poison", predict, max_batch_size=32, max_latency_ms=0)
        requests = [rows[i:i + 2] if i != poisoned else np.full((2, 4), 5000.0) for i in range(16)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        batcher.close()
        return list(zip(requests, results, strict=True))

    outcomes = run(main())
    for i, (request, result) in enumerate(outcomes):
        if i == poisoned:
            assert isinstance(result, ValueError) and "out of range" in str(result)
        else:
            np.testing.assert_allclose(result, classifier.predict_proba(request), rtol=1e-12)
    assert predict.calls[0] == 32  # all 16 requests first shared one call ...
    assert len(predict.calls) <= 1 + 2 * 4  # ... then bisection: at most 2 calls per level, not 16 retries


def test_a_model_returning_the_wrong_row_count_never_crosses_results(rows):
    """If a merged call returns too few rows, slicing would shift answers; the batch is split instead."""

    def drops_a_row_when_batched(features: np.ndarray) -> np.ndarray:
        out = np.column_stack([features[:, 0], features[:, 1]])
        return out[:-1] if len(features) > 1 else out

    async def main() -> list[Any]:
        batcher = Batcher("unit-mismatch", drops_a_row_when_batched, max_batch_size=8, max_latency_ms=0)
        results = await asyncio.gather(*(batcher.submit(rows[i:i + 1]) for i in range(8)), return_exceptions=True)
        multi = await asyncio.gather(batcher.submit(rows[40:43]), return_exceptions=True)
        batcher.close()
        return [*results, *multi]

    *singles, multi = run(main())
    for i, result in enumerate(singles):
        np.testing.assert_array_equal(result, rows[i:i + 1, :2])
    assert isinstance(multi, BatchSizeMismatch)


def test_incompatible_requests_are_separated_not_merged(classifier, rows):
    """Rows that cannot be concatenated (different widths) fail or succeed on their own."""
    predict = Recording(classifier.predict_proba)

    async def main() -> list[Any]:
        batcher = Batcher("unit-shapes", predict, max_batch_size=16, max_latency_ms=0)
        requests = [rows[0:1], rows[1:2, :3], rows[2:3]]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        batcher.close()
        return results

    good0, bad, good2 = run(main())
    np.testing.assert_allclose(good0, classifier.predict_proba(rows[0:1]), rtol=1e-12)
    np.testing.assert_allclose(good2, classifier.predict_proba(rows[2:3]), rtol=1e-12)
    assert isinstance(bad, ValueError)


def test_a_cancelled_caller_does_not_disturb_the_others(classifier, rows):
    release = threading.Event()
    started = threading.Event()

    def slow(features: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(LIVENESS_S)
        return classifier.predict_proba(features)

    predict = Recording(slow)

    async def main() -> list[Any]:
        batcher = Batcher("unit-cancel", predict, max_batch_size=8, max_latency_ms=0)
        first = asyncio.ensure_future(batcher.submit(rows[0:1]))
        await asyncio.to_thread(started.wait, LIVENESS_S)
        waiting = [asyncio.ensure_future(batcher.submit(rows[i:i + 1])) for i in range(1, 5)]
        await asyncio.sleep(0)
        waiting[1].cancel()
        release.set()
        results = await asyncio.gather(first, *waiting, return_exceptions=True)
        batcher.close()
        return results

    results = run(main())
    assert isinstance(results[2], asyncio.CancelledError)
    for i in (0, 1, 3, 4):
        np.testing.assert_allclose(results[i], classifier.predict_proba(rows[i:i + 1]), rtol=1e-12)
    assert predict.calls == [1, 3]  # the cancelled request's row was not computed


def test_metrics_record_batch_rows_requests_and_queue_time(classifier, rows):
    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "unit-metrics"}) or 0.0

    async def main() -> None:
        batcher = Batcher("unit-metrics", classifier.predict_proba, max_batch_size=4, max_latency_ms=0)
        await asyncio.gather(*(batcher.submit(rows[i:i + 2]) for i in range(4)))  # 2+2 | 2+2
        batcher.close()

    run(main())
    assert sample("classifier_batch_requests_count") == 2
    assert sample("classifier_batch_requests_sum") == 4
    assert sample("classifier_batch_rows_sum") == 8
    assert sample("classifier_batch_queue_seconds_count") == 4


def test_settings_are_checked():
    with pytest.raises(ValueError):
        Batcher("bad", lambda x: x, max_batch_size=0, max_latency_ms=1)
    with pytest.raises(ValueError):
        Batcher("bad", lambda x: x, max_batch_size=2, max_latency_ms=-1)


def test_small_batches_of_an_inline_model_run_on_the_event_loop_large_ones_in_the_pool():
    threads: list[int] = []

    def predict(x: np.ndarray) -> np.ndarray:
        threads.append(threading.get_ident())
        return np.zeros((len(x), 3))

    async def main() -> int:
        batcher = Batcher("unit-inline", predict, max_batch_size=64, max_latency_ms=0, inline_max_rows=8)
        await batcher.submit(np.zeros((8, 4)))
        await batcher.submit(np.zeros((9, 4)))
        batcher.close()
        return threading.get_ident()

    loop_thread = asyncio.run(asyncio.wait_for(main(), LIVENESS_S))
    assert threads[0] == loop_thread and threads[1] != loop_thread


def test_a_lone_request_to_an_inline_model_is_predicted_by_its_caller_without_the_worker(classifier, rows):
    """Nothing queued, nothing held, no batch-mate expected: the caller predicts itself (no worker task,
    no hand-off); its errors stay its own, and concurrent callers still share model calls."""
    predict = Recording(classifier.predict_proba)

    def fails_on_negative(features: np.ndarray) -> np.ndarray:
        if (features < 0).any():
            raise ValueError("negative measurement")
        return predict(features)

    async def main() -> tuple[list[np.ndarray], Any, list[str]]:
        batcher = Batcher("unit-alone", fails_on_negative, max_batch_size=8, max_latency_ms=3_600_000,
                          inline_max_rows=8)
        answers = [await batcher.submit(rows[i:i + 1]) for i in range(3)]
        error = await asyncio.gather(batcher.submit(-rows[3:4]), return_exceptions=True)
        tasks = [t.get_name() for t in asyncio.all_tasks()]
        answers.append(await batcher.submit(rows[4:5]))
        await asyncio.gather(*(batcher.submit(rows[i:i + 1]) for i in range(5, 13)))  # 8 clients at once
        batcher.close()
        return answers, error[0], tasks

    answers, error, tasks = run(main())
    for i, answer in zip([0, 1, 2, 4], answers, strict=True):
        np.testing.assert_allclose(answer, classifier.predict_proba(rows[i:i + 1]), rtol=1e-12)
    assert isinstance(error, ValueError)
    assert "batcher-unit-alone" not in tasks
    assert predict.calls[:4] == [1, 1, 1, 1] and sum(predict.calls[4:]) == 8 and len(predict.calls) < 12


def test_callers_of_a_batch_still_gathering_mates_are_answered_if_the_worker_dies(classifier, rows):
    """The worker holds a part-full batch while it waits for batch-mates; cancelled then (the event loop
    shutting down), it must fail those callers rather than leave them waiting for ever."""

    async def main() -> list[Any]:
        batcher = Batcher("unit-held", classifier.predict_proba, max_batch_size=64, max_latency_ms=3_600_000)
        await asyncio.gather(*(batcher.submit(rows[i:i + 1]) for i in range(8)))
        held = [asyncio.ensure_future(batcher.submit(rows[i:i + 1])) for i in (8, 9)]
        for _ in range(3):
            await asyncio.sleep(0)  # the worker takes both and, expecting more, waits
        worker = next(t for t in asyncio.all_tasks() if t.get_name() == "batcher-unit-held")
        worker.cancel()
        return await asyncio.gather(*held, return_exceptions=True)

    assert all(isinstance(r, BaseException) for r in run(main()))
