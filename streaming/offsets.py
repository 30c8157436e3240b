"""Ordered offset tracking: which Kafka offset is safe to commit while work finishes out of order.

The bridge processes many records of one partition concurrently, and they finish in any order.
Kafka stores a single committed offset per partition meaning "everything below this is done",
so committing the offset of whatever finished last would lose the records still in flight if the
process died. This module keeps, per partition, the offsets handed out and which are done, and
answers the only safe commit point: the lowest offset not yet done (or one past the highest seen).

A partition's tracker is *retired* when the partition is revoked in a rebalance: acknowledgements
that arrive later for its records are ignored, because another consumer now owns that offset.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class PartitionTracker:
    """Offsets of one partition during one assignment (not thread-safe; guarded by OffsetTracker)."""

    topic: str
    partition: int
    pending: OrderedDict[int, bool] = field(default_factory=OrderedDict)
    next_offset: int | None = None  # one past the highest offset seen
    committed: int | None = None
    retired: bool = False

    def add(self, offset: int) -> None:
        if self.next_offset is not None and offset < self.next_offset and offset not in self.pending:
            # An offset already completed in this assignment came round again: it must not move
            # the commit point backwards, and it needs no tracking.
            return
        self.pending.setdefault(offset, False)
        if self.next_offset is None or offset >= self.next_offset:
            self.next_offset = offset + 1

    def done(self, offset: int) -> None:
        if offset in self.pending:
            self.pending[offset] = True
        while self.pending:
            _first, finished = next(iter(self.pending.items()))
            if not finished:
                break
            self.pending.popitem(last=False)

    def safe_offset(self) -> int | None:
        """The offset to commit: lowest still pending, else one past the highest seen."""
        if self.pending:
            return next(iter(self.pending))
        return self.next_offset

    @property
    def in_flight(self) -> int:
        return len(self.pending)


class OffsetTracker:
    """All partitions of one consumer; ``add`` / ``done`` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._partitions: dict[tuple[str, int], PartitionTracker] = {}

    def assign(self, topic: str, partition: int, committed: int | None = None) -> PartitionTracker:
        """Start tracking a newly assigned partition (retiring any older tracker for it)."""
        with self._lock:
            old = self._partitions.get((topic, partition))
            if old is not None:
                old.retired = True
            tracker = PartitionTracker(topic, partition, committed=committed)
            self._partitions[(topic, partition)] = tracker
            return tracker

    def revoke(self, topic: str, partition: int) -> None:
        with self._lock:
            tracker = self._partitions.pop((topic, partition), None)
            if tracker is not None:
                tracker.retired = True

    def tracker(self, topic: str, partition: int) -> PartitionTracker:
        with self._lock:
            tracker = self._partitions.get((topic, partition))
            if tracker is None:
                tracker = PartitionTracker(topic, partition)
                self._partitions[(topic, partition)] = tracker
            return tracker

    def add(self, tracker: PartitionTracker, offset: int) -> None:
        with self._lock:
            if not tracker.retired:
                tracker.add(offset)

    def done(self, tracker: PartitionTracker, offset: int) -> None:
        with self._lock:
            if not tracker.retired:
                tracker.done(offset)

    def to_commit(self, only: set[tuple[str, int]] | None = None) -> dict[tuple[str, int], int]:
        """Partitions whose safe offset moved past what was last committed, with that offset."""
        with self._lock:
            out: dict[tuple[str, int], int] = {}
            for key, tracker in self._partitions.items():
                if only is not None and key not in only:
                    continue
                safe = tracker.safe_offset()
                if safe is not None and (tracker.committed is None or safe > tracker.committed):
                    out[key] = safe
            return out

    def mark_committed(self, offsets: dict[tuple[str, int], int]) -> None:
        with self._lock:
            for key, offset in offsets.items():
                tracker = self._partitions.get(key)
                if tracker is not None and (tracker.committed is None or offset > tracker.committed):
                    tracker.committed = offset

    def in_flight(self) -> int:
        with self._lock:
            return sum(t.in_flight for t in self._partitions.values())
