"""Keep the cyclic garbage collector's full collections off the serving path.

A server with TensorFlow and Keras loaded holds about half a million Python objects, nearly
all of them alive for as long as its models are. Python's full collection walks every one of
them, holding the GIL: on the 2-core bench machine one took about 0.4 s, paused the event loop
(every request in flight waited) and came every few thousand Fashion-MNIST requests: with the
young and middle collections, 82 µs of CPU per request at 64 clients, and the pauses in the p99
(bench/RESULTS.md).

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
holds a few dozen containers across its awaits; with 64 in flight, collecting every 700 allocations
found them alive, promoted them and walked them again one generation up: 328 young collections
cost the Fashion-MNIST server 20 µs per request at 64 clients, 5 did at this threshold."""


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
