"""Iris over V2, REST and gRPC, concurrency 1 and 16: our server against MLServer 1.7 (mlserver-sklearn).

Both servers serve the same ``model.joblib`` and get byte-identical request bodies (one
FP32 row, no ``outputs`` field, so each returns its default outputs: ours returns label,
label name, probabilities, top-k and a prediction id and records the prediction for
feedback; MLServer returns ``predict``). MLServer runs with its default
``parallel_workers=1`` and with 0; the better of the two is the baseline.

Extra rows for our own settings: adaptive batching on, and the prediction log off — the
measurements behind the package defaults.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from bench.common import WORK, loadavg, machine, our_server, run_load, table, write_result
from bench.loadgen import LoadResult
from bench.mlserver import PINS, mlserver
from bench.packages import iris

ROW = [5.9, 3.0, 5.1, 1.8]
CONCURRENCY = (1, 16)
PROTOCOLS = ("rest", "grpc")


def rest_body() -> bytes:
    return json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}).encode()


def grpc_body(model: str = "iris") -> bytes:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input-0", datatype="FP32", shape=[1, 4], contents=pb.InferTensorContents(fp32_contents=ROW))])
    return request.SerializeToString()


def _drive(svc: Any, label: str, requests: int, cases: list[tuple[str, int]]) -> list[dict[str, Any]]:
    rows = []
    for protocol, concurrency in cases:
        target = f"{svc.http_url}/v2/models/iris/infer" if protocol == "rest" else svc.grpc_target
        body = rest_body() if protocol == "rest" else grpc_body()
        load = loadavg()
        result = run_load(protocol, target, body, concurrency, requests, server_pid=svc.process.pid)
        if result.errors:
            raise RuntimeError(f"{label} {protocol} c={concurrency}: {result.errors} errors, "
                               f"first: {result.first_error}")
        rows.append({"server": label, "protocol": protocol, "concurrency": concurrency, "loadavg": load,
                     **asdict(result)})
        print(f"  {label:<28} {protocol:<4} c={concurrency:<3} {result.throughput:8.0f} req/s  "
              f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  "
              f"server CPU {result.server_cpu_ms:5.2f} ms/req (load {load[0]})", flush=True)
    return rows


def run(requests: int = 5000, quick: bool = False) -> dict[str, Any]:
    if quick:
        requests = min(requests, 1000)
    info = machine()
    cases = [(p, c) for p in PROTOCOLS for c in CONCURRENCY]
    models = WORK / "iris-models"
    package = iris(models)
    rows: list[dict[str, Any]] = []
    variants: list[tuple[str, list[str], dict[str, str]]] = [("ours", [], {})]
    if not quick:
        variants += [("ours, batching 32/2ms", ["--max_batch_size", "32", "--max_latency_ms", "2"], {}),
                     ("ours, prediction log off", [], {"KCP_PREDICTION_LOG": "false"})]
    for label, args, env in variants:
        with our_server("iris-ours", models, extra_args=args, env=env) as svc:
            rows += _drive(svc, label, requests, cases if label == "ours" else [c for c in cases if c[1] == 16])
    for workers in (1, 0) if not quick else (1,):
        label = f"MLServer 1.7.1, parallel_workers={workers}"
        with mlserver(f"iris-w{workers}", package.path / "model.joblib", parallel_workers=workers) as svc:
            rows += _drive(svc, label, requests, cases)

    baseline: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r["server"].startswith("MLServer"):
            key = (r["protocol"], r["concurrency"])
            if key not in baseline or r["throughput"] > baseline[key]["throughput"]:
                baseline[key] = r
    for r in rows:
        base = baseline[(r["protocol"], r["concurrency"])]
        r["ratio_vs_mlserver"] = r["throughput"] / base["throughput"]
        r["baseline"] = base["server"]

    ours = {(r["protocol"], r["concurrency"]): r for r in rows if r["server"] == "ours"}
    targets = {
        "rest_c16_ge_1.5x_mlserver": {"value": ours[("rest", 16)]["ratio_vs_mlserver"], "target": 1.5,
                                      "met": ours[("rest", 16)]["ratio_vs_mlserver"] >= 1.5},
        "p99_le_25ms": {"value": max(r["p99_ms"] for r in ours.values()), "target": 25.0,
                        "met": max(r["p99_ms"] for r in ours.values()) <= 25.0},
        "grpc_faster_than_rest": {
            "value": {c: ours[("grpc", c)]["throughput"] / ours[("rest", c)]["throughput"] for c in CONCURRENCY},
            "target": 1.0,
            "met": all(ours[("grpc", c)]["throughput"] > ours[("rest", c)]["throughput"] for c in CONCURRENCY)},
    }
    text = table(
        f"Iris over V2 — {requests} requests per row, load generator in a separate process on the same 2 cores",
        ["server", "protocol", "conc.", "req/s", "p50 ms", "p99 ms", "× MLServer", "load avg"],
        [[r["server"], r["protocol"], r["concurrency"], r["throughput"], r["p50_ms"], r["p99_ms"],
          r["ratio_vs_mlserver"], r["loadavg"][0]] for r in rows])
    for name, t in targets.items():
        print(f"  target {name}: {'met' if t['met'] else 'MISSED'} ({t['value']})")
    payload = {"benchmark": "iris", "machine": info, "requests_per_row": requests, "package": package.source,
               "mlserver": PINS, "rows": rows, "targets": targets, "table": text,
               "loadavg_at_end": loadavg(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_result("iris", payload)
    return payload


def check_same_answers() -> None:  # pragma: no cover - a manual sanity check, `python -m bench.iris`
    """Both servers must agree on the label for the benchmark row (else we would compare different work)."""
    import httpx

    models = WORK / "iris-models"
    package = iris(models)
    with our_server("iris-ours", models) as ours, mlserver("iris-check", package.path / "model.joblib") as ml:
        a = httpx.post(f"{ours.http_url}/v2/models/iris/infer", content=rest_body()).json()
        b = httpx.post(f"{ml.http_url}/v2/models/iris/infer", content=rest_body()).json()
    label = next(o for o in a["outputs"] if o["name"] == "label")["data"]
    predict = next(o for o in b["outputs"] if o["name"] == "predict")["data"]
    print("ours:", label, "MLServer:", predict)
    assert np.array_equal(label, predict)


__all__ = ["LoadResult", "check_same_answers", "run"]

if __name__ == "__main__":
    check_same_answers()
