"""V2 REST against the real server: metadata, inference, ids, outputs, binary data, and every bad input."""

from __future__ import annotations

import json
import uuid

import httpx
import numpy as np
import pytest

from tests.support.metrics import sample_value
from tests.support.v2 import assert_conforms, output, tensor

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]


def infer(client: httpx.Client, body: dict | bytes, model: str = "iris", **kwargs) -> httpx.Response:
    if isinstance(body, dict):
        return client.post(f"/v2/models/{model}/infer", json=body, **kwargs)
    return client.post(f"/v2/models/{model}/infer", content=body, **kwargs)


@pytest.fixture(scope="module")
def client(model_server) -> httpx.Client:
    with model_server.client() as c:
        yield c


def test_server_metadata_lists_supported_extensions(client):
    body = client.get("/v2").json()
    assert_conforms(body, "metadata_server_response")
    assert {"model_repository_extension", "binary_tensor_data", "feedback"} <= set(body["extensions"])


def test_health_and_model_list(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/iris/ready").json()["ready"] is True
    assert {"iris", "mnist", "fashion-mnist"} <= set(client.get("/v2/models").json()["models"])


def test_model_metadata_has_real_tensors(client):
    body = client.get("/v2/models/iris").json()
    assert_conforms(body, "metadata_model_response")
    assert body["platform"] == "sklearn" and body["versions"]
    assert body["inputs"][0] == {"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [-1, 3]
    assert outputs["label"]["datatype"] == "INT64"
    image = client.get("/v2/models/mnist").json()
    assert image["inputs"][0]["shape"] == [-1, 28, 28] and image["platform"] == "keras"


def test_infer_returns_label_name_probabilities_and_a_generated_string_id(client):
    response = infer(client, {"inputs": [tensor("input-0", [SETOSA, VIRGINICA], "FP32")]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert_conforms(body, "inference_response")
    assert isinstance(body["id"], str) and uuid.UUID(body["id"]).version == 7  # time-ordered (protocol.ids)
    assert output(body, "label").tolist() == [0, 2]
    assert output(body, "label_name").tolist() == ["setosa", "virginica"]
    probs = output(body, "probabilities")
    assert probs.shape == (2, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert output(body, "top_k_labels")[:, 0].tolist() == [0, 2]
    first, second = output(body, "prediction_id").tolist()
    assert first.startswith(f"{body['id']}:") and first.endswith("/0") and second == first[:-1] + "1"
    assert body["model_version"]


def test_client_id_is_echoed_and_fp64_nested_data_accepted(client):
    body = {"id": "req-42", "inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [SETOSA]}]}
    response = infer(client, body).json()
    assert response["id"] == "req-42"
    [prediction_id] = output(response, "prediction_id").tolist()
    assert prediction_id.startswith("req-42:")


def test_reused_request_ids_get_distinct_prediction_ids(client):
    """Two clients (or retries) sending the same request id must not name the same prediction."""
    body = {"id": "reused", "inputs": [tensor("input-0", [SETOSA], "FP32")]}
    ids = {output(infer(client, body).json(), "prediction_id")[0] for _ in range(5)}
    assert len(ids) == 5 and all(i.startswith("reused:") for i in ids)


def test_ids_travel_with_their_rows(client):
    rows = [VIRGINICA, SETOSA, VIRGINICA]
    body = {"inputs": [tensor("input-0", rows, "FP32"),
                       {"name": "ids", "datatype": "BYTES", "shape": [3], "data": ["c", "a", "b"]}]}
    response = infer(client, body).json()
    assert output(response, "ids").tolist() == ["c", "a", "b"]
    assert output(response, "label").tolist() == [2, 0, 2]


def test_outputs_field_is_honoured(client):
    body = {"inputs": [tensor("input-0", [SETOSA], "FP32")], "outputs": [{"name": "label_name"}]}
    response = infer(client, body).json()
    assert [o["name"] for o in response["outputs"]] == ["label_name"]


def test_binary_tensor_extension_in_and_out(client):
    features = np.asarray([SETOSA, VIRGINICA], dtype=np.float32)
    header = json.dumps({"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": features.nbytes}}],
                         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                                     {"name": "label"}]}).encode()
    response = infer(client, header + features.tobytes(),
                     headers={"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    json_length = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:json_length])
    probs_meta = next(o for o in head["outputs"] if o["name"] == "probabilities")
    probs = np.frombuffer(response.content[json_length:], dtype=np.float32).reshape(probs_meta["shape"])
    assert probs.argmax(axis=1).tolist() == [0, 2]
    assert next(o for o in head["outputs"] if o["name"] == "label")["data"] == [0, 2]


def test_version_route(client):
    version = client.get("/v2/models/iris").json()["versions"][0]
    ok = client.post(f"/v2/models/iris/versions/{version}/infer",
                     json={"inputs": [tensor("input-0", [SETOSA], "FP32")]})
    assert ok.status_code == 200
    wrong = client.post("/v2/models/iris/versions/does-not-exist/infer",
                        json={"inputs": [tensor("input-0", [SETOSA], "FP32")]})
    assert wrong.status_code == 404 and "error" in wrong.json()


def test_versioned_metadata_and_readiness_routes(client):
    """Like the unversioned routes for the served version; 404 (not KServe's 501) for any other."""
    version = client.get("/v2/models/iris").json()["versions"][0]
    assert client.get(f"/v2/models/iris/versions/{version}").json() == client.get("/v2/models/iris").json()
    ready = client.get(f"/v2/models/iris/versions/{version}/ready")
    assert ready.status_code == 200 and ready.json() == client.get("/v2/models/iris/ready").json()
    for path in ("/v2/models/iris/versions/does-not-exist", "/v2/models/iris/versions/does-not-exist/ready",
                 f"/v2/models/no-such-model/versions/{version}/ready"):
        missing = client.get(path)
        assert missing.status_code == 404 and "error" in missing.json(), path


GOOD = {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": SETOSA}
BAD_REQUESTS = {
    "malformed-json": (b'{"inputs": [', 400, "not valid JSON"),
    "not-an-object": (b"[1, 2, 3]", 400, "invalid inference request"),
    "missing-inputs": ({"id": "x"}, 400, "inputs"),
    "empty-inputs": ({"inputs": []}, 400, "inputs"),
    "unknown-field": ({"inputs": [GOOD], "extra": 1}, 400, "extra"),
    "wrong-input-name": ({"inputs": [{**GOOD, "name": "features"}]}, 400, "unknown input"),
    "duplicate-input": ({"inputs": [GOOD, GOOD]}, 400, "appears twice"),
    "wrong-shape": ({"inputs": [{**GOOD, "shape": [1, 3], "data": SETOSA[:3]}]}, 400, "shape [N, 4]"),
    "data-shape-mismatch": ({"inputs": [{**GOOD, "shape": [2, 4]}]}, 400, "do not match shape"),
    "unknown-datatype": ({"inputs": [{**GOOD, "datatype": "FP99"}]}, 400, "unknown datatype"),
    "bytes-for-tabular": ({"inputs": [{**GOOD, "datatype": "BYTES", "data": ["a", "b", "c", "d"]}]}, 400, "numeric"),
    "strings-in-fp32": ({"inputs": [{**GOOD, "data": ["5.1", "3.5", "1.4", "0.2"]}]}, 400, "must be numbers"),
    "booleans-in-fp32": ({"inputs": [{**GOOD, "data": [True, False, True, False]}]}, 400, "not booleans"),
    "negative-dimension": ({"inputs": [{**GOOD, "shape": [-1, 4]}]}, 400, "negative"),
    "empty-batch": ({"inputs": [{**GOOD, "shape": [0, 4], "data": []}]}, 400, "empty batch"),
    "oversized-batch": ({"inputs": [{**GOOD, "shape": [257, 4], "data": SETOSA * 257}]}, 413, "exceeds"),
    "unknown-output": ({"inputs": [GOOD], "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    "model-name-mismatch": ({"model_name": "mnist", "inputs": [GOOD]}, 400, "URL names"),
    "missing-data": ({"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}, 400, "no 'data'"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_a_clear_4xx(client, case):
    body, status, message = BAD_REQUESTS[case]
    response = infer(client, body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_nan_and_infinity_are_rejected(client):
    for value in (np.nan, np.inf):
        features = np.asarray([[5.1, value, 1.4, 0.2]], dtype=np.float32)
        header = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                                         "parameters": {"binary_data_size": features.nbytes}}]}).encode()
        response = infer(client, header + features.tobytes(),
                         headers={"Inference-Header-Content-Length": str(len(header))})
        assert response.status_code == 400
        assert "NaN or infinity" in response.json()["error"]
    literal = infer(client, b'{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP32","data":[NaN,1,1,1]}]}')
    assert literal.status_code == 400


@pytest.mark.parametrize("header, tail, message", [
    ("abc", b"", "not a length"),
    ("100000", b"", "not a length"),
    (None, b"\x00" * 8, "exceeds the binary data"),
    (None, b"\x00" * 32, "not claimed"),
])
def test_bad_binary_requests(client, header, tail, message):
    head = json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    response = infer(client, head + tail, headers={"Inference-Header-Content-Length": header or str(len(head))})
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_unknown_model_is_404(client):
    response = infer(client, {"inputs": [GOOD]}, model="no-such-model")
    assert response.status_code == 404 and "does not exist" in response.json()["error"]
    assert client.get("/v2/models/no-such-model").status_code == 404


def test_oversized_body_is_413(client):
    response = infer(client, b"{" + b" " * (33 * 1024 * 1024) + b"}")
    assert response.status_code == 413
    assert "limit" in response.json()["error"]


def test_unknown_route_and_method_give_json_errors(client):
    assert "error" in client.get("/v2/nothing-here").json()
    assert client.get("/v2/models/iris/infer").status_code == 405


def test_server_still_serves_after_bad_input(client):
    for body, _, _ in BAD_REQUESTS.values():
        infer(client, body)
    response = infer(client, {"inputs": [GOOD]})
    assert response.status_code == 200
    assert output(response.json(), "label").tolist() == [0]


def test_metrics_count_requests_by_model_and_status(client):
    infer(client, {"inputs": [GOOD]})
    infer(client, {"inputs": []})
    text = client.get("/metrics").text
    for status in ("200", "400"):
        assert sample_value(text, "classifier_requests_total", model="iris", version="1", protocol="rest",
                            status=status), status
    assert "classifier_request_duration_seconds_bucket" in text
