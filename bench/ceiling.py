"""The in-process ceiling: how many images per second the model itself manages with ``predict_on_batch``.

No server, no network, no decoding: the Keras model called on ready float32 batches in a
loop. Served throughput of one image per request at concurrency N is compared with this figure
at batch size N — the best batching could possibly do — and requests of 64 images with batch
size 64 (issue 11's target: ≥ 50 %). Runs in its own process (``python -m bench.ceiling
MODEL.keras 1 16 64``) so TensorFlow's threads are not shared with anything else of ours; the
caller runs it with TensorFlow's default thread pools (one thread per core) and with the
server's one thread, and keeps the better figure. Each batch size is timed in ``repeats``
windows and the best one counts: a ceiling is what the model manages when nothing gets in its
way, and on this machine the hypervisor takes a share of the CPU now and then.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def measure(model_path: str, batch_sizes: list[int], seconds: float = 1.0, repeats: int = 3) -> dict[int, float]:
    """Best images per second of ``model.predict_on_batch`` over ``repeats`` windows, per batch size."""
    from predictors.models.image import ONEDNN_OPTS

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", ONEDNN_OPTS)  # the server's kernels, for a fair ceiling
    import keras

    model = keras.models.load_model(model_path, compile=False)
    shape = tuple(d for d in model.input_shape[1:])
    rng = np.random.default_rng(0)
    batches = {n: rng.random((n, *shape), dtype=np.float32) for n in batch_sizes}
    for x in batches.values():
        for _ in range(20):
            model.predict_on_batch(x)
    results: dict[int, float] = dict.fromkeys(batch_sizes, 0.0)
    for _ in range(repeats):  # the sizes in turn, so a slow spell does not fall on one size only
        for n, x in batches.items():
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                model.predict_on_batch(x)
                calls += 1
            results[n] = max(results[n], calls * n / elapsed)
    return results


def main() -> None:
    path, *sizes = sys.argv[1:]
    print(json.dumps({str(k): v for k, v in measure(path, [int(s) for s in sizes]).items()}))


if __name__ == "__main__":
    main()
