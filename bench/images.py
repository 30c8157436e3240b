"""Fashion-MNIST over gRPC with raw tensors: adaptive batching on vs off, one image and 64 images per request.

Each single-image request carries one 28×28 FP32 image in ``raw_input_contents``, at
concurrency 1, 16 and 64; the batch case sends 64 images in one request (``[64, 28, 28]``)
from a few clients. The servers — batching off (``--max_batch_size 1``), batching on with the
package's shipped defaults (``config.json``: 64 rows, 40 ms), and in a full run also batching on
with the previous default's 2 ms window — run at once and are driven in turn round after round
(:func:`bench.common.interleave`). The prediction log is on, as shipped. The ceiling is the
model's own ``predict_on_batch`` throughput at batch size = concurrency (and 64 for the batch
case), measured in a separate process (:mod:`bench.ceiling`, the best of TensorFlow's default
threads and the server's one) in the same run.

Targets (issue 11), with the shipped defaults:

* one image per request at concurrency 64: server CPU ≤ 0.8 ms per request, and batching on
  ≥ 2.5× batching off in throughput;
* 64 images per request: images/s ≥ 50 % of the in-process ``predict_on_batch`` ceiling at batch 64.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import ExitStack
from typing import Any

import numpy as np

from bench.common import (
    PYTHON,
    REPO,
    WORK,
    Contender,
    interleave,
    loadavg,
    machine,
    our_server,
    paired_ratio,
    table,
    write_result,
)
from bench.loadgen import Protocol
from bench.packages import fashion_mnist

CONCURRENCY = (1, 16, 64)
BATCH_IMAGES = 64  # images per request in the batch case
BATCH_CONCURRENCY = 4  # clients sending 64-image requests: enough to keep the model busy while one is parsed
SHIPPED = "batching on (shipped: config.json)"
OFF = "batching off"
CPU_TARGET_MS = 0.8
RATIO_TARGET = 2.5
CEILING_TARGET = 0.5


def image() -> np.ndarray:
    """A real Fashion-MNIST test image when the data set is installed, else a fixed random one."""
    try:
        from training.datasets import load_fashion_mnist

        return load_fashion_mnist().x_test[0].astype(np.float32) / 255.0
    except Exception:  # the data set is optional for a throughput benchmark
        return np.random.default_rng(0).random((28, 28), dtype=np.float32)


def grpc_body(pixels: np.ndarray, model: str = "fashion-mnist", images: int = 1) -> bytes:
    """A serialized ``ModelInferRequest`` with ``images`` copies of ``pixels`` as one raw FP32 tensor."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    batch = np.broadcast_to(pixels.astype("<f4"), (images, *pixels.shape))
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input-0", datatype="FP32", shape=list(batch.shape))],
        raw_input_contents=[np.ascontiguousarray(batch).tobytes()])
    return request.SerializeToString()


def ceiling(model_file: str, sizes: list[int]) -> dict[int, float]:
    """:mod:`bench.ceiling` with TensorFlow's default threads and with the server's one; the better per size."""
    best: dict[int, float] = dict.fromkeys(sizes, 0.0)
    for threads in ({}, {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}):
        done = subprocess.run([PYTHON, "-m", "bench.ceiling", model_file, *map(str, sizes)], cwd=REPO,
                              capture_output=True, text=True, check=True, env={**os.environ, **threads})
        for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items():
            best[int(k)] = max(best[int(k)], v)
    return best


