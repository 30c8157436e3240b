"""REST and gRPC refuse the same bad requests with matching codes: one table, both protocols.

400 ↔ INVALID_ARGUMENT, 404 ↔ NOT_FOUND, 413 ↔ RESOURCE_EXHAUSTED. Each row is one bad request,
sent once over REST and once over gRPC to the same real server; after the table the server
still answers a good request (a refused request changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from tests.support.v2 import output, raw_stub

SETOSA = [5.1, 3.5, 1.4, 0.2]
TOO_MANY = 257  # models/iris accepts at most 256 rows per request


@dataclass
class Case:
    """A bad request: the input rows, and what else differs from a good request."""

    rows: list[list[float]] = field(default_factory=lambda: [SETOSA])
    model: str = "iris"
    version: str | None = None
    input_name: str = "input-0"
    outputs: list[str] = field(default_factory=list)
    route: str = "infer"  # or "metadata", "ready"


CASES = {
    "wrong feature count": (Case(rows=[SETOSA[:3]]), 400, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown input name": (Case(input_name="nope"), 400, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown output": (Case(outputs=["nope"]), 400, grpc.StatusCode.INVALID_ARGUMENT),
    "unknown model": (Case(model="no-such-model"), 404, grpc.StatusCode.NOT_FOUND),
    "version not served": (Case(version="does-not-exist"), 404, grpc.StatusCode.NOT_FOUND),
    "metadata of a version not served": (Case(version="does-not-exist", route="metadata"), 404,
                                         grpc.StatusCode.NOT_FOUND),
    "readiness of a version not served": (Case(version="does-not-exist", route="ready"), 404,
                                          grpc.StatusCode.NOT_FOUND),
    "batch over the model's limit": (Case(rows=[SETOSA] * TOO_MANY), 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
}


def rest_call(client: httpx.Client, case: Case) -> httpx.Response:
    base = f"/v2/models/{case.model}" + (f"/versions/{case.version}" if case.version else "")
    if case.route == "metadata":
        return client.get(base)
    if case.route == "ready":
        return client.get(f"{base}/ready")
    body: dict[str, Any] = {"inputs": [{"name": case.input_name, "datatype": "FP32",
                                        "shape": [len(case.rows), len(case.rows[0])],
                                        "data": [v for row in case.rows for v in row]}]}
    if case.outputs:
        body["outputs"] = [{"name": name} for name in case.outputs]
    return client.post(f"{base}/infer", json=body)


def grpc_call(stub: Any, case: Case) -> Any:
    m = stub.messages
    version = case.version or ""
    if case.route == "metadata":
        return stub.ModelMetadata(m["ModelMetadataRequest"](name=case.model, version=version))
    if case.route == "ready":
        return stub.ModelReady(m["ModelReadyRequest"](name=case.model, version=version))
    request = m["ModelInferRequest"](
        model_name=case.model, model_version=version,
        inputs=[m["ModelInferRequest"].InferInputTensor(
            name=case.input_name, datatype="FP32", shape=[len(case.rows), len(case.rows[0])],
            contents=m["InferTensorContents"](fp32_contents=[v for row in case.rows for v in row]))],
        outputs=[m["ModelInferRequest"].InferRequestedOutputTensor(name=name) for name in case.outputs])
    return stub.ModelInfer(request)


@pytest.fixture(scope="module")
def protocols(model_server):
    with model_server.client() as client, grpc.insecure_channel(model_server.grpc_target) as channel:
        yield client, raw_stub(channel)


@pytest.mark.parametrize("name", list(CASES))
def test_the_same_bad_request_gets_matching_codes_over_rest_and_grpc(protocols, name):
    client, stub = protocols
    case, status, code = CASES[name]
    response = rest_call(client, case)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and response.json()["error"]
    with pytest.raises(grpc.RpcError) as refused:
        grpc_call(stub, case)
    assert refused.value.code() == code, refused.value.details()
    assert refused.value.details()


def test_served_version_answers_like_the_unversioned_routes_over_grpc(protocols):
    client, stub = protocols
    version = client.get("/v2/models/iris").json()["versions"][0]
    m = stub.messages
    assert stub.ModelReady(m["ModelReadyRequest"](name="iris", version=version)).ready
    assert list(stub.ModelMetadata(m["ModelMetadataRequest"](name="iris", version=version)).versions) == [version]
    response = grpc_call(stub, Case(version=version))
    assert [o.name for o in response.outputs][:1] == ["label"]
    assert output(rest_call(client, Case(version=version)).json(), "label").tolist() == [0]
