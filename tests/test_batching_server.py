"""Adaptive batching through the real server, over real sockets, REST and gRPC at once.

One server serves each model twice, batched (``iris``, ``digits``) and unbatched
(``*-unbatched``, ``max_batch_size`` 1): one process keeps TensorFlow's start-up cost single
on a busy machine. Tests compare the twins, drive the batched model from 64 concurrent
clients over both protocols, poison requests among their batch-mates, and read the batch
metrics from ``/metrics``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from predictors.package import Batching, LabelsFile, PackageConfig, TensorSpec, save_package
from tests.fixtures.server import REPO, ServerHandle, start_model_server
from tests.support.v2 import raw_stub

IRIS_NAMES = ["setosa", "versicolor", "virginica"]
FRAGILE_CLIENTS = 8
CLIENTS = 64
STARTUP_S = 300.0  # TensorFlow import on a shared, busy 2-core machine; a readiness bound, not a speed check


# --- packages and servers ----------------------------------------------------------------------


def _iris_package(path: Path, name: str, estimator: Any, batching: Batching,
                  inline_predict: bool | None = None) -> None:
    path.mkdir(parents=True)
    joblib.dump(estimator, path / "model.joblib")
    save_package(path, PackageConfig(format_version=1, name=name, version="1", framework="sklearn",
                                     task="tabular_classification", artifact="model.joblib",
                                     inputs=[TensorSpec(name="input-0", datatype="FP32", shape=[-1, 4])],
                                     batching=batching, inline_predict=inline_predict),
                 LabelsFile(labels=[0, 1, 2], names=IRIS_NAMES))


_BUILD_CNN = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
keras.utils.set_random_seed(7)
model = keras.Sequential([
    keras.Input((28, 28)), keras.layers.Reshape((28, 28, 1)),
    keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.MaxPooling2D(),
    keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax"),
])
head = model.layers[-1]
kernel, bias = head.get_weights()
head.set_weights([kernel * 20.0, bias])
model.save(sys.argv[1])
"""


