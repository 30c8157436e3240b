"""Durable storage of the prediction log and of ground-truth feedback (SQLAlchemy 2 Core).

Why a SQL database: feedback arrives long after the prediction, from many clients and (in a
cluster) at many replicas, and must survive restarts and be counted exactly once. One SQL
database gives all three: SQLite (a file, the default for one replica) or PostgreSQL (the Helm
chart's choice when several replicas share the numbers).

Two tables:

``prediction_log``
    What the server answered: (model, prediction_id) -> predicted label, written by the server
    after each inference through :meth:`FeedbackStore.record_predictions`. Feedback that names a
    prediction id is joined against it, so the confusion matrix holds what the server *really*
    predicted, not what a client claims it predicted.
``feedback``
    One row per ground-truth label: (model, true label, predicted label, time, submission id) and
    the prediction id when it came through the id path. ``UNIQUE (model, prediction_id)`` makes the
    database itself the arbiter of "counted exactly once": two concurrent submissions naming the
    same prediction cannot both commit. (SQL treats NULLs as distinct, so rows of the Katonic
    form, which carry no id, are unaffected.)

Duplicate policy (decided here, documented in the README, "Feedback"): a submission naming a prediction
id that already has feedback is rejected as a whole with :class:`DuplicateFeedback` (HTTP 409)
naming the ids; nothing of it is recorded. A submission naming an id the log does not hold is
rejected with :class:`UnknownPredictions` (HTTP 400) naming the ids. Every write method runs in
one transaction: all of a submission or none of it.

The methods are synchronous and may block (disk, network, lock waits): the async server calls
them through a thread executor, never on the event loop. One ``FeedbackStore`` is safe to share
between threads; its connection pool hands each thread its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import grpc
import numpy as np
from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from predictors.errors import BadInput, ClientError

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 256
"""Longest prediction id stored and accepted; longer ids are not logged (they could never be named)."""

SQLITE_BUSY_TIMEOUT_S = 60.0
"""How long a SQLite writer waits for the write lock before failing; long enough that it never does."""

_CHUNK = 500  # ids per IN (...) list: well under every driver's bound-parameter limit
_SCHEMA_LOCK_KEY = 0x6B6370_6662  # pg advisory lock id for concurrent CREATE TABLE by several replicas


class DuplicateFeedback(ClientError):
    """Feedback for these prediction ids was already recorded: 409 / ALREADY_EXISTS.

    Defined here rather than in :mod:`predictors.errors` because only the feedback store can
    cause it; it is a :class:`ClientError`, so the one mapping to HTTP/gRPC applies.
    """

    status = HTTPStatus.CONFLICT
    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, model: str, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:20]) or "(one of the ids, recorded concurrently)"
        more = f" and {len(self.ids) - 20} more" if len(self.ids) > 20 else ""
        super().__init__(
            f"feedback for prediction ids {shown}{more} of model {model} was already recorded; "
            "each prediction is counted once, nothing of this submission was recorded")


class UnknownPredictions(BadInput):
    """Feedback names prediction ids that the prediction log does not hold: 400."""

    def __init__(self, model: str, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        shown = ", ".join(repr(i) for i in self.ids[:20])
        more = f" and {len(self.ids) - 20} more" if len(self.ids) > 20 else ""
        super().__init__(f"unknown prediction ids for model {model}: {shown}{more}; "
                         "ids must be response ids of earlier predictions of this model")


class _UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as naive UTC and returned as aware UTC, identically on SQLite and PostgreSQL.

    SQLite has no time-zone type; storing UTC everywhere keeps window queries (``created_at >= since``)
    comparing like with like whatever the backend.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("timestamps must be time-zone aware")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


metadata = MetaData()

prediction_log = Table(
    "prediction_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(63), nullable=False),
    Column("version", String(64), nullable=False),
    Column("prediction_id", String(MAX_ID_LENGTH), nullable=False),
    Column("predicted_label", Integer, nullable=False),
    Column("created_at", _UTCDateTime, nullable=False),
    UniqueConstraint("model", "prediction_id", name="uq_prediction_log_model_prediction_id"),
    Index("ix_prediction_log_created_at", "created_at"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(63), nullable=False),
    Column("submission_id", String(32), nullable=False),
    Column("prediction_id", String(MAX_ID_LENGTH), nullable=True),
    Column("true_label", Integer, nullable=False),
    Column("predicted_label", Integer, nullable=False),
    Column("created_at", _UTCDateTime, nullable=False),
    UniqueConstraint("model", "prediction_id", name="uq_feedback_model_prediction_id"),
    Index("ix_feedback_model_created_at", "model", "created_at"),
)


@dataclass(frozen=True)
class Submission:
    """One accepted feedback submission: its id and the (true, predicted) pairs it recorded."""

    submission_id: str
    pairs: list[tuple[int, int]]
    created_at: datetime


def _now() -> datetime:
    return datetime.now(UTC)


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _duplicates(ids: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    dups: dict[str, None] = {}
    for i in ids:
        if i in seen:
            dups[i] = None
        seen.add(i)
    return list(dups)


class FeedbackStore:
    """The prediction log and feedback tables behind one SQLAlchemy engine.

    ``url`` is a SQLAlchemy URL: ``sqlite:///path/feedback.db`` or
    ``postgresql+psycopg://user:pw@host:port/db`` (a plain ``postgresql://`` or ``postgres://``
    URL, as many operators and secrets spell it, means the same: psycopg 3 is the driver installed).
    Tables are created on construction if missing (idempotent, safe when several replicas start at once).
    """

    def __init__(self, url: str) -> None:
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                url = "postgresql+psycopg://" + url.removeprefix(plain)
        self.url = url
        self.engine: Engine = self._make_engine(url)
        self._is_sqlite = self.engine.dialect.name == "sqlite"
        self._create_tables()
        # Built once: constructing the upsert per call was half of the log's CPU per request.
        self._log_upsert = self._prediction_log_upsert()

    # --- set-up -----------------------------------------------------------------------------

    @staticmethod
    def _make_engine(url: str) -> Engine:
        if url.startswith("sqlite"):
            if url in ("sqlite://", "sqlite:///:memory:"):
                raise ValueError("an in-memory SQLite database is not durable; give a file: sqlite:///path.db")
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                                   pool_size=8, max_overflow=8)
            _configure_sqlite(engine)
            return engine
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)

    def _create_tables(self) -> None:
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Several replicas starting together would race on CREATE TABLE's catalog rows.
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
            metadata.create_all(conn, checkfirst=True)

    def close(self) -> None:
        """Close all pooled connections. The store must not be used afterwards."""
        self.engine.dispose()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A connection in a transaction that may write; commits on success, rolls back on error.

        On SQLite it takes the write lock up front (``BEGIN IMMEDIATE``): a deferred transaction
        that reads and then writes fails at once with SQLITE_BUSY when another writer committed in
        between, however long the busy timeout; taking the lock first makes writers queue instead.
        """
        with self.engine.connect() as conn:
            if self._is_sqlite:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    # --- writes -----------------------------------------------------------------------------

    def record_predictions(self, model: str, version: str, rows: Sequence[tuple[str, int]]) -> int:
        """Log what the server predicted: ``rows`` of (prediction_id, predicted label).

        A prediction id that is logged again (a client re-using a request id) is overwritten: the
        log holds the latest answer given under that id, the one the client saw last. Ids longer
        than :data:`MAX_ID_LENGTH` are skipped (they could never be named in feedback). Returns the
        number of rows logged.
        """
        latest: dict[str, int] = {}
        for prediction_id, label in rows:
            if not prediction_id or len(prediction_id) > MAX_ID_LENGTH:
                log.warning("not logging prediction id of length %d for model %s", len(prediction_id), model)
                continue
            latest[prediction_id] = int(label)
        if not latest:
            return 0
        now = _now()
        values = [{"model": model, "version": version, "prediction_id": pid, "predicted_label": label,
                   "created_at": now} for pid, label in latest.items()]
        with self._write() as conn:
            conn.execute(self._log_upsert, values)
        return len(values)

    def _prediction_log_upsert(self) -> Any:
        """INSERT ... ON CONFLICT (model, prediction_id) DO UPDATE: a re-used id keeps the latest answer."""
        insert = sqlite.insert if self._is_sqlite else postgresql.insert
        stmt = insert(prediction_log)
        return stmt.on_conflict_do_update(
            index_elements=[prediction_log.c.model, prediction_log.c.prediction_id],
            set_={"version": stmt.excluded.version, "predicted_label": stmt.excluded.predicted_label,
                  "created_at": stmt.excluded.created_at},
        )

    def add_feedback(self, model: str, pairs: Sequence[tuple[int, int]]) -> Submission:
        """Record (true label, predicted label) pairs of the Katonic form, atomically.

        Label validity is the caller's business (the API checks them against labels_file.json).
        """
        if not pairs:
            raise BadInput("a feedback submission needs at least one label")
        clean = [(int(t), int(p)) for t, p in pairs]
        submission = Submission(uuid.uuid4().hex, clean, _now())
        rows = [{"model": model, "submission_id": submission.submission_id, "prediction_id": None,
                 "true_label": t, "predicted_label": p, "created_at": submission.created_at} for t, p in clean]
        with self._write() as conn:
            conn.execute(feedback.insert(), rows)
        return submission

    def add_feedback_by_ids(
        self,
        model: str,
        items: Sequence[tuple[str, int]],
        allowed_predicted: Collection[int] | None = None,
    ) -> Submission:
        """Record (prediction_id, true label) items, joining each id with the logged prediction.

        All in one transaction: ids missing from the log raise :class:`UnknownPredictions`, ids that
        already have feedback (before or concurrently) raise :class:`DuplicateFeedback`, an id given
        twice raises :class:`BadInput`, and a logged predicted label outside ``allowed_predicted``
        (a model since replaced by one with fewer classes) raises :class:`BadInput`; in every case
        nothing is recorded.
        """
        if not items:
            raise BadInput("a feedback submission needs at least one item")
        ids = [pid for pid, _ in items]
        repeated = _duplicates(ids)
        if repeated:
            raise BadInput(f"prediction ids given more than once in one submission: {repeated[:20]}")
        try:
            with self._write() as conn:
                predicted = self._logged_predictions(conn, model, ids)
                unknown = [pid for pid in ids if pid not in predicted]
                if unknown:
                    raise UnknownPredictions(model, unknown)
                if allowed_predicted is not None:
                    stray = sorted({p for p in predicted.values() if p not in allowed_predicted})
                    if stray:
                        raise BadInput(f"the logged predictions name labels {stray} that are no longer in "
                                       f"labels_file.json of model {model}")
                already = self._ids_with_feedback(conn, model, ids)
                if already:
                    raise DuplicateFeedback(model, already)
                submission = Submission(uuid.uuid4().hex, [(int(t), predicted[pid]) for pid, t in items], _now())
                conn.execute(feedback.insert(), [
                    {"model": model, "submission_id": submission.submission_id, "prediction_id": pid,
                     "true_label": int(t), "predicted_label": predicted[pid], "created_at": submission.created_at}
                    for pid, t in items])
        except IntegrityError as exc:
            # Another transaction recorded one of these ids between our check and our insert
            # (possible on PostgreSQL's READ COMMITTED; SQLite's write lock excludes it). Ours was
            # rolled back; name the ids that the other one recorded.
            with self.engine.connect() as conn:
                raise DuplicateFeedback(model, self._ids_with_feedback(conn, model, ids)) from exc
        return submission

    @staticmethod
    def _logged_predictions(conn: Connection, model: str, ids: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(ids):
            q = select(prediction_log.c.prediction_id, prediction_log.c.predicted_label).where(
                prediction_log.c.model == model, prediction_log.c.prediction_id.in_(chunk))
            found.update({pid: int(label) for pid, label in conn.execute(q)})
        return found

    @staticmethod
    def _ids_with_feedback(conn: Connection, model: str, ids: Sequence[str]) -> list[str]:
        done: set[str] = set()
        for chunk in _chunks(ids):
            q = select(feedback.c.prediction_id).where(feedback.c.model == model, feedback.c.prediction_id.in_(chunk))
            done.update(pid for (pid,) in conn.execute(q))
        return [pid for pid in ids if pid in done]

    def prune_predictions(self, older_than: datetime) -> int:
        """Delete logged predictions made before ``older_than``; returns how many.

        The log grows with every inference; feedback can only name ids still in it, so the
        retention (e.g. a week) is the longest delay after which ground truth can be joined.
        Feedback rows are never pruned: they are the metrics.
        """
        with self._write() as conn:
            result = conn.execute(prediction_log.delete().where(prediction_log.c.created_at < older_than))
        return int(result.rowcount)

    # --- reads ------------------------------------------------------------------------------

    def confusion(self, model: str, labels: Sequence[int], since: datetime | None = None) -> np.ndarray:
        """The KxK confusion matrix (rows: true label, columns: predicted) over exactly ``labels``.

        Counted in SQL (``GROUP BY true_label, predicted_label``), so the cost does not grow with
        the number of feedback rows shipped to Python. Rows whose labels are not in ``labels``
        are left out. ``since`` (aware datetime) keeps only feedback recorded at or after it.
        """
        index = {int(label): i for i, label in enumerate(labels)}
        matrix = np.zeros((len(index), len(index)), dtype=np.int64)
        q = (select(feedback.c.true_label, feedback.c.predicted_label, func.count())
             .where(feedback.c.model == model,
                    feedback.c.true_label.in_(list(index)), feedback.c.predicted_label.in_(list(index)))
             .group_by(feedback.c.true_label, feedback.c.predicted_label))
        if since is not None:
            q = q.where(feedback.c.created_at >= since)
        with self.engine.connect() as conn:
            for true, predicted, n in conn.execute(q):
                matrix[index[int(true)], index[int(predicted)]] = int(n)
        return matrix

    def feedback_count(self, model: str | None = None) -> int:
        """Number of feedback rows (all models, or one): what the tests use to check "nothing recorded"."""
        q = select(func.count()).select_from(feedback)
        if model is not None:
            q = q.where(feedback.c.model == model)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def prediction_count(self, model: str | None = None) -> int:
        """Number of logged predictions (all models, or one)."""
        q = select(func.count()).select_from(prediction_log)
        if model is not None:
            q = q.where(prediction_log.c.model == model)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())


def _configure_sqlite(engine: Engine) -> None:
    """WAL (readers never wait for the writer), a busy timeout, and SQLAlchemy-controlled BEGIN.

    The sqlite3 module's own transaction handling cannot emit ``BEGIN IMMEDIATE``; turning it off
    (``isolation_level = None``) and emitting BEGIN from the ``begin`` event lets :meth:`FeedbackStore._write`
    choose it, per the SQLAlchemy documentation's recipe.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
