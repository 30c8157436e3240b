"""The scikit-learn runtime image (docker/Dockerfile.sklearn), run as the chart's sklearn serving runtime runs it:
it holds no TensorFlow or Keras, serves a scikit-learn package and a Katonic one over V2 REST and gRPC, takes
feedback, and stops on SIGTERM within the InferenceService's grace period. The tests share one container and run in
file order: the SIGTERM test, last, stops it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from streaming.v2_grpc import open_inference_grpc_pb2 as pb2
from streaming.v2_grpc import open_inference_grpc_pb2_grpc as pb2_grpc
from tests.containers.conftest import API_KEY, Predictor, engine, image, model_container, start_predictor
from tests.fixtures.k8s import REPO, helm_template

pytestmark = pytest.mark.container

VIRGINICA = [6.7, 3.0, 5.2, 2.3]
SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
PACKAGES = ("iris", "iris-katonic")


@pytest.fixture(scope="module")
def sklearn_chart() -> list[dict]:
    """The chart's defaults: one model, iris, of format sklearn."""
    return helm_template()


@pytest.fixture(scope="module")
def sklearn_predictor(sklearn_chart: list[dict]) -> Iterator[Predictor]:
    """iris and iris-katonic under /mnt/models: one storageUri holding a directory of packages."""
    volumes = [a for name in PACKAGES for a in ("--volume", f"{REPO / 'models' / name}:/mnt/models/{name}:ro")]
    yield from start_predictor("sklearn", sklearn_chart, "iris", volumes)


def label_of(response: dict) -> list:
    return next(o["data"] for o in response["outputs"] if o["name"] == "label")


def test_the_chart_runs_this_image_for_sklearn_models(sklearn_chart: list[dict]) -> None:
    _, _, runtime = model_container(sklearn_chart, "iris")
    assert [f["name"] for f in runtime["spec"]["supportedModelFormats"]] == ["sklearn"]
    chart_repository = runtime["spec"]["containers"][0]["image"].rsplit(":", 1)[0].rsplit("/", 1)[-1]
    assert image("sklearn").rsplit(":", 1)[0].rsplit("/", 1)[-1] == chart_repository == "kserve-classifiers-sklearn"


def test_no_tensorflow_or_keras_in_the_image() -> None:
    probe = ("import importlib.util, json; "
             "print(json.dumps([m for m in ('tensorflow', 'keras', 'tf_keras') if importlib.util.find_spec(m)]))")
    out = engine("run", "--rm", "--network=none", "--entrypoint", "python", image("sklearn"), "-c", probe)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_serves_sklearn_and_katonic_packages_over_rest(sklearn_predictor: Predictor) -> None:
    with sklearn_predictor.client() as client:
        assert set(client.get("/v2/models").json()["models"]) == set(PACKAGES)
        r = client.post("/v2/models/iris/infer", json={"id": "ct-sk", "inputs": [
            {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": VIRGINICA}]})
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "ct-sk" and label_of(r.json()) == [2]
        (pid,) = next(o["data"] for o in r.json()["outputs"] if o["name"] == "prediction_id")
        k = client.post("/v2/models/iris-katonic/infer", json={"inputs": [
            {"name": "data", "datatype": "BYTES", "shape": [1], "data": [json.dumps(SETOSA)]}]})
        assert k.status_code == 200, k.text
        assert label_of(k.json()) == [0]
        feedback = client.post("/v2/models/iris/feedback", json={"items": [{"id": pid, "true_label": 2}]})
        assert feedback.status_code == 200, feedback.text
        assert client.post("/v2/models/iris/infer", json={"inputs": []},
                           headers={"X-API-Key": "wrong"}).status_code == 401


def test_grpc_inference(sklearn_predictor: Predictor) -> None:
    request = pb2.ModelInferRequest(model_name="iris", id="ct-sk-grpc", inputs=[pb2.ModelInferRequest.InferInputTensor(
        name="input-0", datatype="FP32", shape=[1, 4], contents=pb2.InferTensorContents(fp32_contents=VIRGINICA))])
    with grpc.insecure_channel(sklearn_predictor.grpc_target) as channel:
        response = pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=[("x-api-key", API_KEY)], timeout=60)
    index = [o.name for o in response.outputs].index("label")
    label = response.outputs[index]
    predicted = (np.frombuffer(response.raw_output_contents[index], dtype=np.int64) if response.raw_output_contents
                 else np.asarray(label.contents.int64_contents))
    assert predicted.tolist() == [2]


def test_sigterm_stops_the_server_within_the_grace_period(sklearn_predictor: Predictor) -> None:
    assert sklearn_predictor.container.terminate() == 0, sklearn_predictor.container.logs()[-3000:]
