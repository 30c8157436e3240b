"""The server's GC policy: loaded objects leave the collector's reach, a swap gives garbage back to it."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from predictors.runtime.heap import YOUNG_THRESHOLD, freeze_loaded_heap


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def gc_state() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_loaded_objects_are_frozen_and_young_collections_are_rarer(gc_state: None) -> None:
    alive = Node()
    freeze_loaded_heap()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert not any(o is alive for o in gc.get_objects())  # a full collection no longer walks it


def test_garbage_left_by_loading_is_collected_not_frozen(gc_state: None) -> None:
    garbage = Node()
    ref = weakref.ref(garbage)
    del garbage
    freeze_loaded_heap()
    assert ref() is None


def test_a_swap_collects_the_cycles_of_what_was_frozen(gc_state: None) -> None:
    retired = Node()  # a model loaded at start-up, frozen with everything else
    ref = weakref.ref(retired)
    freeze_loaded_heap()
    del retired  # the model is swapped out: its cycle is garbage now
    gc.collect()
    assert ref() is not None  # frozen objects are out of the collector's reach
    freeze_loaded_heap()  # what the repository does after a load or an unload
    assert ref() is None
