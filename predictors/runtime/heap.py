"""Keep the cyclic garbage collector's full collections off the serving path.

A server with TensorFlow and Keras loaded holds hundreds of thousands of Python objects, nearly
all of them alive for as long as its models are. Python's full collection walks every one of
them, holding the GIL, so each one pauses the event loop (every request in flight waits) for far
longer than a request takes, and under load they come often: the pauses show in the tail latency,
and the young and middle collections add CPU to every request.

So once the models are loaded, what is alive is moved out of the collector's reach
(``gc.freeze``): reference counting still frees those objects, the collector no longer scans
them. A model swapped out or unloaded is garbage that may hold reference cycles, which only a
collection of the frozen objects can free, so a swap thaws everything, collects once and
freezes what is left: one full collection per swap instead of one every few thousand requests.
Young collections still run, less often (:data:`YOUNG_THRESHOLD`).
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000
"""Net allocations between young-generation collections (Python's default: 700). A request in flight
holds a few dozen containers across its awaits; with many requests in flight, collecting at Python's
default finds them alive, promotes them and walks them again one generation up, over and over; at this
threshold most of them are answered and freed before a collection looks at them."""


def freeze_loaded_heap() -> None:
    """Collect the garbage that loading left, exempt every object alive now from the collector, and collect
    young objects less often."""
    started = time.perf_counter()
    gc.unfreeze()  # what an earlier freeze exempted may be garbage now (a swapped-out model)
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    logger.info("%d objects exempted from the cyclic GC (%.0f ms)", gc.get_freeze_count(),
                1000 * (time.perf_counter() - started))
