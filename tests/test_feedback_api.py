"""The feedback router over real HTTP: uvicorn on a free loopback port, a real SQLite file / PostgreSQL.

The router is served by a small FastAPI app here so these tests do not depend on the model
server; tests/test_feedback_server.py covers the router mounted in the real server.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Request
from prometheus_client import REGISTRY
from sklearn.metrics import classification_report, confusion_matrix

from predictors.feedback import FeedbackStore, build_feedback_router
from predictors.package import LabelsFile
from predictors.protocol.errors import Unauthorized, UnknownModel
from tests.fixtures.ports import free_port, wait_for

IRIS = LabelsFile(labels=[0, 1, 2], names=["setosa", "versicolor", "virginica"])
BINARY = LabelsFile(labels=[0, 1], names=["negative", "positive"])
DIGITS = LabelsFile(labels=list(range(10)))
API_KEY = "s3cret"


def get_labels(model_name: str) -> LabelsFile:
    """Models named iris-*, binary-*, digits-* exist (unique names keep Prometheus series apart)."""
    for prefix, labels in (("iris", IRIS), ("binary", BINARY), ("digits", DIGITS)):
        if model_name.startswith(prefix):
            return labels
    raise UnknownModel(model_name)


def require_key(request: Request) -> None:
    if request.headers.get("x-api-key") != API_KEY:
        raise Unauthorized("missing or wrong API key")


@contextlib.contextmanager
def serve_feedback(store: FeedbackStore, **kwargs: Any) -> Iterator[str]:
    """Serve the router with uvicorn in a thread on a free port; yield its base URL."""
    app = FastAPI()
    app.include_router(build_feedback_router(store, get_labels, **kwargs))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30, what="uvicorn startup")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeedbackStore]:
    url = (f"sqlite:///{tmp_path / 'feedback.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    store = FeedbackStore(url)
    yield store
    store.close()


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeedbackStore]:
    store = FeedbackStore(f"sqlite:///{tmp_path_factory.mktemp('feedback') / 'feedback.db'}")
    yield store
    store.close()


@pytest.fixture(scope="module")
def base_url(shared_store: FeedbackStore) -> Iterator[str]:
    with serve_feedback(shared_store, dependencies=[Depends(require_key)], window_seconds=600) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"X-API-Key": API_KEY}, timeout=60) as c:
        yield c


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


_VERSIONED_DEFAULTS = {
    # The router here has no get_version and no predictions are logged: Katonic feedback is of version "".
    "classifier_feedback_total": {"version": "", "source": "api"},
    "classifier_feedback_accuracy": {"version": ""},
    "classifier_feedback_macro_f1": {"version": ""},
}


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, {**_VERSIONED_DEFAULTS.get(name, {}), **(labels or {})}) or 0.0


def assert_report_matches(report: dict[str, Any], y_true: Sequence[int], y_pred: Sequence[int],
                          labels: LabelsFile) -> None:
    """A report from the API equals scikit-learn's on the same labels."""
    ids = labels.labels
    names = [labels.name_of(i) for i in ids]
    expected = classification_report(y_true, y_pred, labels=ids, target_names=names, output_dict=True,
                                     zero_division=0)
    assert report["count"] == len(y_true)
    assert report["confusion_matrix"]["matrix"] == confusion_matrix(y_true, y_pred, labels=ids).tolist()
    assert report["confusion_matrix"]["labels"] == ids
    assert report["confusion_matrix"]["names"] == names
    assert report["accuracy"] == pytest.approx(float(np.mean(np.asarray(y_true) == np.asarray(y_pred))))
    for cls in report["per_class"]:
        for ours, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"),
                             ("support", "support")):
            assert cls[ours] == pytest.approx(expected[cls["name"]][theirs]), (cls["name"], ours)
    # macro_avg is scikit-learn's default (classes present in truth or prediction); the all-labels variant is
    # what it computes when given every label of labels_file.json.
    default = classification_report(y_true, y_pred, output_dict=True, zero_division=0) if len(y_true) else None
    for ours, theirs, source in (("macro_avg_all_labels", "macro avg", expected),
                                 ("weighted_avg", "weighted avg", expected), ("macro_avg", "macro avg", default)):
        if source is None:
            continue
        for key, their_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert report[ours][key] == pytest.approx(source[theirs][their_key]), (ours, key)


