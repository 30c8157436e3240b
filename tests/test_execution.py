"""The inline-or-thread-pool choice: from the median CPU time of many calls, and the same on every start."""

from __future__ import annotations

import time

from predictors.models import execution


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_fast_call_runs_inline_and_a_slow_one_in_the_thread_pool(tmp_path):
    fast = execution.decide("fast", lambda: None, override=None, cache=None)
    slow = execution.decide("slow", lambda: spin(2 * execution.INLINE_MAX_SECONDS), override=None, cache=None)
    assert fast.mode == "inline" and "median one-row call" in fast.basis
    assert slow.mode == "thread_pool"


def test_the_choice_is_remembered_for_the_machine_and_reused_at_the_next_start(tmp_path):
    cache = tmp_path / "execution.json"
    first = execution.decide("model-a", lambda: None, override=None, cache=cache)
    # The next start measures a slow call, but the choice stays what this machine decided for this package.
    second = execution.decide("model-a", lambda: spin(2 * execution.INLINE_MAX_SECONDS), override=None, cache=cache)
    assert first.mode == second.mode == "inline"
    assert "remembered for this machine" in second.basis
    other = execution.decide("model-b", lambda: spin(2 * execution.INLINE_MAX_SECONDS), override=None, cache=cache)
    assert other.mode == "thread_pool"


def test_config_and_framework_reasons_override_timing(tmp_path):
    assert execution.decide("k", lambda: spin(0.01), override=True, cache=None).mode == "inline"
    choice = execution.decide("k", lambda: None, override=None, cache=None, never_inline="keras computes outside")
    assert choice == execution.ExecutionChoice("thread_pool", "keras computes outside")


def test_an_unwritable_or_corrupt_cache_only_means_timing_again(tmp_path):
    corrupt = tmp_path / "execution.json"
    corrupt.write_text("{not json")
    assert execution.decide("k", lambda: None, override=None, cache=corrupt).mode == "inline"
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert execution.decide("k", lambda: None, override=None, cache=blocked / "execution.json").mode == "inline"


def test_batching_is_on_where_merged_rows_save_the_per_call_overhead():
    """A call that is mostly overhead (scikit-learn's Python around a neighbour search) batches; one whose cost
    grows with its rows does not, and neither does a call already too cheap for the batcher's hand-off."""
    overhead = 3 * execution.BATCH_MIN_SAVING_SECONDS
    rows = execution.BATCH_PROBE_ROWS
    batched = execution.decide_batching("overhead", lambda: spin(overhead), lambda: spin(overhead + rows * 1e-6),
                                        configured=None, cache=None)
    assert batched.max_batch_size == execution.AUTO_BATCH_ROWS
    assert "in a 16-row call" in batched.basis
    per_row = 3 * execution.BATCH_MIN_SAVING_SECONDS
    linear = execution.decide_batching("linear", lambda: spin(per_row), lambda: spin(rows * per_row),
                                       configured=None, cache=None)
    cheap = execution.decide_batching("cheap", lambda: None, lambda: None, configured=None, cache=None)
    assert linear.max_batch_size == cheap.max_batch_size == 1


def test_the_batching_choice_is_remembered_and_config_or_the_model_overrides_it(tmp_path):
    cache = tmp_path / "execution.json"
    overhead = 3 * execution.BATCH_MIN_SAVING_SECONDS
    first = execution.decide_batching("m", lambda: spin(overhead), lambda: spin(overhead), configured=None,
                                      cache=cache)
    again = execution.decide_batching("m", lambda: None, lambda: None, configured=None, cache=cache)
    assert first.max_batch_size == again.max_batch_size == execution.AUTO_BATCH_ROWS
    assert "remembered for this machine" in again.basis
    # The execution choice of the same package is remembered beside it, not in its place.
    assert execution.decide("m", lambda: None, override=None, cache=cache).mode == "inline"
    assert execution.decide_batching("m", lambda: None, lambda: None, configured=None, cache=cache).max_batch_size > 1
    configured = execution.decide_batching("m", lambda: spin(overhead), lambda: spin(overhead), configured=1,
                                           cache=cache)
    assert configured == execution.BatchingChoice(1, "config.json batching.max_batch_size")
    refused = execution.decide_batching("n", lambda: spin(overhead), lambda: spin(overhead), configured=None,
                                        cache=None, never="column inputs are not merged into one call")
    assert refused == execution.BatchingChoice(1, "column inputs are not merged into one call")