def _image_packages(root: Path, names: dict[str, Batching]) -> None:
    """One small CNN with fixed random weights, packaged under each name; a scaled head keeps scores apart.

    Built in a child process: TensorFlow loaded into the test process makes grpc_tools' protoc
    (used by the raw gRPC stub) crash, and keeps hundreds of MB resident for the whole session.
    The file is cached in .pytest_cache by the build script's hash (a TensorFlow start saved per run).
    """
    digest = hashlib.sha256(_BUILD_CNN.encode()).hexdigest()[:16]
    cached = REPO / ".pytest_cache" / "batching-cnn" / digest / "model.keras"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"partial-{os.getpid()}.keras")  # renamed into place: safe for parallel runs
        subprocess.run([sys.executable, "-c", _BUILD_CNN, str(partial)], check=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=STARTUP_S)
        os.replace(partial, cached)
    for name, batching in names.items():
        path = root / name
        path.mkdir(parents=True)
        shutil.copyfile(cached, path / "model.keras")
        save_package(path, PackageConfig(format_version=1, name=path.name, version="1", framework="keras",
                                         task="image_classification", artifact="model.keras",
                                         inputs=[TensorSpec(name="input-0", datatype="FP32", shape=[-1, 28, 28])],
                                         batching=batching),
                     LabelsFile(labels=list(range(10))))


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each model twice, batched and unbatched, so one server process (one TensorFlow start) serves both."""
    root = tmp_path_factory.mktemp("batching") / "models"
    x, y = load_iris(return_X_y=True)
    iris = LogisticRegression(max_iter=500).fit(x, y)
    _iris_package(root / "iris", "iris", iris, Batching(max_batch_size=32, max_latency_ms=5))
    _iris_package(root / "iris-unbatched", "iris-unbatched", iris, Batching(max_batch_size=1))
    # Squares its inputs first: a finite but huge feature overflows to inf and the model raises,
    # which is how one request passes validation and still fails inside a shared model call. In the thread
    # pool, so every request goes through the batcher's queue (a lone request to an inline model skips it).
    fragile = make_pipeline(FunctionTransformer(np.square), LogisticRegression(max_iter=500)).fit(x, y)
    _iris_package(root / "iris-fragile", "iris-fragile", fragile, Batching(max_batch_size=8, max_latency_ms=20),
                  inline_predict=False)
    _image_packages(root, {"digits": Batching(max_batch_size=16, max_latency_ms=5),
                           "digits-unbatched": Batching(max_batch_size=1)})
    return root


@pytest.fixture(scope="module")
def server(packages: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    with start_model_server(packages, tmp_path_factory.mktemp("batching-server"), timeout=STARTUP_S) as handle:
        yield handle


@pytest.fixture(scope="module")
def iris_model(packages: Path) -> Any:
    return joblib.load(packages / "iris" / "model.joblib")


@pytest.fixture(scope="module")
def fragile_model(packages: Path) -> Any:
    return joblib.load(packages / "iris-fragile" / "model.joblib")


# --- clients: one request shape, two protocols --------------------------------------------------


def rest_body(request_id: str, features: np.ndarray, ids: list[str], datatype: str = "FP64") -> dict[str, Any]:
    return {"id": request_id, "inputs": [
        {"name": "input-0", "shape": list(features.shape), "datatype": datatype, "data": features.ravel().tolist()},
        {"name": "ids", "shape": [len(ids)], "datatype": "BYTES", "data": ids}]}


async def rest_infer(client: httpx.AsyncClient, model: str, request_id: str, features: np.ndarray,
                     ids: list[str]) -> dict[str, Any]:
    response = await client.post(f"/v2/models/{model}/infer", json=rest_body(request_id, features, ids))
    if response.status_code != 200:
        return {"status": response.status_code, "error": response.text}
    body = response.json()
    outputs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in body["outputs"]}
    return {"status": 200, "id": body["id"], "label": outputs["label"].tolist(),
            "probabilities": outputs["probabilities"].astype(np.float32),
            "ids": [str(i) for i in outputs["ids"].tolist()]}


def _decode_raw(datatype: str, shape: list[int], raw: bytes) -> np.ndarray:
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            n = int.from_bytes(raw[offset:offset + 4], "little")
            values.append(raw[offset + 4:offset + 4 + n])
            offset += 4 + n
        return np.asarray(values, dtype=object)
    return np.frombuffer(raw, dtype={"INT64": np.int64, "FP32": np.float32}[datatype]).reshape(shape)


def _decode_typed(out: Any) -> np.ndarray:
    field = {"INT64": "int64_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}[out.datatype]
    return np.asarray(list(getattr(out.contents, field))).reshape(list(out.shape))


async def grpc_infer(stub: Any, model: str, request_id: str, features: np.ndarray, ids: list[str]) -> dict[str, Any]:
    m = stub.messages
    tensor = m["ModelInferRequest"].InferInputTensor
    request = m["ModelInferRequest"](model_name=model, id=request_id, inputs=[
        tensor(name="input-0", datatype="FP64", shape=list(features.shape),
               contents=m["InferTensorContents"](fp64_contents=features.ravel().tolist())),
        tensor(name="ids", datatype="BYTES", shape=[len(ids)],
               contents=m["InferTensorContents"](bytes_contents=[i.encode() for i in ids]))])
    try:
        response = await stub.ModelInfer(request)
    except grpc.aio.AioRpcError as exc:
        return {"status": exc.code().name, "error": exc.details()}
    outputs = {}
    for i, out in enumerate(response.outputs):
        outputs[out.name] = (_decode_raw(out.datatype, list(out.shape), response.raw_output_contents[i])
                             if response.raw_output_contents else _decode_typed(out))
    return {"status": 200, "id": response.id, "label": outputs["label"].tolist(),
            "probabilities": outputs["probabilities"].astype(np.float32),
            "ids": [v.decode() for v in outputs["ids"].tolist()]}


class Clients:
    """An async REST client and an async gRPC stub for one server."""

    def __init__(self, server: ServerHandle) -> None:
        self.server = server

    async def __aenter__(self) -> Clients:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        self.rest = httpx.AsyncClient(base_url=self.server.http_url, timeout=60.0, limits=limits)
        self.channel = grpc.aio.insecure_channel(self.server.grpc_target)
        self.grpc = raw_stub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.rest.aclose()
        await self.channel.close()

    async def infer(self, protocol: str, model: str, request_id: str, features: np.ndarray,
                    ids: list[str]) -> dict[str, Any]:
        if protocol == "rest":
            return await rest_infer(self.rest, model, request_id, features, ids)
        return await grpc_infer(self.grpc, model, request_id, features, ids)


def batch_histogram(server: ServerHandle, model: str) -> dict[float, float]:
    """Cumulative bucket counts of ``classifier_batch_requests`` for one model, from /metrics."""
    text = httpx.get(f"{server.http_url}/metrics", timeout=10.0).text
    pattern = re.compile(r'^classifier_batch_requests_bucket\{(.*)\} (\S+)$', re.MULTILINE)
    buckets: dict[float, float] = {}
    for labels, value in pattern.findall(text):
        if f'model="{model}"' in labels:
            le = re.search(r'le="([^"]+)"', labels)
            assert le is not None
            buckets[float(le.group(1))] = float(value)
    return buckets


# --- tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_iris_results_identical_with_and_without_batching(server, protocol):
    x, _ = load_iris(return_X_y=True)

    async def all_rows(clients: Clients, model: str) -> list[dict[str, Any]]:
        return await asyncio.gather(*(clients.infer(protocol, model, f"r{i}", x[i:i + 1], [f"row-{i}"])
                                      for i in range(len(x))))

    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with Clients(server) as clients:
            return await asyncio.gather(all_rows(clients, "iris"), all_rows(clients, "iris-unbatched"))

    batched, unbatched = asyncio.run(both())
    for i, (on, off) in enumerate(zip(batched, unbatched, strict=True)):
        assert on["status"] == off["status"] == 200, (on, off)
        assert on["id"] == off["id"] == f"r{i}"
        assert on["ids"] == off["ids"] == [f"row-{i}"]
        assert on["label"] == off["label"]
        np.testing.assert_allclose(on["probabilities"], off["probabilities"], rtol=1e-6, atol=1e-7)
    assert batch_histogram(server, "iris-unbatched") == {}  # max_batch_size 1 really is off


def test_image_results_identical_with_and_without_batching(server, mnist_digits):
    images, _ = mnist_digits
    pixels = images.astype(np.float32) / 255.0

    async def one(rest: httpx.AsyncClient, model: str, i: int) -> dict[str, Any]:
        n = 1 + i % 3
        body = {"id": f"img-{i}", "inputs": [{"name": "input-0", "shape": [n, 28, 28], "datatype": "FP32",
                                               "data": pixels[i:i + n].ravel().tolist()}]}
        response = await rest.post(f"/v2/models/{model}/infer", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=60.0) as rest:
            return await asyncio.gather(asyncio.gather(*(one(rest, "digits", i) for i in range(48))),
                                        asyncio.gather(*(one(rest, "digits-unbatched", i) for i in range(48))))

    batched, unbatched = asyncio.run(both())
    for on, off in zip(batched, unbatched, strict=True):
        assert on["id"] == off["id"]
        outs_on = {o["name"]: o for o in on["outputs"]}
        outs_off = {o["name"]: o for o in off["outputs"]}
        assert outs_on["label"]["data"] == outs_off["label"]["data"]
        np.testing.assert_allclose(outs_on["probabilities"]["data"], outs_off["probabilities"]["data"],
                                   rtol=1e-4, atol=1e-6)
    assert batch_histogram(server, "digits")[float("inf")] > 0
    assert batch_histogram(server, "digits-unbatched") == {}


def test_ids_never_cross_under_high_concurrency(server, iris_model):
    """64 clients, REST and gRPC mixed, 1–3 distinct rows per request: every answer matches its own request."""
    rng = np.random.default_rng(1)
    base, _ = load_iris(return_X_y=True)
    rounds = 4

    async def client(clients: Clients, c: int) -> list[tuple[str, np.ndarray, list[str], dict[str, Any]]]:
        protocol = "rest" if c % 2 else "grpc"
        seen = []
        for r in range(rounds):
            n = 1 + (c + r) % 3
            features = base[rng.integers(0, len(base), n)] + rng.normal(0.0, 0.3, (n, 4))
            request_id = f"client-{c}-round-{r}"
            ids = [f"{request_id}-row-{k}" for k in range(n)]
            seen.append((request_id, features, ids, await clients.infer(protocol, "iris", request_id, features, ids)))
        return seen

    async def main() -> list[tuple[str, np.ndarray, list[str], dict[str, Any]]]:
        before = batch_histogram(server, "iris")
        async with Clients(server) as clients:
            results = await asyncio.gather(*(client(clients, c) for c in range(CLIENTS)))
        after = batch_histogram(server, "iris")
        merged = (after[float("inf")] - after[1.0]) - (before.get(float("inf"), 0) - before.get(1.0, 0))
        assert merged > 0, f"no batch held more than one request under {CLIENTS} concurrent clients: {after}"
        return [item for per_client in results for item in per_client]

    answers = asyncio.run(main())
    assert len(answers) == CLIENTS * rounds
    for request_id, features, ids, answer in answers:
        assert answer["status"] == 200, answer
        assert answer["id"] == request_id
        assert answer["ids"] == ids
        expected = iris_model.predict_proba(features).astype(np.float32)
        np.testing.assert_allclose(answer["probabilities"], expected, rtol=1e-5, atol=1e-6)
        assert answer["label"] == expected.argmax(axis=1).tolist()


def test_one_bad_request_fails_alone_in_its_batch(server, fragile_model):
    """Eight clients (REST and gRPC) share ``iris-fragile``'s batches; one of them keeps sending a request
    that overflows the model. Only those fail; the split counter shows they had been merged with others."""
    x, _ = load_iris(return_X_y=True)
    rounds, poison_rounds = 6, {1, 3, 5}

    async def client(clients: Clients, c: int) -> list[tuple[int, int, dict[str, Any]]]:
        out = []
        for r in range(rounds):
            poisoned = c == 0 and r in poison_rounds
            i = (c * rounds + r) % len(x)
            features = np.full((1, 4), 1e200) if poisoned else x[i:i + 1]
            rid = f"f{c}-{r}"
            out.append((i if not poisoned else -1, r,
                        await clients.infer("rest" if c % 2 else "grpc", "iris-fragile", rid, features, [rid])))
        return out

    async def main() -> list[tuple[int, int, dict[str, Any]]]:
        async with Clients(server) as clients:
            per_client = await asyncio.gather(*(client(clients, c) for c in range(FRAGILE_CLIENTS)))
        return [item for items in per_client for item in items]

    before = splits(server, "iris-fragile")
    answers = asyncio.run(main())
    assert splits(server, "iris-fragile") > before, "no poisoned request ever shared a model call"
    failed = [a for i, _, a in answers if i < 0]
    assert len(failed) == len(poison_rounds) and all(a["status"] != 200 for a in failed)
    for i, _, answer in answers:
        if i >= 0:
            assert answer["status"] == 200, answer
            assert answer["label"] == fragile_model.predict(x[i:i + 1]).tolist()


def splits(server: ServerHandle, model: str) -> float:
    text = httpx.get(f"{server.http_url}/metrics", timeout=10.0).text
    found = re.search(rf'^classifier_batch_splits_total\{{model="{re.escape(model)}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0
