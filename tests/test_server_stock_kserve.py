"""Our package predictor served by stock ``kserve.ModelServer``: a correct V2 answer over REST and gRPC."""

from __future__ import annotations

import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest

from tests.fixtures.ports import free_port, stop_process, wait_for
from tests.fixtures.server import REPO, TRAINED_MODELS
from tests.support.v2 import output, raw_stub, tensor

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]


@pytest.fixture(scope="module")
def stock_server(tmp_path_factory):
    http_port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("stock") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.stock_kserve", str(TRAINED_MODELS / "iris"),
                                 "--http_port", str(http_port), "--grpc_port", str(grpc_port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{http_port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"stock KServe exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/v2/models/iris/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout=120, what="stock KServe readiness")
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        stop_process(proc)


def test_rest_answer_from_stock_kserve(stock_server):
    url, _ = stock_server
    body = {"id": "stock-1", "inputs": [tensor("input-0", [SETOSA, VIRGINICA], "FP32")]}
    response = httpx.post(f"{url}/v2/models/iris/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "stock-1"
    assert output(answer, "label").tolist() == [0, 2]
    assert output(answer, "label_name").tolist() == ["setosa", "virginica"]
    assert np.allclose(output(answer, "probabilities").sum(axis=1), 1.0, atol=1e-5)


def test_grpc_answer_from_stock_kserve(stock_server):
    _, target = stock_server
    with grpc.insecure_channel(target) as channel:
        stub = raw_stub(channel)
        m = stub.messages
        request = m["ModelInferRequest"](model_name="iris", inputs=[m["ModelInferRequest"].InferInputTensor(
            name="input-0", datatype="FP32", shape=[1, 4], contents=m["InferTensorContents"](fp32_contents=SETOSA))])
        response = stub.ModelInfer(request)
    labels = next(o for o in response.outputs if o.name == "label")
    values = (np.frombuffer(response.raw_output_contents[list(response.outputs).index(labels)], dtype=np.int64)
              if response.raw_output_contents else list(labels.contents.int64_contents))
    assert list(values) == [0]