# --- accepted submissions --------------------------------------------------------------------


@pytest.mark.parametrize("prefix, labels", [("iris", IRIS), ("binary", BINARY), ("digits", DIGITS)])
def test_katonic_feedback_batch_and_cumulative_match_sklearn(client: httpx.Client, prefix: str,
                                                            labels: LabelsFile) -> None:
    model = unique(prefix)
    rng = np.random.default_rng(len(labels.labels))
    k = len(labels.labels)
    all_true: list[int] = []
    all_pred: list[int] = []
    for size in (40, 25):
        y_true = rng.integers(0, k, size).tolist()
        y_pred = [t if rng.random() < 0.7 else int(rng.integers(0, k)) for t in y_true]
        r = client.post(f"/v2/models/{model}/feedback", json={"predicted_label": y_pred, "true_label": y_true})
        assert r.status_code == 200, r.text
        body = r.json()
        all_true += y_true
        all_pred += y_pred
        assert body["model_name"] == model
        assert body["accepted"] == size
        assert_report_matches(body["batch"], y_true, y_pred, labels)
        assert_report_matches(body["cumulative"], all_true, all_pred, labels)

    for path in (f"/v2/models/{model}/feedback", f"/v2/models/{model}/metrics/classification"):
        r = client.get(path)
        assert r.status_code == 200, r.text
        report = r.json()
        assert_report_matches(report["cumulative"], all_true, all_pred, labels)
        assert_report_matches(report["recent"], all_true, all_pred, labels)
        assert report["recent"]["window_seconds"] == 600

    # Prometheus: the cell counters hold the matrix, the gauges the cumulative values.
    cm = confusion_matrix(all_true, all_pred, labels=labels.labels)
    for t in range(k):
        for p in range(k):
            assert sample("classifier_feedback_total",
                          {"model": model, "true_label": str(t), "predicted_label": str(p)}) == cm[t, p]
    assert sample("classifier_feedback_accuracy", {"model": model}) == pytest.approx(report["cumulative"]["accuracy"])
    assert sample("classifier_feedback_macro_f1", {"model": model}) == pytest.approx(
        report["cumulative"]["macro_avg"]["f1"])


def test_get_before_any_feedback(client: httpx.Client) -> None:
    r = client.get(f"/v2/models/{unique('iris')}/feedback", params={"window_seconds": "30.5"})
    assert r.status_code == 200
    report = r.json()
    assert report["cumulative"]["count"] == 0 and report["cumulative"]["accuracy"] is None
    assert report["recent"]["window_seconds"] == 30.5
    assert report["cumulative"]["confusion_matrix"]["matrix"] == [[0, 0, 0]] * 3


def test_id_form_joins_with_logged_predictions(client: httpx.Client, shared_store: FeedbackStore) -> None:
    model = unique("iris")
    shared_store.record_predictions(model, "1", [("req-a", 0), ("req-b/0", 1), ("req-b/1", 2)])
    r = client.post(f"/v2/models/{model}/feedback", json={"items": [
        {"id": "req-a", "true_label": 0}, {"id": "req-b/0", "true_label": 2}, {"id": "req-b/1", "true_label": 2}]})
    assert r.status_code == 200, r.text
    # true 0 <- predicted 0, true 2 <- predicted 1, true 2 <- predicted 2
    assert r.json()["batch"]["confusion_matrix"]["matrix"] == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert_report_matches(r.json()["cumulative"], [0, 2, 2], [0, 1, 2], IRIS)

    again = client.post(f"/v2/models/{model}/feedback", json={"items": [{"id": "req-a", "true_label": 1}]})
    assert again.status_code == 409
    assert "req-a" in again.json()["error"]
    assert shared_store.feedback_count(model) == 3
    assert sample("classifier_feedback_rejected_total", {"model": model, "reason": "duplicate"}) == 1


