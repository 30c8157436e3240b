"""Model versions and feedback sources in the store, its schema migration, and the comparison statistics.

The migration test builds the schema as it was before versions reached the feedback table, with rows in
it, on a real SQLite file and a real PostgreSQL database, then lets the current code open it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from scipy.stats import norm
from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    inspect,
    select,
)

from predictors.feedback import FeedbackStore
from predictors.feedback.compare import (
    bootstrap_macro_f1,
    choose_versions,
    compare,
    n_per_group,
    two_proportion_z,
    wilson_interval,
)
from predictors.feedback.migrations import LATEST, SchemaTooNew, current_version, schema_version
from predictors.feedback.store import feedback
from tests.test_feedback_api import IRIS, serve_feedback, unique

# --- the schema before migration 2 -----------------------------------------------------------

old_metadata = MetaData()
Table("prediction_log", old_metadata,
      Column("id", Integer, primary_key=True, autoincrement=True),
      Column("model", String(63), nullable=False),
      Column("version", String(64), nullable=False),
      Column("prediction_id", String(256), nullable=False),
      Column("predicted_label", Integer, nullable=False),
      Column("created_at", DateTime, nullable=False),
      UniqueConstraint("model", "prediction_id", name="uq_prediction_log_model_prediction_id"),
      Index("ix_prediction_log_created_at", "created_at"))
old_feedback = Table(
    "feedback", old_metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(63), nullable=False),
    Column("submission_id", String(32), nullable=False),
    Column("prediction_id", String(256), nullable=True),
    Column("true_label", Integer, nullable=False),
    Column("predicted_label", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    UniqueConstraint("model", "prediction_id", name="uq_feedback_model_prediction_id"),
    Index("ix_feedback_model_created_at", "model", "created_at"),
    Index("ix_feedback_submission_id", "submission_id"))
Table("feedback_submissions", old_metadata,
      Column("model", String(63), primary_key=True),
      Column("client_submission_id", String(128), primary_key=True),
      Column("submission_id", String(32), nullable=False),
      Column("created_at", DateTime, nullable=False))


def make_old_database(url: str) -> None:
    """The old schema with a logged prediction, its feedback by id, and two Katonic-form rows."""
    engine = create_engine(url)
    now = datetime.now(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        old_metadata.create_all(conn)
        conn.execute(old_metadata.tables["prediction_log"].insert(), [
            {"model": "iris", "version": "7", "prediction_id": "p1", "predicted_label": 2, "created_at": now},
            {"model": "iris", "version": "7", "prediction_id": "p2", "predicted_label": 1, "created_at": now}])
        conn.execute(old_feedback.insert(), [
            {"model": "iris", "submission_id": "s1", "prediction_id": "p1", "true_label": 2, "predicted_label": 2,
             "created_at": now},
            {"model": "iris", "submission_id": "s2", "prediction_id": None, "true_label": 0, "predicted_label": 1,
             "created_at": now},
            {"model": "iris", "submission_id": "s2", "prediction_id": None, "true_label": 1, "predicted_label": 1,
             "created_at": now}])
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return request.getfixturevalue("postgres_url")


def test_an_old_database_is_migrated_with_its_rows_kept(db_url: str) -> None:
    make_old_database(db_url)
    store = FeedbackStore(db_url)
    try:
        assert store.feedback_count("iris") == 3 and store.prediction_count("iris") == 2
        with store.engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns("feedback")}
            assert {"version", "source"} <= columns
            assert current_version(conn) == LATEST
            rows = conn.execute(select(feedback.c.prediction_id, feedback.c.version, feedback.c.source)
                                .order_by(feedback.c.id)).all()
        # The id-form row takes its logged prediction's version; the Katonic rows' version is unknown.
        assert [tuple(r) for r in rows] == [("p1", "7", "api"), (None, "", "api"), (None, "", "api")]
        by_version = store.confusion_by_version("iris", IRIS.labels)
        assert set(by_version) == {"7", ""}
        assert by_version["7"].sum() == 1 and by_version[""].sum() == 2
        # New rows carry their version and source, and the id form still joins (p2 has no feedback yet).
        submission = store.add_feedback_by_ids("iris", [("p2", 1)], source="ui")
        assert submission.versions == ["7"]
        assert store.confusion("iris", IRIS.labels, version="7", sources=["ui"]).sum() == 1
        assert store.confusion("iris", IRIS.labels, version="7", sources=["api"]).sum() == 1
    finally:
        store.close()
    # A replica still running the previous code (rolling upgrade) can go on inserting: the new columns default.
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(old_feedback.insert(), {"model": "iris", "submission_id": "s3", "prediction_id": None,
                                             "true_label": 0, "predicted_label": 0,
                                             "created_at": datetime.now(UTC).replace(tzinfo=None)})
        assert tuple(conn.execute(select(feedback.c.version, feedback.c.source)
                                  .where(feedback.c.submission_id == "s3")).one()) == ("", "api")
        conn.execute(old_feedback.delete().where(old_feedback.c.submission_id == "s3"))
    engine.dispose()
    # A second start finds the schema current and changes nothing.
    again = FeedbackStore(db_url)
    try:
        assert again.feedback_count("iris") == 4
        with again.engine.connect() as conn:
            assert conn.execute(select(schema_version.c.version)).scalars().all() == [LATEST]
    finally:
        again.close()


def test_concurrent_first_starts_migrate_once(db_url: str) -> None:
    make_old_database(db_url)
    stores = [FeedbackStore(db_url) for _ in range(4)]
    errors: list[BaseException] = []

    def first_call(store: FeedbackStore) -> None:
        try:
            store.feedback_count()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_call, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors
        with stores[0].engine.connect() as conn:
            assert conn.execute(select(schema_version.c.version)).scalars().all() == [LATEST]
    finally:
        for s in stores:
            s.close()


def test_a_fresh_database_starts_at_the_latest_version(db_url: str) -> None:
    store = FeedbackStore(db_url)
    try:
        assert store.feedback_count() == 0
        with store.engine.connect() as conn:
            assert current_version(conn) == LATEST
    finally:
        store.close()


def test_a_database_migrated_by_a_newer_server_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    FeedbackStore(url).feedback_count()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(schema_version.insert(), {"version": LATEST + 1, "applied_at": datetime.now()})
    engine.dispose()
    store = FeedbackStore(url)
    with pytest.raises(SchemaTooNew, match="newer"):
        store.feedback_count()
    store.close()


# --- versions and sources through the API ----------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FeedbackStore, httpx.Client]]:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'feedback.db'}")
    with serve_feedback(store, get_version=lambda name: "3") as url, httpx.Client(base_url=url, timeout=60) as c:
        yield store, c
    store.close()


def test_katonic_feedback_takes_the_served_or_the_named_version(served) -> None:
    _, c = served
    model = unique("iris")
    assert c.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0], "true_label": [0]}).status_code == 200
    r = c.post(f"/v2/models/{model}/feedback", json={"predicted_label": [1], "true_label": [0], "version": "2"})
    assert r.status_code == 200, r.text
    report = c.get(f"/v2/models/{model}/feedback").json()
    assert [(v["version"], v["count"], v["accuracy"]) for v in report["versions"]] == [("3", 1, 1.0), ("2", 1, 0.0)]
    assert c.get(f"/v2/models/{model}/feedback", params={"version": "2"}).json()["cumulative"]["count"] == 1


def test_browser_feedback_is_marked_and_can_be_left_out(served) -> None:
    _, c = served
    model = unique("iris")
    assert c.post(f"/v2/models/{model}/feedback",
                  json={"predicted_label": [0, 1], "true_label": [0, 1]}).status_code == 200
    r = c.post(f"/v2/models/{model}/feedback", json={"predicted_label": [2], "true_label": [0], "source": "ui"})
    assert r.status_code == 200, r.text
    route = f"/v2/models/{model}/feedback"
    assert c.get(route).json()["cumulative"]["count"] == 3
    production = c.get(route, params={"exclude_source": "ui"}).json()
    assert production["sources"] == ["api"] and production["cumulative"]["accuracy"] == 1.0
    assert c.get(route, params={"source": "ui"}).json()["cumulative"]["count"] == 1
    for bad in ({"source": "kafka"}, {"source": "ui", "exclude_source": "ui"}, {"version": "x" * 65}):
        r = c.get(route, params=bad)
        assert r.status_code == 400 and "error" in r.json(), (bad, r.text)
    r = c.post(route, json={"predicted_label": [0], "true_label": [0], "source": "somewhere"})
    assert r.status_code == 400


def test_compare_needs_two_versions_and_names_them(served) -> None:
    _, c = served
    model = unique("iris")
    route = f"/v2/models/{model}/feedback/compare"
    assert c.get(route).status_code == 400  # no feedback at all
    c.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0] * 5, "true_label": [0] * 5, "version": "1"})
    r = c.get(route)  # version 3 is served and has no feedback yet
    assert r.status_code == 200, r.text
    assert r.json()["verdict"] == "undecided" and "no feedback yet for version '3'" in r.json()["reason"]
    r = c.get(route, params={"candidate": "1"})
    assert r.status_code == 400 and "second version" in r.json()["error"]
    c.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0] * 5, "true_label": [0, 0, 0, 1, 1]})
    body = c.get(route).json()
    assert (body["baseline"]["version"], body["candidate"]["version"]) == ("1", "3")
    assert body["verdict"] == "undecided"
    swapped = c.get(route, params={"baseline": "3", "candidate": "1"}).json()
    assert (swapped["baseline"]["version"], swapped["candidate"]["version"]) == ("3", "1")


def test_deeply_nested_feedback_is_a_400_not_a_500(served) -> None:
    _, c = served
    model = unique("iris")
    for body in ("[" * 100_000 + "]" * 100_000, '{"items": ' + "[" * 50_000 + "]" * 50_000 + "}",
                 '{"true_label": ' + "[" * 900 + "]" * 900 + ', "predicted_label": [0]}'):
        r = c.post(f"/v2/models/{model}/feedback", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text[:300]
        assert "error" in r.json()
    assert c.post(f"/v2/models/{model}/feedback", json={"predicted_label": [0], "true_label": [0]}).status_code == 200


def test_503_bodies_name_no_database_host_or_user(postgres_server) -> None:
    """A refused login's driver message names the user and the address; clients see only the category."""
    url = f"postgresql+psycopg://nosuchuser@127.0.0.1:{postgres_server.port}/postgres"
    store = FeedbackStore(url, retry_after_s=30)
    model = unique("iris")
    with serve_feedback(store) as base, httpx.Client(base_url=base, timeout=60) as c:
        for method, path, body in (("POST", f"/v2/models/{model}/feedback", {"predicted_label": [0],
                                                                           "true_label": [0]}),
                                   ("GET", f"/v2/models/{model}/feedback", None),
                                   ("GET", "/v2/feedback/store", None)):
            r = c.request(method, path, json=body)
            assert r.status_code == 503, r.text
            for secret in ("nosuchuser", "127.0.0.1", str(postgres_server.port)):
                assert secret not in r.text, (path, r.text)
    store.close()


