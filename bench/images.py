"""Fashion-MNIST over gRPC with raw tensors, concurrency 1, 16 and 64: adaptive batching on vs off.

Each request carries one 28×28 FP32 image in ``raw_input_contents``. The servers (batching
off, and on at a few ``max_latency_ms`` settings) run at once and are driven in turn round
after round (:func:`bench.common.interleave`). The ceiling is the model's own
``predict_on_batch`` throughput at batch size = concurrency, measured in a separate
process (:mod:`bench.ceiling`) in the same run.

Targets: at concurrency 64, batching ≥ 5× no batching and ≥ 50 % of the ceiling.
"""

from __future__ import annotations

import json
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
    table,
    write_result,
)
from bench.loadgen import Protocol
from bench.packages import fashion_mnist

CONCURRENCY = (1, 16, 64)
MAX_BATCH = 64
LATENCIES_MS = (0.0, 2.0)


def image() -> np.ndarray:
    """A real Fashion-MNIST test image when the data set is installed, else a fixed random one."""
    try:
        from training.datasets import load_fashion_mnist

        return load_fashion_mnist().x_test[0].astype(np.float32) / 255.0
    except Exception:  # the data set is optional for a throughput benchmark
        return np.random.default_rng(0).random((28, 28), dtype=np.float32)


def grpc_body(pixels: np.ndarray, model: str = "fashion-mnist") -> bytes:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input-0", datatype="FP32", shape=[1, 28, 28])],
        raw_input_contents=[pixels.astype("<f4").tobytes()])
    return request.SerializeToString()


def ceiling(model_file: str) -> dict[int, float]:
    done = subprocess.run([PYTHON, "-m", "bench.ceiling", model_file, *map(str, CONCURRENCY)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def run(requests: int = 2000, rounds: int = 3, quick: bool = False) -> dict[str, Any]:
    if quick:
        requests, rounds = min(requests, 500), 1
    info = machine()
    models = WORK / "images-models"
    package = fashion_mnist(models)
    body = grpc_body(image())
    cases: list[tuple[Protocol, int]] = [("grpc", c) for c in CONCURRENCY]
    latencies = LATENCIES_MS if not quick else LATENCIES_MS[:1]
    with ExitStack() as stack:
        contenders = []
        for label, args in [("batching off", ["--max_batch_size", "1"]),
                            *((f"batching on, {MAX_BATCH}/{lat:g}ms",
                               ["--max_batch_size", str(MAX_BATCH), "--max_latency_ms", str(lat)])
                              for lat in latencies)]:
            svc = stack.enter_context(our_server(f"images-{label.split(',')[0].replace(' ', '-')}", models,
                                                 extra_args=args))
            contenders.append(Contender(label, svc, lambda _p: body, lambda _p, s=svc: s.grpc_target))
        rows = interleave(contenders, cases, requests, rounds)
    load = loadavg()
    top = ceiling(str(package.path / "model.keras"))
    off = {r["concurrency"]: r for r in rows if r["server"] == "batching off"}
    for r in rows:
        r["ratio_vs_off"] = r["throughput"] / off[r["concurrency"]]["throughput"]
        r["ceiling"] = top[r["concurrency"]]
        r["fraction_of_ceiling"] = r["throughput"] / top[r["concurrency"]]
    best = max((r for r in rows if r["concurrency"] == 64 and r["server"] != "batching off"),
               key=lambda r: r["throughput"])
    targets = {
        "c64_batching_ge_5x_off": {"value": round(best["ratio_vs_off"], 2), "target": 5.0,
                                   "met": best["ratio_vs_off"] >= 5.0, "setting": best["server"]},
        "c64_batching_ge_50pct_ceiling": {"value": round(best["fraction_of_ceiling"], 3), "target": 0.5,
                                          "met": best["fraction_of_ceiling"] >= 0.5, "setting": best["server"]},
    }
    text = table(
        f"Fashion-MNIST over gRPC (raw FP32 tensors, 1 image per request) — median of {rounds} interleaved rounds "
        f"× {requests} requests",
        ["server", "conc.", "img/s", "p50 ms", "p99 ms", "server CPU ms/req", "× off", "ceiling img/s",
         "of ceiling", "load avg"],
        [[r["server"], r["concurrency"], r["throughput"], r["p50_ms"], r["p99_ms"], r["server_cpu_ms"],
          r["ratio_vs_off"], r["ceiling"], f"{100 * r['fraction_of_ceiling']:.0f}%", r["loadavg"]] for r in rows])
    print(f"  ceiling (in-process predict_on_batch, load {load[0]}): "
          + ", ".join(f"batch {k}: {v:,.0f} img/s" for k, v in top.items()))
    for name, t in targets.items():
        print(f"  target {name}: {'met' if t['met'] else 'MISSED'} ({t['value']}, {t['setting']})")
    payload = {"benchmark": "images", "machine": info, "requests_per_round": requests, "rounds": rounds,
               "package": package.source, "ceiling": top, "ceiling_loadavg": load, "rows": rows,
               "targets": targets, "table": text, "loadavg_at_end": loadavg(),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_result("images", payload)
    return payload