def run(requests: int = 2000, rounds: int = 5, quick: bool = False) -> dict[str, Any]:
    if quick:
        requests, rounds = min(requests, 600), 1
    batch_requests = max(50, requests // 16)
    info = machine()
    models = WORK / "images-models"
    package = fashion_mnist(models)
    pixels = image()
    one, many = grpc_body(pixels), grpc_body(pixels, images=BATCH_IMAGES)
    cases: list[tuple[Protocol, int]] = [("grpc", c) for c in CONCURRENCY]
    batch_cases: list[tuple[Protocol, int]] = [("grpc", BATCH_CONCURRENCY)]
    servers = [(OFF, ["--max_batch_size", "1"]), (SHIPPED, [])]
    if not quick:
        servers.append(("batching on, 64/2ms (old default)", ["--max_batch_size", "64", "--max_latency_ms", "2"]))
    with ExitStack() as stack:
        single, batched = [], []
        for label, args in servers:
            svc = stack.enter_context(our_server(f"images-{len(single)}", models, extra_args=args))
            single.append(Contender(label, svc, lambda _p: one, lambda _p, s=svc: s.grpc_target))
            batched.append(Contender(label, svc, lambda _p: many, lambda _p, s=svc: s.grpc_target))
        rows = interleave(single, cases, requests, rounds)
        print(f"  {BATCH_IMAGES} images per request:", flush=True)
        batch_rows = interleave(batched, batch_cases, batch_requests, rounds)
    load = loadavg()
    top = ceiling(str(package.path / "model.keras"), sorted({*CONCURRENCY, BATCH_IMAGES}))
    off = {r["concurrency"]: r for r in rows if r["server"] == OFF}
    for r in rows:
        r["images_per_request"] = 1
        r["images_per_s"] = r["throughput"]
        r["ratio_vs_off"] = r["throughput"] / off[r["concurrency"]]["throughput"]
        r["paired_ratio_vs_off"] = paired_ratio(r, off[r["concurrency"]])
        r["ceiling"] = top[r["concurrency"]]
        r["fraction_of_ceiling"] = r["throughput"] / top[r["concurrency"]]
    off_batch = {r["concurrency"]: r for r in batch_rows if r["server"] == OFF}
    for r in batch_rows:
        r["images_per_request"] = BATCH_IMAGES
        r["images_per_s"] = r["throughput"] * BATCH_IMAGES
        r["ratio_vs_off"] = r["throughput"] / off_batch[r["concurrency"]]["throughput"]
        r["ceiling"] = top[BATCH_IMAGES]
        r["fraction_of_ceiling"] = r["images_per_s"] / top[BATCH_IMAGES]
    shipped64 = next(r for r in rows if r["concurrency"] == 64 and r["server"] == SHIPPED)
    shipped_batch = next(r for r in batch_rows if r["server"] == SHIPPED)
    targets = {
        "c64_server_cpu_le_0.8ms": {"value": round(shipped64["server_cpu_ms"], 3), "target": CPU_TARGET_MS,
                                    "met": shipped64["server_cpu_ms"] <= CPU_TARGET_MS, "setting": SHIPPED},
        "c64_batching_ge_2.5x_off": {"value": round(shipped64["ratio_vs_off"], 2), "target": RATIO_TARGET,
                                     "met": shipped64["ratio_vs_off"] >= RATIO_TARGET, "setting": SHIPPED},
        "batch64_ge_50pct_ceiling": {"value": round(shipped_batch["fraction_of_ceiling"], 3),
                                     "target": CEILING_TARGET,
                                     "met": shipped_batch["fraction_of_ceiling"] >= CEILING_TARGET,
                                     "setting": f"{SHIPPED}, {BATCH_IMAGES} images/request, c={BATCH_CONCURRENCY}"},
    }
    all_rows = rows + batch_rows
    text = table(
        f"Fashion-MNIST over gRPC (raw FP32 tensors, prediction log on) — median of {rounds} interleaved rounds "
        f"× {requests} requests (1 image each) and × {batch_requests} requests ({BATCH_IMAGES} images each)",
        ["server", "img/req", "conc.", "img/s", "p50 ms", "p99 ms", "server CPU ms/req", "× off", "ceiling img/s",
         "of ceiling", "load avg", "steal %"],
        [[r["server"], r["images_per_request"], r["concurrency"], r["images_per_s"], r["p50_ms"], r["p99_ms"],
          r["server_cpu_ms"], r["ratio_vs_off"], r["ceiling"], f"{100 * r['fraction_of_ceiling']:.0f}%",
          r["loadavg"], r["steal_pct"]] for r in all_rows])
    print(f"  ceiling (in-process predict_on_batch, load {load[0]}): "
          + ", ".join(f"batch {k}: {v:,.0f} img/s" for k, v in top.items()))
    for name, t in targets.items():
        print(f"  target {name}: {'met' if t['met'] else 'MISSED'} ({t['value']} vs {t['target']}, {t['setting']})")
    print(f"  batching on vs off at c=64, median of per-round ratios: {shipped64['paired_ratio_vs_off']:.2f}x")
    payload = {"benchmark": "images", "machine": info, "requests_per_round": requests,
               "batch_requests_per_round": batch_requests, "rounds": rounds, "package": package.source,
               "ceiling": top, "ceiling_loadavg": load, "rows": all_rows, "targets": targets, "table": text,
               "loadavg_at_end": loadavg(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_result("images", payload)
    return payload
