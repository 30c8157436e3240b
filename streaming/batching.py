"""Per-key micro-batching on the event loop: collect briefly, hand off whole batches.

One V2 call per message wastes most of a model server's time on per-call overhead (a Keras
``predict_on_batch`` of 16 rows costs about what one row does). The bridge therefore groups
compatible requests -- same model and tensor signature, see
:meth:`streaming.tensors.InferRequest.batch_key` -- for at most ``max_delay_s`` or until
``max_size`` are waiting, then calls the model once. Latency cost is bounded by ``max_delay_s``.

Runs entirely on the event loop thread (``call_later`` timers), so it needs no locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    """Collect items per key; call ``on_batch(items)`` when a batch is full or its delay expires."""

    def __init__(self, max_size: int, max_delay_s: float, on_batch: Callable[[list[T]], None]) -> None:
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.on_batch = on_batch
        self._batches: dict[Hashable, list[T]] = {}
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}

    def add(self, key: Hashable | None, item: T) -> None:
        """Queue ``item``; a None key (not batchable) is handed off alone at once."""
        if key is None or self.max_size <= 1:
            self.on_batch([item])
            return
        batch = self._batches.setdefault(key, [])
        batch.append(item)
        if len(batch) >= self.max_size:
            self.flush(key)
        elif len(batch) == 1:
            self._timers[key] = asyncio.get_running_loop().call_later(self.max_delay_s, self.flush, key)

    def flush(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        batch = self._batches.pop(key, None)
        if batch:
            self.on_batch(batch)

    def flush_all(self) -> None:
        for key in list(self._batches):
            self.flush(key)

    @property
    def waiting(self) -> int:
        return sum(len(b) for b in self._batches.values())
