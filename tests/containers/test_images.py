"""The built images, run as the chart runs them: the predictor answers V2 over REST and gRPC, takes feedback by
prediction id, exposes /metrics and readiness, and stops on SIGTERM within its grace period; the bridge image
carries requests from the tansu broker on loopback to the predictor container and writes the results back.

The tests share one predictor container (it loads TensorFlow and every package in models/, which takes a while)
and run in file order: the SIGTERM test, last, stops it.
"""

from __future__ import annotations

import uuid

import grpc
import httpx
import numpy as np
import pytest

from streaming.messenger import Messenger
from streaming.v2_grpc import open_inference_grpc_pb2 as pb2
from streaming.v2_grpc import open_inference_grpc_pb2_grpc as pb2_grpc
from tests.containers.conftest import API_KEY, Predictor, bridge_container
from tests.fixtures.broker import KafkaBroker, collect
from tests.fixtures.ports import wait_for
from tests.support.metrics import sample_value
from tests.support.v2 import png_bytes

pytestmark = pytest.mark.container

VIRGINICA = [6.7, 3.0, 5.2, 2.3]


def iris_request(rid: str, rows: list[list[float]]) -> dict:
    return {"id": rid, "inputs": [{"name": "input-0", "shape": [len(rows), 4], "datatype": "FP32",
                                   "data": [x for row in rows for x in row]}]}


def label_of(response: dict) -> list[int]:
    return next(o["data"] for o in response["outputs"] if o["name"] == "label")


def test_health_and_rest_inference(predictor: Predictor) -> None:
    with predictor.client() as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert {"iris", "mnist", "fashion-mnist"} <= set(client.get("/v2/models").json()["models"])
        r = client.post("/v2/models/iris/infer", json=iris_request("ct-rest", [VIRGINICA]))
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "ct-rest" and label_of(r.json()) == [2]
        bad = client.post("/v2/models/iris/infer", json=iris_request("ct-bad", [VIRGINICA[:3]]))
        assert bad.status_code == 400, bad.text
        assert client.post("/v2/models/iris/infer", json=iris_request("x", [VIRGINICA]),
                           headers={"X-API-Key": "wrong"}).status_code == 401


def test_grpc_inference_through_tensorflow(predictor: Predictor, mnist_digits) -> None:
    """The Keras model (TensorFlow in the image) over gRPC, with PNG bytes as a client would send them."""
    images, labels = mnist_digits
    request = pb2.ModelInferRequest(model_name="mnist", id="ct-grpc", inputs=[pb2.ModelInferRequest.InferInputTensor(
        name="input-0", datatype="BYTES", shape=[8], contents=pb2.InferTensorContents(
            bytes_contents=[png_bytes(img) for img in images[:8]]))])
    with grpc.insecure_channel(predictor.grpc_target) as channel:
        stub = pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, metadata=[("x-api-key", API_KEY)], timeout=60)
        with pytest.raises(grpc.RpcError) as denied:
            stub.ModelInfer(request, timeout=60)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert response.id == "ct-grpc"
    (label,) = [o for o in response.outputs if o.name == "label"]
    index = [o.name for o in response.outputs].index("label")
    predicted = (np.frombuffer(response.raw_output_contents[index], dtype=np.int64) if response.raw_output_contents
                 else np.asarray(label.contents.int64_contents))
    assert (predicted == labels[:8]).mean() >= 0.75


def test_feedback_by_prediction_id_and_metrics(predictor: Predictor) -> None:
    """The feedback store lives on the container's writable emptyDir (/var/lib/kcp): ids join there."""
    rid = f"ct-{uuid.uuid4().hex[:8]}"
    with predictor.client() as client:
        answer = client.post("/v2/models/iris/infer", json=iris_request(rid, [VIRGINICA]))
        assert answer.status_code == 200, answer.text
        (pid,) = next(o["data"] for o in answer.json()["outputs"] if o["name"] == "prediction_id")
        assert pid.startswith(f"{rid}:")  # the request id plus the server's unique part
        r = client.post("/v2/models/iris/feedback", json={"items": [{"id": pid, "true_label": 2}]})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1 and r.json()["batch"]["accuracy"] == 1.0
        again = client.post("/v2/models/iris/feedback", json={"items": [{"id": pid, "true_label": 1}]})
        assert again.status_code == 409, again.text
        unknown = client.post("/v2/models/iris/feedback", json={"items": [{"id": "never-predicted", "true_label": 1}]})
        assert 400 <= unknown.status_code < 500, unknown.text
        metrics = client.get("/metrics").text
    assert sample_value(metrics, "classifier_requests_total", model="iris", version="1", protocol="rest",
                        status="200")
    assert "classifier_feedback" in metrics


def test_bridge_image_carries_requests_to_the_predictor(predictor: Predictor, chart: list[dict],
                                                        kafka_broker: KafkaBroker, kafka_topics) -> None:
    topics = kafka_topics(requests=2, results=1, dlq=1)
    container, health_port = bridge_container(
        chart, bootstrap=kafka_broker.bootstrap_servers, topics=topics, grpc_target=predictor.grpc_target,
        env=kafka_broker.env())
    try:
        wait_for(lambda: container.running() and httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=2)
                 .json()["assigned"], timeout=120, interval=0.5, what="the bridge container consuming")
        ids = [f"ct-bridge-{uuid.uuid4().hex[:6]}-{i}" for i in range(6)]
        with Messenger(topics["requests"], settings=kafka_broker.messenger_settings()) as sender:
            for rid in ids:
                sender.send({**iris_request(rid, [VIRGINICA]), "model_name": "iris"}, key=rid)
            sender.send(b"not json", key="ct-bridge-garbage")
        results = collect(kafka_broker, topics["results"], until=lambda got: set(ids) <= {m.key_str for m in got})
        by_id = {m.key_str: m.json() for m in results}
        assert set(ids) <= set(by_id), f"missing results: {sorted(set(ids) - set(by_id))}\n{container.logs()[-3000:]}"
        assert all(label_of(by_id[rid]) == [2] for rid in ids)
        dead = collect(kafka_broker, topics["dlq"], until=lambda got: "ct-bridge-garbage" in {m.key_str for m in got})
        assert "ct-bridge-garbage" in {m.key_str for m in dead}
        assert container.terminate() == 0, container.logs()[-3000:]  # drains and commits within the grace period
    finally:
        container.remove()


def test_sigterm_stops_the_predictor_within_the_grace_period(predictor: Predictor) -> None:
    assert predictor.container.terminate() == 0, predictor.container.logs()[-3000:]
