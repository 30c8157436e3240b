"""The models users bring, served by us, MLServer 1.7 (scikit-learn runtime) and stock KServe 0.21.

MLServer runs with ``parallel_workers`` 0 (inference in the server process) and 1 (in a worker process);
the better of the peers at each protocol and concurrency is the baseline.

Each zoo model is fitted once on Iris and saved as one ``model.joblib``; all three servers load that
file. Ours packages it with ``python -m predictors package`` (so it is served compiled where the
compiled model answers as the estimator, else by scikit-learn; the table says which). The
``ColumnTransformer`` pipeline over a data frame with string categories is served by ours only: the
peers' scikit-learn runtimes take one numeric tensor. Per model, the three servers run at once and are
driven in turn, round after round, REST and gRPC at 1 and 16 clients; medians of the rounds, and the
server's CPU per request from its own process counters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np

from bench.common import WORK, Contender, interleave, loadavg, machine, our_server, table, write_result
from bench.kserve_stock import kserve_stock
from bench.loadgen import Protocol
from bench.mlserver import PINS, mlserver

ROW = [5.9, 3.0, 5.1, 1.8]
CASES: list[tuple[Protocol, int]] = [("rest", 1), ("rest", 16), ("grpc", 1), ("grpc", 16)]
GRPC_CASES = [case for case in CASES if case[0] == "grpc"]
OURS = "ours"
OURS_GRPCIO = "ours, --grpc-front grpcio"
MLSERVER = "MLServer 1.7.1, parallel_workers={}"
KSERVE = "KServe 0.21 (stock)"
PEERS = (MLSERVER.format(0), MLSERVER.format(1), KSERVE)
CUSTOMER = {"age": [52], "income": [61.5], "city": ["paris"], "plan": ["pro"]}


def zoo() -> dict[str, Callable[[], Any]]:
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "pipeline": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "random-forest": lambda: RandomForestClassifier(100, random_state=0),
        "hist-gradient-boosting": lambda: HistGradientBoostingClassifier(max_iter=100, random_state=0),
        "svc": lambda: SVC(probability=True, random_state=0),
        "k-neighbours": lambda: KNeighborsClassifier(5),
    }


def build(root: Path) -> dict[str, dict[str, Any]]:
    """Fit every zoo model, save its joblib, and package it for our server (one model directory)."""
    import pandas as pd
    from sklearn.datasets import load_iris

    from predictors.packaging import package_estimator

    x, y = load_iris(return_X_y=True, as_frame=False)
    files = root / "joblib"
    models = root / "models"
    files.mkdir(parents=True, exist_ok=True)
    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    pd.DataFrame(x, columns=columns).to_csv(root / "iris.csv", index=False)
    built: dict[str, dict[str, Any]] = {}
    for name, make in zoo().items():
        path = files / f"{name}.joblib"
        joblib.dump(make().fit(x, y), path)
        report = package_estimator(path, models / name, name=name, data=root / "iris.csv", force=True)
        built[name] = {"file": path, "runtime": report.runtime, "reason": report.runtime_reason}
    frame = _customers()
    path = files / "column-transformer.joblib"
    joblib.dump(_column_pipeline().fit(frame, _churn(frame)), path)
    frame.to_csv(root / "customers.csv", index=False)
    report = package_estimator(path, models / "column-transformer", name="column-transformer",
                               data=root / "customers.csv", force=True)
    built["column-transformer"] = {"file": path, "runtime": report.runtime, "reason": report.runtime_reason,
                                   "ours_only": True}
    return built


def _customers(n: int = 1000) -> Any:
    import pandas as pd

    rng = np.random.default_rng(0)
    return pd.DataFrame({"age": rng.integers(18, 80, n), "income": rng.normal(50, 15, n).round(2),
                         "city": rng.choice(["paris", "rome", "oslo", "lima"], n),
                         "plan": rng.choice(["basic", "pro"], n)})


def _churn(frame: Any) -> np.ndarray:
    return np.where((frame.age > 40) & (frame.city != "rome"), "churn", "stay")


def _column_pipeline() -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    return Pipeline([("columns", ColumnTransformer([("num", StandardScaler(), ["age", "income"]),
                                                    ("cat", OneHotEncoder(handle_unknown="ignore"),
                                                     ["city", "plan"])])),
                     ("forest", RandomForestClassifier(100, random_state=0))])


def rest_body(model: str) -> bytes:
    if model == "column-transformer":
        types = {"age": "INT64", "income": "FP64", "city": "BYTES", "plan": "BYTES"}
        return json.dumps({"inputs": [{"name": k, "datatype": types[k], "shape": [1], "data": v}
                                      for k, v in CUSTOMER.items()]}).encode()
    return json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}).encode()


def grpc_body(model: str) -> bytes:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    tensor, contents = pb.ModelInferRequest.InferInputTensor, pb.InferTensorContents
    if model == "column-transformer":
        inputs = [tensor(name="age", datatype="INT64", shape=[1], contents=contents(int64_contents=CUSTOMER["age"])),
                  tensor(name="income", datatype="FP64", shape=[1],
                         contents=contents(fp64_contents=CUSTOMER["income"])),
                  *(tensor(name=k, datatype="BYTES", shape=[1], contents=contents(bytes_contents=[CUSTOMER[k][0]
                                                                                                  .encode()]))
                    for k in ("city", "plan"))]
    else:
        inputs = [tensor(name="input-0", datatype="FP32", shape=[1, 4], contents=contents(fp32_contents=ROW))]
    return pb.ModelInferRequest(model_name=model, inputs=inputs).SerializeToString()


def _contender(label: str, svc: Any, model: str, requests: int,
               cases: list[tuple[Protocol, int]] | None = None) -> Contender:
    def body(protocol: Protocol) -> bytes:
        return rest_body(model) if protocol == "rest" else grpc_body(model)

    def target(protocol: Protocol) -> str:
        return f"{svc.http_url}/v2/models/{model}/infer" if protocol == "rest" else svc.grpc_target

    return Contender(label, svc, body, target, cases=cases, requests=requests)


def _requests_for(url: str, body: bytes, seconds: float, floor: int = 200, ceiling: int = 4000) -> int:
    """Requests that take about ``seconds`` at one client, from a short probe of the server."""
    with httpx.Client(timeout=30) as client:
        for _ in range(5):
            client.post(url, content=body)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 0.5:
            client.post(url, content=body)
            n += 1
    rate = n / (time.perf_counter() - start)
    return int(min(ceiling, max(floor, rate * seconds)))


def run(requests_seconds: float = 3.0, rounds: int = 3, quick: bool = False, only: list[str] | None = None
        ) -> dict[str, Any]:
    if quick:
        requests_seconds, rounds = 1.0, 1
    info = machine()
    root = WORK / "zoo"
    built = build(root)
    rows: list[dict[str, Any]] = []
    for model, facts in built.items():
        if only and model not in only:
            continue
        print(f"-- {model}: ours serves it with {facts['runtime']} ({facts['reason']})", flush=True)
        with ExitStack() as stack:
            ours = stack.enter_context(our_server(f"zoo-ours-{model}", root / "models" / model,
                                                  env={"KCP_EXECUTION_CACHE": ""}))
            requests = _requests_for(f"{ours.http_url}/v2/models/{model}/infer", rest_body(model), requests_seconds)
            ours_grpcio = stack.enter_context(our_server(f"zoo-ours-grpcio-{model}", root / "models" / model,
                                                         extra_args=["--grpc-front", "grpcio"],
                                                         env={"KCP_EXECUTION_CACHE": ""}))
            contenders = [_contender(OURS, ours, model, requests),
                          _contender(OURS_GRPCIO, ours_grpcio, model, requests, cases=GRPC_CASES)]
            if not facts.get("ours_only"):
                peers = [(MLSERVER.format(workers), stack.enter_context(mlserver(
                    f"zoo-{model}-w{workers}", facts["file"], model_name=model, parallel_workers=workers)))
                    for workers in (0, 1)]
                peers.append((KSERVE, stack.enter_context(kserve_stock(f"zoo-kserve-{model}", facts["file"],
                                                                       model_name=model))))
                for label, svc in peers:
                    url = f"{svc.http_url}/v2/models/{model}/infer"
                    contenders.append(_contender(label, svc, model, _requests_for(url, rest_body(model),
                                                                                   requests_seconds)))
            for row in interleave(contenders, CASES, 0, rounds):
                rows.append({**row, "model": model,
                             "runtime": facts["runtime"] if row["server"] in (OURS, OURS_GRPCIO) else None})
    targets = _targets(rows)
    text = table(
        f"Model zoo over V2 — median of {rounds} interleaved rounds of about {requests_seconds:.0f} s at one client; "
        "load generator in a separate process on the same 2 cores",
        ["model", "server", "protocol", "conc.", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "× best peer",
         "CPU × best peer"],
        [[r["model"], r["server"] + (f" ({r['runtime']})" if r.get("runtime") else ""), r["protocol"],
          r["concurrency"], r["throughput"], r["p50_ms"], r["p99_ms"], r["server_cpu_ms"], r.get("ratio"),
          r.get("cpu_ratio")] for r in rows])
    for name, t in targets.items():
        print(f"  target {name}: {'met' if t['met'] else 'MISSED'} ({t['value']})")
    payload = {"benchmark": "zoo", "machine": info, "rounds": rounds, "mlserver": PINS,
               "models": {k: {"runtime": v["runtime"], "reason": v["reason"]} for k, v in built.items()},
               "rows": rows, "targets": targets, "table": text, "loadavg_at_end": loadavg(),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_result("zoo", payload)
    return payload


def _targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model the peers serve: ours against the better peer at each protocol and concurrency."""
    targets: dict[str, dict[str, Any]] = {}
    by_key = {(r["model"], r["server"], r["protocol"], r["concurrency"]): r for r in rows}
    for (model, server, protocol, conc), ours in by_key.items():
        if server not in (OURS, OURS_GRPCIO):
            continue
        peers = [by_key[(model, p, protocol, conc)] for p in PEERS if (model, p, protocol, conc) in by_key]
        if server == OURS_GRPCIO:  # shown next to the default front end, not counted against the targets
            if peers:
                ours["ratio"] = ours["throughput"] / max(p["throughput"] for p in peers)
                ours["cpu_ratio"] = ours["server_cpu_ms"] / min(p["server_cpu_ms"] for p in peers)
            continue
        if conc == 16:
            targets[f"{model}_{protocol}_c16_p99_le_25ms"] = _target(ours["p99_ms"], 25.0, at_most=True)
        if not peers:
            continue
        best = max(peers, key=lambda r: r["throughput"])
        ours["ratio"] = ours["throughput"] / best["throughput"]
        ours["cpu_ratio"] = ours["server_cpu_ms"] / min(p["server_cpu_ms"] for p in peers)
        goal = 2.0 if conc == 16 else 1.5
        targets[f"{model}_{protocol}_c{conc}_ge_{goal}x_best_peer"] = _target(ours["ratio"], goal)
        targets[f"{model}_{protocol}_c{conc}_cpu_le_0.5x_peer"] = _target(ours["cpu_ratio"], 0.5, at_most=True)
    return targets


def _target(value: float, goal: float, at_most: bool = False) -> dict[str, Any]:
    return {"value": round(value, 2), "target": goal, "met": value <= goal if at_most else value >= goal}


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv, only=[a for a in sys.argv[1:] if not a.startswith("--")] or None)