def test_recent_window_excludes_old_feedback(client: httpx.Client, shared_store: FeedbackStore) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from predictors.feedback.store import feedback

    model = unique("binary")
    client.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0, 0], "true_label": [1, 1]})
    with shared_store.engine.begin() as conn:  # as if recorded two hours ago
        conn.execute(update(feedback).where(feedback.c.model == model)
                     .values(created_at=datetime.now(UTC) - timedelta(hours=2)))
    client.post(f"/v2/models/{model}/feedback", json={"predicted_label": [1], "true_label": [1]})
    report = client.get(f"/v2/models/{model}/feedback", params={"window_seconds": 3600}).json()
    assert report["cumulative"]["confusion_matrix"]["matrix"] == [[0, 0], [2, 1]]
    assert report["recent"]["confusion_matrix"]["matrix"] == [[0, 0], [0, 1]]
    assert report["recent"]["accuracy"] == 1.0


# --- rejected submissions: right status, {"error": ...}, nothing recorded -----------------------

BAD_BODIES: list[tuple[str, bytes, int, str, str]] = [
    # (case id, raw body, status, text in the error, rejection reason)
    ("malformed-json", b'{"true_label": [1,', 400, "not valid JSON", "malformed_json"),
    ("empty-body", b"", 400, "empty request body", "malformed_json"),
    ("not-utf8", b'{"true_label": [\xff]}', 400, "not valid JSON", "malformed_json"),
    ("nan", b'{"predicted_label": [NaN], "true_label": [1]}', 400, "NaN", "malformed_json"),
    ("top-level-list", b"[1, 2]", 400, "JSON object", "malformed_json"),
    ("unknown-shape", b'{"labels": [1]}', 400, "unrecognised feedback body", "invalid_body"),
    ("extra-key", b'{"predicted_label": [1], "true_label": [1], "weights": [1]}', 400, "weights",
     "invalid_body"),
    ("missing-true", b'{"predicted_label": [1]}', 400, "true_label: Field required", "invalid_body"),
    ("mismatched-lengths", b'{"predicted_label": [1, 2], "true_label": [1]}', 400, "pair up", "invalid_body"),
    ("empty-lists", b'{"predicted_label": [], "true_label": []}', 400, "at least 1", "invalid_body"),
    ("not-a-list", b'{"predicted_label": 1, "true_label": 1}', 400, "valid list", "invalid_body"),
    ("string-label", b'{"predicted_label": ["1"], "true_label": [1]}', 400, "predicted_label[0]",
     "invalid_body"),
    ("float-label", b'{"predicted_label": [1], "true_label": [1.5]}', 400, "true_label[0]", "invalid_body"),
    ("integral-float", b'{"predicted_label": [1.0], "true_label": [1]}', 400, "valid integer", "invalid_body"),
    ("bool-label", b'{"predicted_label": [true], "true_label": [1]}', 400, "valid integer", "invalid_body"),
    ("null-label", b'{"predicted_label": [null], "true_label": [1]}', 400, "valid integer", "invalid_body"),
    ("label-not-in-labels-file", b'{"predicted_label": [0, 1], "true_label": [0, 3]}', 400,
     "true_label has labels [3] that are not in labels_file.json", "unknown_label"),
    ("negative-label", b'{"predicted_label": [-1], "true_label": [0]}', 400, "predicted_label has labels [-1]",
     "unknown_label"),
    ("huge-label", b'{"predicted_label": [0], "true_label": [100000000000000000000000]}', 400,
     "not in labels_file.json", "unknown_label"),
    ("items-empty", b'{"items": []}', 400, "at least 1", "invalid_body"),
    ("items-not-objects", b'{"items": [1]}', 400, "items[0]", "invalid_body"),
    ("items-id-not-string", b'{"items": [{"id": 17, "true_label": 1}]}', 400, "items[0].id", "invalid_body"),
    ("items-id-empty", b'{"items": [{"id": "", "true_label": 1}]}', 400, "items[0].id", "invalid_body"),
    ("items-id-too-long", json.dumps({"items": [{"id": "x" * 300, "true_label": 1}]}).encode(), 400,
     "at most 256", "invalid_body"),
    ("items-missing-label", b'{"items": [{"id": "logged-0"}]}', 400, "items[0].true_label: Field required",
     "invalid_body"),
    ("items-float-label", b'{"items": [{"id": "logged-0", "true_label": 1.5}]}', 400, "items[0].true_label",
     "invalid_body"),
    ("items-label-not-in-labels-file", b'{"items": [{"id": "logged-0", "true_label": 7}]}', 400,
     "true_label has labels [7]", "unknown_label"),
    ("items-unknown-id", b'{"items": [{"id": "logged-0", "true_label": 1}, {"id": "never", "true_label": 1}]}',
     400, "unknown prediction ids for model", "unknown_id"),
    ("items-repeated-id", b'{"items": [{"id": "logged-0", "true_label": 1}, {"id": "logged-0", "true_label": 2}]}',
     400, "more than once", "invalid_body"),
    ("too-many-labels", json.dumps({"predicted_label": [0] * 10_001, "true_label": [0] * 10_001}).encode(), 413,
     "exceed the limit of 10000", "too_large"),
    ("too-many-items", json.dumps({"items": [{"id": f"i{n}", "true_label": 0} for n in range(10_001)]}).encode(),
     413, "exceed the limit of 10000", "too_large"),
    ("too-many-bytes", b'{"predicted_label": [0], "true_label": [0], "pad": "' + b"x" * (5 << 20) + b'"}', 413,
     "exceeds the limit of", "too_large"),
]


