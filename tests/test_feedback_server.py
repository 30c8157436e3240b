"""End to end through the real model server: ids from real /infer responses, and a real restart.

The server runs as a subprocess (``python -m predictors serve``) on free loopback ports, with its
feedback database a SQLite file in the test's temporary directory. It serves a small Iris package
built here from scikit-learn's bundled data set (no download), so the test does not depend on the
committed trained packages.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import train_test_split

from predictors.package import LabelsFile, PackageConfig, TensorSpec, save_package
from tests.fixtures.ports import wait_for
from tests.fixtures.postgres import PostgresServer
from tests.fixtures.server import ServerHandle, start_model_server

API_KEY = "feedback-e2e-key"
NAMES = ["setosa", "versicolor", "virginica"]


@pytest.fixture(scope="module")
def iris_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A model directory with one sklearn Iris package, and held-out rows with their true labels."""
    x, y = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=30, random_state=0, stratify=y)
    # Strong regularisation: a weaker model, so the confusion matrix has off-diagonal cells.
    estimator = LogisticRegression(C=0.05, max_iter=500).fit(x_train, y_train)
    model_dir = tmp_path_factory.mktemp("feedback-models")
    package = model_dir / "iris"
    package.mkdir()
    joblib.dump(estimator, package / "model.joblib")
    save_package(package,
                 PackageConfig(format_version=1, name="iris", version="1", framework="sklearn",
                               task="tabular_classification", artifact="model.joblib",
                               inputs=[TensorSpec(name="input-0", datatype="FP64", shape=[-1, 4])]),
                 LabelsFile(labels=[0, 1, 2], names=NAMES))
    return {"model_dir": model_dir, "x": x_test, "y": y_test.astype(int).tolist()}


@pytest.fixture
def db_env(tmp_path: Path) -> dict[str, str]:
    return {"KCP_FEEDBACK_DB_URL": f"sqlite:///{tmp_path / 'shared-feedback.db'}"}


def infer(handle: ServerHandle, rows: np.ndarray, request_id: str) -> tuple[list[str], list[int]]:
    """One real V2 inference; returns (prediction ids, predicted labels) from the response."""
    tensor = {"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}
    body = {"id": request_id, "inputs": [tensor]}
    with handle.client() as c:
        r = c.post("/v2/models/iris/infer", json=body)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o["data"] for o in r.json()["outputs"]}
    return [str(i) for i in outputs["prediction_id"]], [int(v) for v in outputs["label"]]