# --- the statistics ----------------------------------------------------------------------------


def test_wilson_interval_matches_the_textbook_values() -> None:
    low, high = wilson_interval(9, 10)
    assert (low, high) == pytest.approx((0.5958, 0.9821), abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_two_proportion_z_matches_scipy() -> None:
    z, p = two_proportion_z(90, 100, 75, 100)
    pooled = 165 / 200
    expected_z = (0.75 - 0.9) / np.sqrt(pooled * (1 - pooled) * (2 / 100))
    assert z == pytest.approx(expected_z) and p == pytest.approx(2 * norm.sf(abs(expected_z)))
    assert two_proportion_z(10, 10, 5, 5) == (0.0, 1.0)


def test_sample_size_for_80_percent_power() -> None:
    # The standard two-proportion formula: 0.90 against 0.85 needs about 686 per group.
    assert n_per_group(0.9, 0.85) == 686
    assert n_per_group(0.9, 0.6) < n_per_group(0.9, 0.8) < n_per_group(0.9, 0.85)
    assert n_per_group(0.8, 0.8) is None


def test_bootstrap_interval_brackets_macro_f1_and_is_reproducible() -> None:
    cm = np.array([[40, 5, 0], [3, 30, 7], [0, 4, 11]])
    low, high = bootstrap_macro_f1(cm)
    assert low < 0.8 < high and (low, high) == bootstrap_macro_f1(cm)


def test_verdicts() -> None:
    def matrix(right: int, wrong: int) -> np.ndarray:
        return np.array([[right, wrong], [0, 0]])

    better = compare("m", {"1": matrix(70, 30), "2": matrix(90, 10)}, "1", "2")
    assert better.verdict == "better" and better.test.difference == pytest.approx(0.2)
    worse = compare("m", {"1": matrix(90, 10), "2": matrix(70, 30)}, "1", "2")
    assert worse.verdict == "worse"
    small = compare("m", {"1": matrix(9, 1), "2": matrix(7, 3)}, "1", "2")
    assert small.verdict == "undecided" and small.n_so_far == 10 and small.n_needed == n_per_group(0.9, 0.7)
    missing = compare("m", {"1": matrix(9, 1)}, "1", "2")
    assert missing.verdict == "undecided" and missing.n_needed is None and missing.candidate.count == 0


def test_choosing_versions() -> None:
    assert choose_versions(["1", "2", "3"], "3", None, None) == ("2", "3")
    assert choose_versions(["1", "2", "3"], "2", None, None) == ("1", "2")
    assert choose_versions(["1", "2"], "1", None, None) == ("2", "1")  # rolled back to 1
    assert choose_versions(["1", "2"], "9", None, None) == ("2", "9")  # served version has no feedback yet
    assert choose_versions(["1", "2"], None, None, None) == ("1", "2")
    with pytest.raises(LookupError):
        choose_versions([], "1", None, None)
    assert choose_versions(["1", "2", "3"], None, "1", "3") == ("1", "3")
    with pytest.raises(LookupError):
        choose_versions(["1"], "1", None, None)
    with pytest.raises(ValueError):
        choose_versions(["1", "2"], None, "2", "2")


def test_one_submission_may_judge_several_versions(db_url: str) -> None:
    """Ids answered before and after a swap, sent together: each row counts against the version that answered."""
    store = FeedbackStore(db_url)
    try:
        store.record_predictions("iris", "1", [("old-a", 0), ("old-b", 1)])
        store.record_predictions("iris", "2", [("new-a", 2)])
        submission = store.add_feedback_by_ids("iris", [("old-a", 0), ("new-a", 0), ("old-b", 1)])
        assert submission.versions == ["1", "2", "1"]
        by_version = store.confusion_by_version("iris", IRIS.labels)
        assert set(by_version) == {"1", "2"}
        assert np.trace(by_version["1"]) == 2 and by_version["2"][0, 2] == 1
        assert store.confusion("iris", IRIS.labels, version="2").sum() == 1
    finally:
        store.close()