@pytest.mark.parametrize("case, raw, status, message, reason", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_are_rejected_and_record_nothing(client: httpx.Client, shared_store: FeedbackStore,
                                                    case: str, raw: bytes, status: int, message: str,
                                                    reason: str) -> None:
    model = unique("iris")
    shared_store.record_predictions(model, "1", [("logged-0", 1)])
    client.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0], "true_label": [0]})
    before = (shared_store.feedback_count(), shared_store.confusion(model, IRIS.labels).tolist())
    counter_before = sample("classifier_feedback_total", {"model": model, "true_label": "0", "predicted_label": "0"})

    r = client.post(f"/v2/models/{model}/feedback", content=raw, headers={"content-type": "application/json"})

    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    assert message in r.json()["error"], r.json()["error"]
    assert (shared_store.feedback_count(), shared_store.confusion(model, IRIS.labels).tolist()) == before
    assert sample("classifier_feedback_total",
                  {"model": model, "true_label": "0", "predicted_label": "0"}) == counter_before
    assert sample("classifier_feedback_rejected_total", {"model": model, "reason": reason}) == 1


def test_oversized_chunked_body_is_refused_while_streaming(client: httpx.Client, shared_store: FeedbackStore) -> None:
    """No Content-Length to check up front: the limit applies while reading."""
    model = unique("iris")
    before = shared_store.feedback_count()

    def chunks() -> Iterator[bytes]:
        yield b'{"predicted_label": [0], "true_label": [0], "pad": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    r = client.post(f"/v2/models/{model}/feedback", content=chunks())
    assert r.status_code == 413
    assert "exceeds the limit" in r.json()["error"]
    assert shared_store.feedback_count() == before


def test_unknown_model_is_404(client: httpx.Client, shared_store: FeedbackStore) -> None:
    before = shared_store.feedback_count()
    rejected = sample("classifier_feedback_rejected_total", {"model": "", "reason": "unknown_model"})
    r = client.post("/v2/models/no-such-model/feedback", json={"predicted_label": [0], "true_label": [0]})
    assert r.status_code == 404
    assert r.json() == {"error": "Model with name no-such-model does not exist."}
    assert client.get("/v2/models/no-such-model/feedback").status_code == 404
    assert shared_store.feedback_count() == before
    assert sample("classifier_feedback_rejected_total", {"model": "", "reason": "unknown_model"}) == rejected + 1


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}], ids=["missing-key", "wrong-key"])
def test_auth_dependency_applies_to_every_route(base_url: str, shared_store: FeedbackStore,
                                               headers: dict[str, str]) -> None:
    model = unique("iris")
    before = shared_store.feedback_count()
    with httpx.Client(base_url=base_url, headers=headers) as anonymous:
        r = anonymous.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0], "true_label": [0]})
        assert r.status_code == 401
        assert r.json() == {"error": "missing or wrong API key"}
        assert anonymous.get(f"/v2/models/{model}/feedback").status_code == 401
        assert anonymous.get(f"/v2/models/{model}/metrics/classification").status_code == 401
    assert shared_store.feedback_count() == before


