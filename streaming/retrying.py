"""The backoff every retry in ``streaming`` shares, as a ``tenacity`` wait strategy.

Each retry doubles a delay from ``initial_s`` up to ``max_s`` and sleeps a random time in its upper half:
the jitter keeps a fleet of bridges from hammering a server (or broker) that is coming back, and the lower
bound keeps the pauses growing. A ``deadline`` (``time.monotonic()``) cuts the last pause short, so
nothing sleeps past the point where its caller gives up. :func:`retry_after` keeps the library off the
path of calls that succeed at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState

T = TypeVar("T")


class HalfJitterBackoff:
    """``tenacity`` wait: ``uniform(d/2, d)`` with ``d = min(initial_s * 2**(n-1), max_s)`` after try ``n``."""

    def __init__(self, initial_s: float, max_s: float, deadline: float | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.deadline = deadline

    def __call__(self, state: RetryCallState) -> float:
        delay = min(self.initial_s * 2 ** (state.attempt_number - 1), self.max_s)
        pause = random.uniform(delay / 2, delay)
        if self.deadline is not None:
            pause = max(0.0, min(pause, self.deadline - time.monotonic()))
        return pause


async def retry_after(first: Exception, attempt: Callable[[], Awaitable[T]], retrying: AsyncRetrying) -> T:
    """Go on with ``retrying`` after a first try of ``attempt`` failed with ``first``.

    The first try runs outside ``tenacity``: almost every call succeeds at once, and on the bridge's hot path
    (one model call per batch, one broker send per result) the library's per-call bookkeeping would cost more
    than the work itself. ``first`` is replayed as ``retrying``'s first outcome, so the whole policy (what is
    retried, how often, the backoff) is decided by ``tenacity`` alone.
    """
    replay = [first]

    async def again() -> T:
        if replay:
            raise replay.pop()
        return await attempt()

    return await retrying(again)
