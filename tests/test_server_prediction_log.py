"""The write-behind prediction log in a real server process: what SIGTERM and SIGKILL leave in the database."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
from sqlalchemy import select

from predictors.feedback import FeedbackStore
from predictors.feedback.store import prediction_log
from tests.fixtures.server import start_model_server
from tests.support.v2 import output, tensor

SETOSA = [5.1, 3.5, 1.4, 0.2]


def predict_many(client: httpx.Client, n: int, prefix: str) -> list[str]:
    """``n`` single-row predictions, one after another; their prediction ids in answer order."""
    ids = []
    for i in range(n):
        r = client.post("/v2/models/iris/infer", json={"id": f"{prefix}-{i}", "inputs": [tensor("input-0", [SETOSA],
                                                                                                  "FP32")]})
        assert r.status_code == 200, r.text
        ids.append(str(output(r.json(), "prediction_id")[0]))
    return ids


def logged(tmp_path: Path, ids: list[str]) -> list[bool]:
    """For each id, whether the server's SQLite prediction log holds it (feedback by id would find it)."""
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    try:
        with store.engine.connect() as conn:
            found = set(conn.scalars(select(prediction_log.c.prediction_id).where(prediction_log.c.model == "iris")))
    finally:
        store.close()
    return [i in found for i in ids]


def test_sigterm_writes_every_queued_prediction(tmp_path, iris_dir):
    # A flush interval longer than the test: every row is still queued when SIGTERM arrives.
    env = {"KCP_PREDICTION_LOG_FLUSH_MS": "600000"}
    with start_model_server(iris_dir, tmp_path, env=env) as server:
        with server.client() as c:
            ids = predict_many(c, 100, "term")
        assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log()[-2000:]
    assert all(logged(tmp_path, ids))


def test_feedback_flushes_pending_predictions_first(tmp_path, iris_dir):
    """With a flush interval longer than the test, only the flush-before-lookup lets feedback find its ids."""
    env = {"KCP_PREDICTION_LOG_FLUSH_MS": "600000"}
    with start_model_server(iris_dir, tmp_path, env=env) as server, server.client() as c:
        ids = predict_many(c, 3, "fresh")
        r = c.post("/v2/models/iris/feedback", json={"items": [{"id": i, "true_label": 0} for i in ids]})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 3
        again = c.post("/v2/models/iris/feedback", json={"items": [{"id": ids[0], "true_label": 0}]})
        assert again.status_code == 409  # exactly once, as before the log became write-behind


def test_reused_request_ids_are_separate_predictions_for_feedback(tmp_path, iris_dir):
    with start_model_server(iris_dir, tmp_path) as server, server.client() as c:
        first, second = predict_many(c, 1, "same") + predict_many(c, 1, "same")
        assert first != second
        for prediction_id in (first, second):  # neither overwrote nor blocked the other
            r = c.post("/v2/models/iris/feedback", json={"items": [{"id": prediction_id, "true_label": 0}]})
            assert r.status_code == 200, r.text
        long_id = "x" * 1000  # the request id is cut, so its prediction can still be named in feedback
        (prediction_id,) = predict_many(c, 1, long_id)
        assert prediction_id.startswith("x" * 200 + ":") and len(prediction_id) <= 256
        r = c.post("/v2/models/iris/feedback", json={"items": [{"id": prediction_id, "true_label": 0}]})
        assert r.status_code == 200, r.text


def test_sigkill_loses_only_the_last_unflushed_predictions(tmp_path, iris_dir):
    """SIGKILL right after the last answer: what is lost is a tail of the answers (the last flush
    interval's), never an older prediction. Prints how many were lost."""
    with start_model_server(iris_dir, tmp_path) as server:
        with server.client() as c:
            ids = predict_many(c, 300, "kill")
        server.stop(signal.SIGKILL)
    present = logged(tmp_path, ids)
    kept = present.index(False) if False in present else len(present)
    assert all(present[:kept]) and not any(present[kept:]), "a hole: an older prediction was lost"
    assert kept > 0
    print(f"SIGKILL after {len(ids)} answers lost the last {len(ids) - kept}")


def test_a_request_id_postgresql_refuses_wedges_nothing(tmp_path, iris_dir, postgres_url):
    """A NUL in a request id: PostgreSQL refuses that log row (if the server lets the id through at all).

    Feedback by id for every other prediction keeps working at once, and SIGTERM still writes every other
    queued row, although the bad row sits among them.
    """
    env = {"KCP_FEEDBACK_DB_URL": postgres_url, "KCP_PREDICTION_LOG_FLUSH_MS": "600000"}
    with start_model_server(iris_dir, tmp_path, env=env) as server:
        with server.client() as c:
            before = predict_many(c, 5, "before")
            bad = c.post("/v2/models/iris/infer", json={"id": "nul\x00id", "inputs": [tensor("input-0", [SETOSA],
                                                                                                 "FP32")]})
            assert bad.status_code in (200, 400), bad.text  # logged and refused by the database, or refused here
            after = predict_many(c, 5, "after")
            r = c.post("/v2/models/iris/feedback", json={"items": [{"id": i, "true_label": 0}
                                                                   for i in (before[0], after[0])]}, timeout=4.0)
            assert r.status_code == 200, r.text
            queued = predict_many(c, 20, "queued")
            if bad.status_code == 200:  # once more, queued among rows that SIGTERM must write
                assert c.post("/v2/models/iris/infer", json={"id": "nul\x00again", "inputs": [
                    tensor("input-0", [SETOSA], "FP32")]}).status_code == 200
            queued += predict_many(c, 20, "queued-after")
        assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log()[-2000:]
    if bad.status_code == 200:
        assert "set aside" in server.log(), server.log()[-3000:]
    store = FeedbackStore(postgres_url)
    try:
        with store.engine.connect() as conn:
            found = set(conn.scalars(select(prediction_log.c.prediction_id).where(prediction_log.c.model == "iris")))
    finally:
        store.close()
    assert set(before + after + queued) <= found
    assert not any("\x00" in i for i in found)