@pytest.mark.parametrize("window", ["abc", "0", "-5", "nan", "inf", "1e12", ""])
def test_bad_window_is_400(client: httpx.Client, window: str) -> None:
    r = client.get(f"/v2/models/{unique('iris')}/feedback", params={"window_seconds": window})
    assert r.status_code == 400
    assert "window_seconds must be" in r.json()["error"]


def test_bad_default_window_is_refused_at_build_time(shared_store: FeedbackStore) -> None:
    with pytest.raises(ValueError, match="window_seconds"):
        build_feedback_router(shared_store, get_labels, window_seconds=0)


# --- concurrency -----------------------------------------------------------------------------


def test_parallel_submissions_are_counted_exactly(any_store: FeedbackStore) -> None:
    """16 clients x 50 submissions in parallel through real HTTP: exact totals in DB, report and counters."""
    model = unique("iris")
    workers, per_worker = 16, 50
    expected = np.zeros((3, 3), dtype=np.int64)
    lock = threading.Lock()
    failures: list[str] = []

    def client_thread(url: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(per_worker):
                n = int(rng.integers(1, 5))
                y_true, y_pred = rng.integers(0, 3, n).tolist(), rng.integers(0, 3, n).tolist()
                r = c.post(f"/v2/models/{model}/feedback", json={"predicted_label": y_pred, "true_label": y_true})
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    else:
                        np.add.at(expected, (y_true, y_pred), 1)

    with serve_feedback(any_store) as url:
        threads = [threading.Thread(target=client_thread, args=(url, s)) for s in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        report = httpx.get(f"{url}/v2/models/{model}/feedback", timeout=60).json()

    assert report["cumulative"]["confusion_matrix"]["matrix"] == expected.tolist()
    assert any_store.confusion(model, IRIS.labels).tolist() == expected.tolist()
    counters = [[sample("classifier_feedback_total", {"model": model, "true_label": str(t), "predicted_label": str(p)})
                 for p in range(3)] for t in range(3)]
    assert counters == expected.tolist()
    # The gauge was last set from the database totals by some submission; the final one saw them all.
    final_accuracy = np.trace(expected) / expected.sum()
    assert report["cumulative"]["accuracy"] == pytest.approx(final_accuracy)


def test_parallel_feedback_for_the_same_ids_counts_each_once(any_store: FeedbackStore) -> None:
    """8 clients race to send ground truth for the same 30 predictions: 30 accepted, the rest 409."""
    model = unique("iris")
    ids = [f"req-{i}" for i in range(30)]
    any_store.record_predictions(model, "1", [(pid, i % 3) for i, pid in enumerate(ids)])
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def client_thread(url: str) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            start.wait()
            for pid in ids:
                r = c.post(f"/v2/models/{model}/feedback", json={"items": [{"id": pid, "true_label": 0}]})
                with lock:
                    statuses.append(r.status_code)

    with serve_feedback(any_store) as url:
        threads = [threading.Thread(target=client_thread, args=(url,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    assert statuses.count(200) == 30
    assert statuses.count(409) == 8 * 30 - 30
    assert any_store.feedback_count(model) == 30
    assert any_store.confusion(model, IRIS.labels).tolist() == [[10, 10, 10], [0, 0, 0], [0, 0, 0]]


def test_database_waits_do_not_block_the_event_loop(tmp_path: Path) -> None:
    """While a POST waits for the SQLite write lock, the same server keeps answering other requests."""
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    assert store.check().available  # the first contact creates the tables (and WAL) before the lock is taken
    model = unique("iris")
    try:
        with serve_feedback(store) as url:
            blocker = sqlite3.connect(tmp_path / "feedback.db", isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
            result: dict[str, httpx.Response] = {}
            post = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
                f"{url}/v2/models/{model}/feedback", json={"predicted_label": [1], "true_label": [1]}, timeout=120)))
            post.start()
            try:
                # The POST cannot finish while the lock is held; GETs must still be served.
                for _ in range(3):
                    r = httpx.get(f"{url}/v2/models/{model}/feedback", timeout=30)
                    assert r.status_code == 200
                    assert r.json()["cumulative"]["count"] == 0
                assert post.is_alive()
            finally:
                blocker.execute("COMMIT")
                blocker.close()
            post.join(timeout=120)
            assert result["r"].status_code == 200
            assert store.feedback_count(model) == 1
    finally:
        store.close()


# --- idempotent resends and an unreachable database ------------------------------------------


@pytest.mark.parametrize("form", ["katonic", "ids"])
def test_a_resent_submission_id_answers_the_first_submission_and_counts_nothing_twice(
        client: httpx.Client, shared_store: FeedbackStore, form: str) -> None:
    model = unique("iris")
    if form == "katonic":
        body: dict[str, Any] = {"predicted_label": [0, 1, 2], "true_label": [0, 2, 2]}
    else:
        shared_store.record_predictions(model, "1", [("a", 0), ("b", 1), ("c", 2)])
        body = {"items": [{"id": "a", "true_label": 0}, {"id": "b", "true_label": 2}, {"id": "c", "true_label": 2}]}
    body["submission_id"] = "retry-me"
    first = client.post(f"/v2/models/{model}/feedback", json=body)
    assert first.status_code == 200, first.text
    cell = {"model": model, "true_label": "2", "predicted_label": "1", "version": "" if form == "katonic" else "1"}
    counted = sample("classifier_feedback_total", cell)
    again = client.post(f"/v2/models/{model}/feedback", json=body)
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "replayed": True}
    assert first.json()["replayed"] is False
    assert shared_store.feedback_count(model) == 3
    assert sample("classifier_feedback_total", cell) == counted == 1

    other = client.post(f"/v2/models/{model}/feedback",
                        json={"predicted_label": [0], "true_label": [1], "submission_id": "retry-me"})
    assert other.status_code == 409 and "retry-me" in other.json()["error"]
    assert shared_store.feedback_count(model) == 3


@pytest.mark.parametrize("submission_id", ["", "x" * 129, 7, None])
def test_bad_submission_ids_are_400(client: httpx.Client, shared_store: FeedbackStore, submission_id: Any) -> None:
    model = unique("iris")
    r = client.post(f"/v2/models/{model}/feedback",
                    json={"predicted_label": [0], "true_label": [0], "submission_id": submission_id})
    if submission_id is None:  # null means "not given"
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400 and "submission_id" in r.json()["error"]
    assert shared_store.feedback_count(model) == 0


def test_unreachable_database_is_503_with_retry_after(tmp_path: Path) -> None:
    """A SQLite file whose directory is missing (an unmounted volume) cannot be opened: every route says 503."""
    store = FeedbackStore(f"sqlite:///{tmp_path / 'not-mounted' / 'feedback.db'}", retry_after_s=30)
    model = unique("iris")
    with serve_feedback(store) as url, httpx.Client(base_url=url, timeout=60) as c:
        route = f"/v2/models/{model}/feedback"
        for method, path, body in (("POST", route, {"predicted_label": [0], "true_label": [0]}),
                                   ("POST", route, {"items": [{"id": "a", "true_label": 0}]}),
                                   ("GET", route, None), ("GET", "/v2/feedback/store", None)):
            r = c.request(method, path, json=body)
            assert r.status_code == 503, r.text
            if path != "/v2/feedback/store":  # the state route reports; the others tell clients when to retry
                assert 1 <= int(r.headers["retry-after"]) <= 30
            assert "unreachable" in r.json()["error"] or "unable to open" in r.json()["error"]
        assert sample("classifier_feedback_rejected_total", {"model": model, "reason": "unavailable"}) == 2
        assert sample("classifier_feedback_store_up") == 0
        # a client error is still a client error while the database is down
        assert c.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0]}).status_code == 400

        (tmp_path / "not-mounted").mkdir()  # the volume appears
        store.retry_after_s = 0.2
        wait_for(lambda: c.get("/v2/feedback/store").status_code == 200, timeout=60, what="the store to recover")
        assert sample("classifier_feedback_store_up") == 1
        r = c.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0], "true_label": [0]})
        assert r.status_code == 200, r.text
    store.close()
