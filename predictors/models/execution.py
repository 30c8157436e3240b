"""Where a model's predictions run (on the event loop or in the thread pool), and whether concurrent
requests share one call (the adaptive batcher).

A thread-pool hop costs more than a small model's whole call, while a slow call inline stalls every
other request. The choice is made once per model from the median CPU time of many one-row calls
(a median of CPU time hardly moves with other load, unlike the fastest of a few wall-clock calls),
and remembered per machine and package in a small JSON file, so that every start on the same machine
serves the same way. ``inline_predict`` in config.json overrides it.

Batching pays where a model's per-call overhead dwarfs its per-row work (scikit-learn's Python around
a neighbour search or a forest, a Keras call): merged rows then cost a fraction of separate calls.
Where a call is already cheap, the batcher's own hand-off costs more than merging saves. So, unless
config.json sets ``batching.max_batch_size``, the batcher is on when a row merged into a
:data:`BATCH_PROBE_ROWS`-row call saves at least :data:`BATCH_MIN_SAVING_SECONDS` of CPU against a
call of its own; decided and remembered the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

INLINE_MAX_SECONDS = 0.0005
"""A model whose median one-row call takes less CPU than this predicts on the event loop."""
MIN_CALLS = 30
MAX_CALLS = 300
TIMING_BUDGET_S = 0.5
"""Timing stops after MAX_CALLS or this long, whichever is first, but never before MIN_CALLS."""

BATCH_PROBE_ROWS = 16
"""Rows of the merged call timed against one-row calls."""
MIN_MERGED_CALLS = 5
"""Merged calls are timed at least this often (not MIN_CALLS): on a large image model each is expensive, and
what they must show is a difference of several times, not a few per cent."""
BATCH_MIN_SAVING_SECONDS = 0.0001
"""CPU a merged row must save (against a call of its own) for the batcher to be worth its hand-off."""
AUTO_BATCH_ROWS = 32
"""The batcher's row limit when timing turns it on."""

Mode = Literal["inline", "thread_pool"]


@dataclass(frozen=True)
class ExecutionChoice:
    mode: Mode
    basis: str


@dataclass(frozen=True)
class BatchingChoice:
    """``max_batch_size`` 1: no batcher."""

    max_batch_size: int
    basis: str


def decide(key: str, call: Callable[[], object], *, override: bool | None, cache: Path | None,
           never_inline: str | None = None) -> ExecutionChoice:
    """The execution mode for a model. ``key`` identifies the package and runtime; ``call`` runs one row;
    ``never_inline`` is the reason a framework always goes to the thread pool unless config says otherwise."""
    if override is not None:
        return ExecutionChoice("inline" if override else "thread_pool", "config.json inline_predict")
    if never_inline is not None:
        return ExecutionChoice("thread_pool", never_inline)
    machine_key = f"{key}|{_machine()}"
    remembered = _read(cache).get(machine_key)
    if remembered is not None and remembered.get("mode") in ("inline", "thread_pool"):
        return ExecutionChoice(remembered["mode"], f"{remembered['basis']} (remembered for this machine)")
    median = median_cpu_seconds(call)
    mode: Mode = "inline" if median < INLINE_MAX_SECONDS else "thread_pool"
    choice = ExecutionChoice(mode, f"median one-row call {median * 1e6:.0f} µs of CPU; inline below "
                                   f"{INLINE_MAX_SECONDS * 1e6:.0f} µs")
    _remember(cache, machine_key, asdict(choice))
    return choice


def decide_batching(key: str, one_row: Callable[[], object], merged: Callable[[], object], *,
                    configured: int | None, cache: Path | None, never: str | None = None) -> BatchingChoice:
    """Whether concurrent requests share one call. ``one_row`` runs one row, ``merged`` runs
    :data:`BATCH_PROBE_ROWS` rows; ``configured`` is config.json's ``max_batch_size`` (None: decide here);
    ``never`` is the reason a model cannot merge requests."""
    if configured is not None:
        return BatchingChoice(configured, "config.json batching.max_batch_size")
    if never is not None:
        return BatchingChoice(1, never)
    machine_key = f"{key}|batching|{_machine()}"
    remembered = _read(cache).get(machine_key)
    if remembered is not None and isinstance(remembered.get("max_batch_size"), int):
        return BatchingChoice(remembered["max_batch_size"], f"{remembered['basis']} (remembered for this machine)")
    single = median_cpu_seconds(one_row)
    per_merged_row = median_cpu_seconds(merged, min_calls=MIN_MERGED_CALLS) / BATCH_PROBE_ROWS
    saving = single - per_merged_row
    rows = AUTO_BATCH_ROWS if saving >= BATCH_MIN_SAVING_SECONDS else 1
    choice = BatchingChoice(rows, f"a row costs {single * 1e6:.0f} µs of CPU alone and {per_merged_row * 1e6:.0f} µs "
                                  f"in a {BATCH_PROBE_ROWS}-row call; batching when that saves "
                                  f"{BATCH_MIN_SAVING_SECONDS * 1e6:.0f} µs or more")
    _remember(cache, machine_key, asdict(choice))
    return choice


def median_cpu_seconds(call: Callable[[], object], min_calls: int = MIN_CALLS) -> float:
    """Median thread CPU time of repeated calls, after one untimed warm-up call."""
    call()
    samples: list[float] = []
    deadline = time.perf_counter() + TIMING_BUDGET_S
    while len(samples) < MAX_CALLS and (len(samples) < min_calls or time.perf_counter() < deadline):
        start = time.thread_time()
        call()
        samples.append(time.thread_time() - start)
    return statistics.median(samples)


def package_key(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def file_fingerprint(path: Path) -> str:
    """Content hash of a (model) file: a rebuilt artifact gets a fresh choice."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def _machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}|{cpu}|{os.cpu_count()}"


def _read(cache: Path | None) -> dict[str, dict[str, Any]]:
    if cache is None or not cache.is_file():
        return {}
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("basis"), str)} \
        if isinstance(data, dict) else {}


def _remember(cache: Path | None, key: str, choice: dict[str, Any]) -> None:
    """Best effort: a read-only file system only means the next start times again."""
    if cache is None:
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = _read(cache)
        data[key] = choice
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(cache)
    except OSError as exc:
        logger.debug("could not remember the execution choice in %s: %s", cache, exc)
