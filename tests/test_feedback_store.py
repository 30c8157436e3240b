"""FeedbackStore against a real SQLite file and a real PostgreSQL server (every test runs on both)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix
from sqlalchemy import event, update

from predictors.feedback import DuplicateFeedback, FeedbackStore, UnknownPredictions
from predictors.feedback.store import MAX_ID_LENGTH, SubmissionIdReused, feedback, prediction_log
from predictors.protocol.errors import BadInput


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[FeedbackStore]:
    s = FeedbackStore(store_url)
    yield s
    s.close()


def test_confusion_is_counted_in_sql_and_matches_sklearn(store: FeedbackStore) -> None:
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    pairs = list(zip(y_true.tolist(), y_pred.tolist(), strict=True))
    store.add_feedback("iris", pairs[:200])
    store.add_feedback("iris", pairs[200:])
    store.add_feedback("other", [(0, 1)] * 7)  # another model's feedback is kept apart
    assert store.confusion("iris", [0, 1, 2]).tolist() == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    assert store.confusion("other", [0, 1]).tolist() == [[0, 7], [0, 0]]
    assert store.confusion("unknown", [0, 1]).tolist() == [[0, 0], [0, 0]]


def test_labels_outside_the_given_set_are_left_out(store: FeedbackStore) -> None:
    store.add_feedback("m", [(0, 0), (1, 2), (2, 1)])
    assert store.confusion("m", [0, 1]).tolist() == [[1, 0], [0, 0]]


def test_persists_across_reopen(store_url: str) -> None:
    first = FeedbackStore(store_url)
    first.record_predictions("iris", "1", [("req-1", 2)])
    first.add_feedback("iris", [(0, 0), (1, 1), (1, 2)])
    first.close()

    second = FeedbackStore(store_url)  # create-tables again is a no-op
    try:
        assert second.confusion("iris", [0, 1, 2]).tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
        second.add_feedback_by_ids("iris", [("req-1", 2)])
        assert second.confusion("iris", [0, 1, 2])[2, 2] == 1
    finally:
        second.close()


def test_id_join_uses_what_was_really_predicted(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("a", 0), ("b", 1), ("c", 2)])
    submission = store.add_feedback_by_ids("iris", [("a", 0), ("b", 2), ("c", 2)])
    assert submission.pairs == [(0, 0), (2, 1), (2, 2)]
    assert store.confusion("iris", [0, 1, 2]).tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]


def test_prediction_ids_are_per_model(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("same", 0)])
    store.record_predictions("mnist", "1", [("same", 7)])
    store.add_feedback_by_ids("mnist", [("same", 7)])
    store.add_feedback_by_ids("iris", [("same", 1)])
    assert store.confusion("mnist", list(range(10)))[7, 7] == 1
    assert store.confusion("iris", [0, 1, 2])[1, 0] == 1


def test_a_logged_prediction_is_never_overwritten(store: FeedbackStore) -> None:
    """A client re-using an id cannot change what feedback under that id is counted against."""
    assert store.record_predictions("iris", "1", [("r", 0)]) == 1
    assert store.record_predictions("iris", "2", [("r", 2), ("s", 1), ("s", 2)]) == 1  # only "s", first answer
    store.add_feedback_by_ids("iris", [("r", 1), ("s", 1)])
    assert store.confusion("iris", [0, 1, 2]).tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert store.prediction_count("iris") == 2


def test_a_flush_larger_than_one_statement_logs_every_row_once(store: FeedbackStore) -> None:
    """Rows go in multi-row statements of at most 500: a 1,203-row flush spans three of them."""
    store.record_predictions("iris", "1", [("p-700", 0)])  # already logged: keeps its first answer
    rows = [(f"p-{i}", i % 3) for i in range(1203)]
    assert store.record_predictions("iris", "1", rows) == 1202
    assert store.prediction_count("iris") == 1203
    store.add_feedback_by_ids("iris", [("p-700", 1), ("p-1202", 1)])
    assert store.confusion("iris", [0, 1, 2]).tolist() == [[0, 0, 0], [1, 0, 1], [0, 0, 0]]  # p-700 kept 0


def test_relogging_an_id_with_feedback_leaves_it_counted_once(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("r", 0)])
    store.add_feedback_by_ids("iris", [("r", 0)])
    assert store.record_predictions("iris", "1", [("r", 2)]) == 0
    with pytest.raises(DuplicateFeedback):
        store.add_feedback_by_ids("iris", [("r", 2)])
    assert store.confusion("iris", [0, 1, 2]).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_a_resent_submission_id_returns_the_first_answer_and_counts_once(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("a", 0), ("b", 2)])
    first = store.add_feedback_by_ids("iris", [("a", 0), ("b", 1)], submission_id="client-1")
    again = store.add_feedback_by_ids("iris", [("a", 0), ("b", 1)], submission_id="client-1")
    assert not first.replayed and again.replayed
    assert (again.submission_id, again.pairs) == (first.submission_id, first.pairs) == (first.submission_id,
                                                                                        [(0, 0), (1, 2)])
    katonic = store.add_feedback("iris", [(2, 2), (0, 1)], submission_id="client-2")
    assert store.add_feedback("iris", [(2, 2), (0, 1)], submission_id="client-2").submission_id == katonic.submission_id
    assert store.feedback_count("iris") == 4
    # the same client id for another model is another submission
    store.add_feedback("mnist", [(2, 2), (0, 1)], submission_id="client-2")
    assert store.feedback_count("mnist") == 2


@pytest.mark.parametrize("resend", [[(2, 2)], [(0, 1), (2, 2)], [(2, 2), (0, 1), (0, 1)]])
def test_a_submission_id_reused_for_other_content_is_a_conflict(store: FeedbackStore, resend) -> None:
    store.add_feedback("iris", [(2, 2), (0, 1)], submission_id="k")
    with pytest.raises(SubmissionIdReused, match="'k'") as exc:
        store.add_feedback("iris", resend, submission_id="k")
    assert exc.value.status == 409
    store.record_predictions("iris", "1", [("a", 0)])
    with pytest.raises(SubmissionIdReused):
        store.add_feedback_by_ids("iris", [("a", 0)], submission_id="k")
    assert store.feedback_count("iris") == 2


def test_concurrent_resends_record_one_submission(store: FeedbackStore) -> None:
    """12 threads send the same named submission at once: one is recorded, all get its answer."""
    store.record_predictions("iris", "1", [(f"p{i}", i % 3) for i in range(10)])
    items = [(f"p{i}", (i + 1) % 3) for i in range(10)]
    answers: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(12)

    def submit() -> None:
        start.wait()
        try:
            answers.append(store.add_feedback_by_ids("iris", items, submission_id="same").submission_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(answers) == 12 and len(set(answers)) == 1
    assert store.feedback_count("iris") == 10


def test_overlong_prediction_ids_are_not_logged(store: FeedbackStore) -> None:
    assert store.record_predictions("iris", "1", [("x" * (MAX_ID_LENGTH + 1), 0), ("ok", 1)]) == 1
    assert store.prediction_count("iris") == 1


def test_unknown_ids_reject_the_whole_submission(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("a", 0)])
    with pytest.raises(UnknownPredictions, match="'nope'") as exc:
        store.add_feedback_by_ids("iris", [("a", 0), ("nope", 1)])
    assert exc.value.ids == ["nope"]
    assert store.feedback_count() == 0


def test_repeated_id_is_a_conflict_and_records_nothing(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("a", 0), ("b", 1)])
    store.add_feedback_by_ids("iris", [("a", 0)])
    with pytest.raises(DuplicateFeedback, match="'a'") as exc:
        store.add_feedback_by_ids("iris", [("b", 1), ("a", 2)])
    assert exc.value.status == 409
    assert store.feedback_count() == 1  # "b" was not recorded either
    store.add_feedback_by_ids("iris", [("b", 1)])
    assert store.feedback_count() == 2


def test_same_id_twice_in_one_submission_is_bad_input(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("a", 0)])
    with pytest.raises(BadInput, match="more than once"):
        store.add_feedback_by_ids("iris", [("a", 0), ("a", 1)])
    assert store.feedback_count() == 0


def test_logged_label_outside_the_current_labels_is_refused(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("a", 5)])
    with pytest.raises(BadInput, match=r"\[5\]"):
        store.add_feedback_by_ids("iris", [("a", 0)], allowed_predicted={0, 1, 2})
    assert store.feedback_count() == 0


def test_empty_submissions_are_refused(store: FeedbackStore) -> None:
    with pytest.raises(BadInput):
        store.add_feedback("iris", [])
    with pytest.raises(BadInput):
        store.add_feedback_by_ids("iris", [])
    assert store.feedback_count() == 0


def test_window_counts_only_recent_feedback(store: FeedbackStore) -> None:
    old = store.add_feedback("iris", [(0, 0), (0, 1)])
    store.add_feedback("iris", [(2, 2)])
    # Age the first submission by two hours, as if it had been recorded then.
    with store.engine.begin() as conn:
        conn.execute(update(feedback).where(feedback.c.submission_id == old.submission_id)
                     .values(created_at=datetime.now(UTC) - timedelta(hours=2)))
    since = datetime.now(UTC) - timedelta(hours=1)
    assert store.confusion("iris", [0, 1, 2], since=since).tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert store.confusion("iris", [0, 1, 2]).sum() == 3


def test_concurrent_duplicate_submissions_count_once(store: FeedbackStore) -> None:
    """16 threads race to submit feedback for the same 20 ids: each id is counted exactly once."""
    ids = [f"p{i}" for i in range(20)]
    store.record_predictions("iris", "1", [(pid, i % 3) for i, pid in enumerate(ids)])
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def submit(worker: int) -> None:
        start.wait()
        for pid in ids:
            try:
                store.add_feedback_by_ids("iris", [(pid, worker % 3)])
                result = "ok"
            except DuplicateFeedback:
                result = "dup"
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=submit, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 20
    assert outcomes.count("dup") == 16 * 20 - 20
    assert store.feedback_count("iris") == 20


def test_concurrent_writers_from_threads_never_fail(store: FeedbackStore) -> None:
    """Many threads writing at once: no 'database is locked', exact totals."""
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(25):
                store.add_feedback("iris", [(worker % 3, i % 3)])
                store.record_predictions("iris", "1", [(f"w{worker}-{i}", i % 3)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.feedback_count("iris") == 12 * 25
    assert store.prediction_count("iris") == 12 * 25
    assert int(store.confusion("iris", [0, 1, 2]).sum()) == 12 * 25


def test_in_memory_sqlite_is_refused() -> None:
    with pytest.raises(ValueError, match="durable"):
        FeedbackStore("sqlite://")


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    s = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    finally:
        s.close()


def test_prune_deletes_in_batches_and_keeps_the_rest(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [(f"old{i}", 0) for i in range(25)] + [("new", 1)])
    with store.engine.begin() as conn:
        conn.execute(update(prediction_log).where(prediction_log.c.prediction_id.like("old%"))
                     .values(created_at=datetime.now(UTC) - timedelta(days=8)))
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_: statements.append(statement))
    assert store.prune_predictions(datetime.now(UTC) - timedelta(days=7), batch=10) == 25
    assert sum(s.startswith("DELETE") for s in statements) == 3  # 10 + 10 + 5, each its own transaction
    assert store.prediction_count("iris") == 1


def test_prune_removes_only_old_predictions(store: FeedbackStore) -> None:
    store.record_predictions("iris", "1", [("old", 0), ("new", 1)])
    store.add_feedback_by_ids("iris", [("old", 0)])
    with store.engine.begin() as conn:
        conn.execute(update(prediction_log).where(prediction_log.c.prediction_id == "old")
                     .values(created_at=datetime.now(UTC) - timedelta(days=8)))
    assert store.prune_predictions(datetime.now(UTC) - timedelta(days=7)) == 1
    assert store.prediction_count("iris") == 1
    assert store.feedback_count("iris") == 1  # feedback is never pruned
    store.add_feedback_by_ids("iris", [("new", 1)])
    assert store.record_predictions("iris", "1", []) == 0


def test_plain_postgresql_url_uses_psycopg(postgres_url: str) -> None:
    plain = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    s = FeedbackStore(plain)
    try:
        assert s.engine.dialect.driver == "psycopg"
        s.add_feedback("iris", [(1, 1)])
        assert s.feedback_count() == 1
    finally:
        s.close()
