"""The in-process ceiling: how many images per second the model itself manages with ``predict_on_batch``.

No server, no network, no decoding: the Keras model called on ready float32 batches in a
loop, with TensorFlow's default thread pools (one thread per core; the server uses one). Served
throughput of one image per request at concurrency N is compared with this figure at batch size
N — the best batching could possibly do — and requests of 64 images with batch size 64 (issue
11's target: ≥ 50 %). Runs in its own process (``python -m bench.ceiling MODEL.keras 1 16 64``)
so TensorFlow's threads are not shared with anything else of ours.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def measure(model_path: str, batch_sizes: list[int], seconds: float = 3.0) -> dict[int, float]:
    """Images per second of ``model.predict_on_batch`` for each batch size (after a warm-up)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.models.load_model(model_path, compile=False)
    shape = tuple(d for d in model.input_shape[1:])
    rng = np.random.default_rng(0)
    results: dict[int, float] = {}
    for n in batch_sizes:
        x = rng.random((n, *shape), dtype=np.float32)
        for _ in range(20):
            model.predict_on_batch(x)
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            model.predict_on_batch(x)
            calls += 1
        results[n] = calls * n / elapsed
    return results


def main() -> None:
    path, *sizes = sys.argv[1:]
    print(json.dumps({str(k): v for k, v in measure(path, [int(s) for s in sizes]).items()}))


if __name__ == "__main__":
    main()
