"""Our package predictor under stock ``kserve.ModelServer`` (a correct V2 answer over REST and gRPC), and
parity: our direct V2 path answers as KServe's data plane does with the same model hooks (JSON, binary REST, gRPC)."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest

from tests.fixtures.ports import free_port, stop_process, wait_for
from tests.fixtures.server import REPO, TRAINED_MODELS
from tests.support.v2 import output, raw_stub, split_bytes_tensor, tensor

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


# -- parity: our direct V2 path answers exactly as KServe's data plane does with the same hooks -------------

ROWS = np.asarray([SETOSA, VIRGINICA, [5.9, 3.0, 4.2, 1.5]], dtype=np.float32)
COMPARED = ("label", "label_name", "probabilities", "top_k_labels", "top_k_probabilities")


def _binary_rest(url: str, request_outputs: list[dict] | None, parameters: dict | None = None) -> dict:
    """POST ROWS as binary tensor data and decode the answer's JSON and binary outputs."""
    raw = ROWS.astype("<f4").tobytes()
    document = {"id": "parity-bin", "inputs": [{"name": "input-0", "shape": list(ROWS.shape), "datatype": "FP32",
                                                "parameters": {"binary_data_size": len(raw)}}]}
    if request_outputs is not None:
        document["outputs"] = request_outputs
    if parameters:
        document["parameters"] = parameters
    head = json.dumps(document).encode()
    response = httpx.post(f"{url}/v2/models/iris/infer", content=head + raw, timeout=30,
                          headers={"Content-Type": "application/octet-stream",
                                   "Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    body = response.content
    answer = json.loads(body[: int(length)] if length else body)
    offset = int(length) if length else 0
    decoded = {}
    for out in answer["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            decoded[out["name"]] = np.asarray(out["data"]).reshape(out["shape"])
            continue
        chunk = body[offset: offset + size]
        offset += size
        if out["datatype"] == "BYTES":
            values = [v.decode() for v in split_bytes_tensor(chunk)]
            decoded[out["name"]] = np.asarray(values).reshape(out["shape"])
        else:
            dtype = {"FP32": "<f4", "INT64": "<i8"}[out["datatype"]]
            decoded[out["name"]] = np.frombuffer(chunk, dtype=dtype).reshape(out["shape"])
    assert offset == len(body)
    return {"id": answer["id"], "names": [o["name"] for o in answer["outputs"]], "values": decoded}


def _grpc(target: str, raw: bool) -> dict:
    with grpc.insecure_channel(target) as channel:
        stub = raw_stub(channel)
        m = stub.messages
        tensor_ = m["ModelInferRequest"].InferInputTensor(name="input-0", datatype="FP32", shape=list(ROWS.shape))
        if raw:
            request = m["ModelInferRequest"](model_name="iris", id="parity-grpc", inputs=[tensor_],
                                             raw_input_contents=[ROWS.astype("<f4").tobytes()])
        else:
            tensor_.contents.fp32_contents.extend(ROWS.ravel().tolist())
            request = m["ModelInferRequest"](model_name="iris", id="parity-grpc", inputs=[tensor_])
        response = stub.ModelInfer(request)
    values = {}
    for i, out in enumerate(response.outputs):
        if response.raw_output_contents:
            chunk = response.raw_output_contents[i]
            if out.datatype == "BYTES":
                items = [v.decode() for v in split_bytes_tensor(chunk)]
                values[out.name] = np.asarray(items).reshape(list(out.shape))
            else:
                dtype = {"FP32": "<f4", "INT64": "<i8"}[out.datatype]
                values[out.name] = np.frombuffer(chunk, dtype=dtype).reshape(list(out.shape))
        else:
            field = {"INT64": "int64_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}[out.datatype]
            items = list(getattr(out.contents, field))
            if out.datatype == "BYTES":
                items = [v.decode() for v in items]
            values[out.name] = np.asarray(items).reshape(list(out.shape))
    return {"id": response.id, "raw": bool(response.raw_output_contents), "names": [o.name for o in response.outputs],
            "values": values}


def _assert_same(ours: dict, stock: dict) -> None:
    assert ours["names"] == stock["names"]
    for name in COMPARED:
        if name not in stock["values"]:
            continue
        a, b = ours["values"][name], stock["values"][name]
        assert a.shape == b.shape, name
        if a.dtype.kind == "f":
            assert np.allclose(a, b, rtol=0, atol=1e-6), name  # float32 rounding only
        else:
            assert a.tolist() == b.tolist(), name


def test_rest_json_parity_with_kserve_data_plane(model_server, stock_server):
    url, _ = stock_server
    body = {"id": "parity-json", "inputs": [tensor("input-0", ROWS, "FP32")]}
    answers = []
    for base in (model_server.http_url, url):
        response = httpx.post(f"{base}/v2/models/iris/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"] == "parity-json" and answer["model_name"] == "iris"
        answers.append({"names": [o["name"] for o in answer["outputs"]],
                        "values": {o["name"]: output(answer, o["name"]) for o in answer["outputs"]}})
    _assert_same(*answers)


@pytest.mark.parametrize("request_outputs,parameters", [
    (None, {"binary_data_output": True}),
    ([{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label_name",
                                                                       "parameters": {"binary_data": True}},
      {"name": "label"}], None),
], ids=["all-binary", "chosen-outputs-binary"])
def test_binary_rest_parity_with_kserve_data_plane(model_server, stock_server, request_outputs, parameters):
    url, _ = stock_server
    ours = _binary_rest(model_server.http_url, request_outputs, parameters)
    stock = _binary_rest(url, request_outputs, parameters)
    assert ours["id"] == stock["id"] == "parity-bin"
    _assert_same(ours, stock)


@pytest.mark.parametrize("raw", [False, True], ids=["typed-contents", "raw-contents"])
def test_grpc_parity_with_kserve_data_plane(model_server, stock_server, raw):
    _, target = stock_server
    ours, stock = _grpc(model_server.grpc_target, raw), _grpc(target, raw)
    assert ours["id"] == stock["id"] == "parity-grpc"
    assert ours["raw"] == stock["raw"] == raw
    _assert_same(ours, stock)
