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