def test_feedback_through_the_real_server_survives_a_restart(iris_data: dict[str, Any], tmp_path: Path,
                                                             db_env: dict[str, str]) -> None:
    """One test, two server processes on one database (each server start costs seconds)."""
    x, y = iris_data["x"], iris_data["y"]
    katonic = {"predicted_label": [0, 1, 2, 2], "true_label": [0, 1, 1, 2]}
    with start_model_server(iris_data["model_dir"], tmp_path, api_key=API_KEY, env=db_env) as first:
        batch_ids, batch_pred = infer(first, x[:20], "batch-1")  # ids "batch-1:<server part>/0".."/19"
        single_ids, single_pred = infer(first, x[20:21], "single-1")  # id "single-1:<server part>"
        batch_base = batch_ids[0].removesuffix("/0")
        assert batch_base.startswith("batch-1:") and batch_ids == [f"{batch_base}/{i}" for i in range(20)]
        assert single_ids[0].startswith("single-1:")

        with first.client() as c:
            items = [{"id": pid, "true_label": t} for pid, t in zip(batch_ids[:15], y[:15], strict=True)]
            r = c.post("/v2/models/iris/feedback", json={"items": items})
            assert r.status_code == 200, r.text
            # The server paired each truth with what it really predicted for that id.
            assert r.json()["batch"]["confusion_matrix"]["matrix"] == confusion_matrix(
                y[:15], batch_pred[:15], labels=[0, 1, 2]).tolist()

            # The Katonic form, with the names from the package's labels_file.json.
            r = c.post("/v2/models/iris/feedback", json=katonic)
            assert r.status_code == 200, r.text
            assert r.json()["batch"]["confusion_matrix"]["matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
            assert r.json()["cumulative"]["per_class"][1]["name"] == "versicolor"
            before = r.json()["cumulative"]
            assert before["count"] == 19

            # Rejections through the server's own middleware and error handling: 4xx, {"error"}, nothing kept.
            for bad in ({"predicted_label": [0], "true_label": [5]}, {"predicted_label": [0, 1], "true_label": [0]},
                        {"items": [{"id": "never-predicted", "true_label": 0}]}):
                rejected = c.post("/v2/models/iris/feedback", json=bad)
                assert rejected.status_code == 400, rejected.text
                assert set(rejected.json()) == {"error"}
            missing = c.post("/v2/models/no-such-model/feedback", json=katonic)
            assert missing.status_code == 404
            assert "error" in missing.json()
            unauthenticated = c.post("/v2/models/iris/feedback", json=katonic, headers={"X-API-Key": "wrong"})
            assert unauthenticated.status_code == 401
            assert "error" in unauthenticated.json()
            assert c.get("/v2/models/iris/feedback").json()["cumulative"] == before

    # A new process on the same database: feedback and the prediction log are still there.
    with start_model_server(iris_data["model_dir"], tmp_path, api_key=API_KEY, env=db_env) as second:
        with second.client() as c:
            report = c.get("/v2/models/iris/feedback").json()
            assert report["cumulative"] == before

            # Ids from the first process's responses are still joinable after the restart ...
            rest = [{"id": pid, "true_label": t} for pid, t in zip(batch_ids[15:], y[15:20], strict=True)]
            rest.append({"id": single_ids[0], "true_label": y[20]})
            r = c.post("/v2/models/iris/feedback", json={"items": rest})
            assert r.status_code == 200, r.text
            expected = confusion_matrix(y[:21] + katonic["true_label"], batch_pred + single_pred
                                        + katonic["predicted_label"], labels=[0, 1, 2])
            assert r.json()["cumulative"]["confusion_matrix"]["matrix"] == expected.tolist()
            assert r.json()["cumulative"]["count"] == 25
            assert r.json()["cumulative"]["accuracy"] == pytest.approx(np.trace(expected) / 25)

            # ... and each still counts once.
            again = c.post("/v2/models/iris/feedback", json={"items": [{"id": batch_ids[0], "true_label": 0}]})
            assert again.status_code == 409
            assert batch_ids[0] in again.json()["error"]

            metrics = c.get("/metrics").text
        assert 'classifier_feedback_total{model="iris"' in metrics
        assert 'classifier_feedback_accuracy{model="iris",version="1"}' in metrics


def test_predictions_are_served_while_the_feedback_database_is_down(iris_data: dict[str, Any], tmp_path: Path,
                                                                    stoppable_postgres: PostgresServer) -> None:
    """The server starts with PostgreSQL stopped, and PostgreSQL is stopped and started again under load:
    no prediction fails, feedback is refused with 503 + Retry-After while it is down and accepted after."""
    pg = stoppable_postgres
    env = {"KCP_FEEDBACK_DB_URL": pg.create_database("feedback"), "KCP_FEEDBACK_DB_RETRY_S": "1"}
    pg.stop()
    x = iris_data["x"]
    statuses: list[int] = []
    done = threading.Event()

    with start_model_server(iris_data["model_dir"], tmp_path, env=env) as server:
        def load() -> None:
            tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": x[0].tolist()}
            with server.client() as c:
                while not done.is_set():
                    statuses.append(c.post("/v2/models/iris/infer", json={"inputs": [tensor]}).status_code)

        def feedback_for_a_new_prediction(c: httpx.Client) -> httpx.Response:
            ids, _ = infer(server, x[:1], f"probe-{uuid.uuid4().hex}")
            return c.post("/v2/models/iris/feedback", json={"items": [{"id": ids[0], "true_label": 0}]})

        clients = [threading.Thread(target=load) for _ in range(2)]
        for t in clients:
            t.start()
        try:
            with server.client() as c:
                for _ in range(2):  # down at start-up, then down again after having worked
                    refused = c.post("/v2/models/iris/feedback", json={"predicted_label": [0], "true_label": [0]})
                    assert refused.status_code == 503, refused.text
                    assert "unreachable" in refused.json()["error"] and int(refused.headers["retry-after"]) >= 1
                    assert c.get("/v2/feedback/store").json()["available"] is False
                    assert "classifier_feedback_store_up 0.0" in c.get("/metrics").text
                    assert c.get("/v2/health/ready").status_code == 200  # readiness does not depend on it

                    pg.start()
                    wait_for(lambda: c.get("/v2/feedback/store").status_code == 200, timeout=60,
                             what="the server to reach PostgreSQL again")
                    accepted = feedback_for_a_new_prediction(c)
                    assert accepted.status_code == 200, accepted.text
                    assert "classifier_feedback_store_up 1.0" in c.get("/metrics").text
                    pg.stop()
                    wait_for(lambda: c.get("/v2/feedback/store").status_code == 503, timeout=60,
                             what="the server to notice PostgreSQL is gone")
        finally:
            done.set()
            for t in clients:
                t.join(timeout=60)
    assert len(statuses) > 0 and set(statuses) == {200}, f"{len(statuses)} predictions: {set(statuses)}"



def test_an_unknown_id_made_moments_ago_is_a_503_to_retry_and_an_old_one_a_400(model_server: ServerHandle) -> None:
    """With several replicas, feedback may reach a replica before the one that answered has written the
    prediction: an id whose server-made request id (a UUIDv7, which carries its time) is seconds old gets 503
    with Retry-After; an old one, or one whose request id says nothing of its age, is refused for good."""
    from predictors.protocol.ids import uuid7

    fresh = uuid.UUID(uuid7())
    old = uuid.UUID(int=(fresh.int & ~(((1 << 48) - 1) << 80)) | (((fresh.int >> 80) - 3_600_000) << 80))
    cases = [(f"{uuid7()}:abc", 503), (f"{old}:abc", 400), ("my-request:abc", 400)]
    with model_server.client() as client:
        for prediction_id, status in cases:
            r = client.post("/v2/models/iris/feedback", json={"items": [{"id": prediction_id, "true_label": 0}]})
            assert r.status_code == status, (prediction_id, r.text)
            if status == 503:
                assert int(r.headers["retry-after"]) >= 1
            assert "error" in r.json()
