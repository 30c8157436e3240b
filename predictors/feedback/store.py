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

Outages (why the store opens lazily): inference must not depend on the feedback database. The
constructor connects to nothing; the tables are created by the first call that reaches the
database. A call that cannot reach it (refused, connect timeout, statement timeout, a dead pooled
connection) raises :class:`StoreUnavailable` (503 / UNAVAILABLE with ``Retry-After``) and marks
the store *down*; for the next ``retry_after_s`` seconds every call fails at once without
touching the network, so an outage costs callers no waiting, and the first call after that tries
again. :meth:`FeedbackStore.health` reports the state. PostgreSQL connections carry a connect
timeout, a server-side ``statement_timeout`` and TCP keepalives; the pool pings a connection
before handing it out (``pool_pre_ping``), so connections broken by a database restart are
replaced instead of failing a request.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
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
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from predictors.feedback.migrations import migrate
from predictors.protocol.errors import BadInput, ClientError

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 256
"""Longest prediction id stored and accepted; longer ids are not logged (they could never be named)."""

SQLITE_BUSY_TIMEOUT_S = 60.0
"""How long a SQLite writer waits for the write lock before failing; long enough that it never does."""

CONNECT_TIMEOUT_S = 3.0
"""Default PostgreSQL connect timeout (the server passes ``KCP_FEEDBACK_DB_CONNECT_TIMEOUT_S``); libpq rounds
up to 2 s."""

STATEMENT_TIMEOUT_S = 10.0
"""Default PostgreSQL ``statement_timeout`` (the server passes ``KCP_FEEDBACK_DB_STATEMENT_TIMEOUT_S``)."""

RETRY_AFTER_S = 5.0
"""Default time a store stays *down* after a failed call (the server passes ``KCP_FEEDBACK_DB_RETRY_S``)."""

PRUNE_BATCH = 1000
"""Rows deleted per transaction by the retention prune: each write lock is held only briefly."""

MAX_SUBMISSION_ID_LENGTH = 128
"""Longest client ``submission_id`` accepted."""

SOURCE_API = "api"
SOURCE_UI = "ui"
SOURCES = (SOURCE_API, SOURCE_UI)
"""Where feedback may come from: a fixed set, so a report filter and a metric label stay bounded."""

_UNREACHABLE = (OperationalError, InterfaceError, PoolTimeout)
"""SQLAlchemy errors that mean "the database did not answer", not "the request was wrong"."""

_CHUNK = 500  # ids per IN (...) list: well under every driver's bound-parameter limit
_SCHEMA_LOCK_KEY = 0x6B6370_6662  # pg advisory lock id for concurrent CREATE TABLE by several replicas


class DuplicateFeedback(ClientError):
    """Feedback for these prediction ids was already recorded: 409 / ALREADY_EXISTS.

    Defined here rather than in :mod:`predictors.protocol.errors` because only the feedback store can
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


class SubmissionIdReused(ClientError):
    """A client ``submission_id`` already names a *different* submission: 409 / ALREADY_EXISTS."""

    status = HTTPStatus.CONFLICT
    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, model: str, submission_id: str) -> None:
        super().__init__(f"submission_id {submission_id!r} of model {model} was already used for a different "
                         "submission; resend exactly the same submission or use a new submission_id")


class StoreUnavailable(Exception):
    """The feedback database cannot be reached now: 503 / UNAVAILABLE, retry after ``retry_after_s``.

    Not a :class:`ClientError`: nothing about the request is wrong, and the server, not the
    client, is at fault. The feedback API answers it with ``Retry-After``.
    """

    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class StoreHealth:
    """The store's state as last observed: what the health route and the ``up`` gauge report."""

    backend: str
    available: bool
    since: datetime
    error: str | None = None
    retry_after_s: float | None = None


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
    Column("version", String(64), nullable=False, server_default=""),
    Column("source", String(16), nullable=False, server_default=SOURCE_API),
    UniqueConstraint("model", "prediction_id", name="uq_feedback_model_prediction_id"),
    Index("ix_feedback_model_created_at", "model", "created_at"),
    Index("ix_feedback_submission_id", "submission_id"),
    Index("ix_feedback_model_version", "model", "version"),
)
"""``version``: the model version whose prediction the row judges (the logged prediction's version for the
id form, the version the client names or the one served for the Katonic form; ``''`` where unknown, for
rows older than the column). ``source``: one of :data:`SOURCES`, so feedback typed on the browser page can be
told apart from production feedback. Both were added by migration 2 (:mod:`predictors.feedback.migrations`)."""

feedback_submissions = Table(
    "feedback_submissions",
    metadata,
    Column("model", String(63), primary_key=True),
    Column("client_submission_id", String(MAX_SUBMISSION_ID_LENGTH), primary_key=True),
    Column("submission_id", String(32), nullable=False),
    Column("created_at", _UTCDateTime, nullable=False),
)
"""Client ``submission_id`` -> the server's id of the submission it named (idempotent resends).

A table of its own because its primary key is what makes a resend race-free: of two concurrent
submissions with one client id, exactly one inserts its row; the other finds it.
"""


@dataclass(frozen=True)
class Submission:
    """One accepted feedback submission: its id and the (true, predicted) pairs it recorded.

    ``replayed`` is true when this is an earlier submission returned again for a resend with the
    same client ``submission_id`` (nothing was recorded this time). ``versions`` parallels ``pairs``:
    the model version each pair judges.
    """

    submission_id: str
    pairs: list[tuple[int, int]]
    created_at: datetime
    replayed: bool = False
    versions: list[str] = dataclass_field(default_factory=list)


@functools.lru_cache(maxsize=64)
def _log_insert_sql(rows: int, placeholder: str) -> str:
    """One multi-row ``INSERT … ON CONFLICT (model, prediction_id) DO NOTHING`` for ``rows`` predictions.

    One statement rather than ``executemany`` or ``RETURNING``: the driver releases the GIL around
    every statement step and every returned row, and while the event loop keeps the GIL busy each
    re-acquisition waits for a forced switch, so writing row by row cost the serving thread more
    than the write itself. The statement's row count is the number of rows logged (a conflict
    inserts nothing). Built as text because SQLAlchemy compiles a multi-row ``values()`` anew for
    every row count, which cost more than the insert.
    """
    row = "(" + ", ".join([placeholder] * 5) + ")"
    return (f"INSERT INTO {prediction_log.name} (model, version, prediction_id, predicted_label, created_at) "
            f"VALUES {', '.join([row] * rows)} ON CONFLICT (model, prediction_id) DO NOTHING")


def _now() -> datetime:
    return datetime.now(UTC)


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _first_line(exc: Exception) -> str:
    """``Type: first line of the message`` of the driver's error (SQLAlchemy's wrapper adds SQL and a URL).

    For the server's log only: the driver's text names hosts, ports, users and databases.
    """
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else 'no message'}"


_PUBLIC_CAUSES = (
    ("authentication", "authentication failed"),
    ("password", "authentication failed"),
    ("does not exist", "the database or role does not exist"),
    ("refused", "connection refused"),
    ("statement timeout", "statement timeout"),
    ("canceling statement", "statement timeout"),
    ("timeout", "timed out"),
    ("timed out", "timed out"),
    ("could not translate host", "host name not resolved"),
    ("name or service not known", "host name not resolved"),
    ("too many", "too many connections"),
    ("locked", "database is locked"),
    ("unable to open", "unable to open the database file"),
    ("disk i/o", "disk I/O error"),
    ("readonly", "read-only database"),
    ("closed the connection", "the server closed the connection"),
    ("terminating connection", "the server closed the connection"),
)


def _public_error(exc: Exception) -> str:
    """What a client may be told about an unreachable database: a category, never the driver's text.

    The driver's message carries the host name, port, user and database name; a 503 body or the store
    route must not hand those to every API client. The full text goes to the server's log.
    """
    if isinstance(exc, PoolTimeout):
        return "no free database connection (pool timeout)"
    cause = getattr(exc, "orig", None) or exc
    message = str(cause).lower()
    for needle, category in _PUBLIC_CAUSES:
        if needle in message:
            return category
    return type(cause).__name__


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise BadInput(f"source must be one of {list(SOURCES)}, got {source!r}")


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
    Tables are created by the first call that reaches the database (idempotent, safe when several
    replicas start at once); construction itself never connects, so it succeeds while the database
    is down. Timeouts not given take the module's defaults; the server passes its ``KCP_FEEDBACK_DB_*``
    settings (:class:`predictors.settings.ServerSettings`).
    """

    def __init__(self, url: str, *, connect_timeout_s: float | None = None,
                 statement_timeout_s: float | None = None, retry_after_s: float | None = None) -> None:
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                url = "postgresql+psycopg://" + url.removeprefix(plain)
        self.url = url
        self.connect_timeout_s = connect_timeout_s or CONNECT_TIMEOUT_S
        self.statement_timeout_s = statement_timeout_s or STATEMENT_TIMEOUT_S
        self.retry_after_s = retry_after_s or RETRY_AFTER_S
        self.engine: Engine = self._make_engine(url)
        self._is_sqlite = self.engine.dialect.name == "sqlite"
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._health = StoreHealth(self.engine.dialect.name, True, _now())
        self._down_until = 0.0  # time.monotonic() before which calls fail without trying
        # The prediction log's insert is SQL text run on the driver (see _log_insert_sql): its placeholder,
        # and the created_at value as SQLAlchemy's column type binds it on this dialect (on SQLite, text made
        # once per flush rather than by the driver's adapter once per row).
        self._placeholder = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        created_at_type = prediction_log.c.created_at.type.dialect_impl(self.engine.dialect)
        self._bind_created_at = created_at_type.bind_processor(self.engine.dialect)

    # --- set-up -----------------------------------------------------------------------------

    def _make_engine(self, url: str) -> Engine:
        if url.startswith("sqlite"):
            if url in ("sqlite://", "sqlite:///:memory:"):
                raise ValueError("an in-memory SQLite database is not durable; give a file: sqlite:///path.db")
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
                                   pool_size=8, max_overflow=8)
            _configure_sqlite(engine)
            return engine
        statement_ms = int(self.statement_timeout_s * 1000)
        connect_args = {
            "connect_timeout": max(2, round(self.connect_timeout_s)),
            "options": f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms}",
            # A peer that vanished (partition) is noticed by the kernel instead of never.
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "tcp_user_timeout": statement_ms,
        }
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8,
                             pool_timeout=self.statement_timeout_s, connect_args=connect_args)

    def _create_tables(self) -> None:
        """Create or migrate the schema (:mod:`predictors.feedback.migrations`).

        Several replicas (or ``--workers`` processes) starting together would race on CREATE TABLE and
        ALTER TABLE: PostgreSQL serialises them with an advisory lock, SQLite with the write lock taken
        up front, and the migration runs in that one transaction.
        """
        with self.engine.connect() as conn:
            if self._is_sqlite:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK_KEY})
                    # A migration's backfill of a large table may outlast the per-statement limit meant for
                    # requests; cut short, it would roll back and start over at every retry, forever.
                    conn.execute(text("SET LOCAL statement_timeout = 0"))
                migrate(conn, metadata)

    # --- availability -----------------------------------------------------------------------

    def health(self) -> StoreHealth:
        """The state as last observed by a call (no network): ``available`` false while down."""
        with self._state_lock:
            return self._health

    def check(self) -> StoreHealth:
        """Reach the database now (unless inside a down period) and return the resulting state."""
        with contextlib.suppress(StoreUnavailable), self._read() as conn:
            conn.execute(text("SELECT 1"))
        return self.health()

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[Any]:
        """Run a block that uses the database; turn "cannot reach it" into :class:`StoreUnavailable`.

        Yields ``self.engine.connect`` once the schema exists. Inside a down period it raises at
        once; a block that fails to reach the database starts a new down period.
        """
        with self._state_lock:
            wait = self._down_until - time.monotonic()
            health = self._health
        if wait > 0:
            raise StoreUnavailable(self._unavailable_reason(health.error), wait)
        try:
            if not self._schema_ready:
                with self._schema_lock:  # one creator: concurrent first calls would race on the schema (and WAL)
                    if not self._schema_ready:
                        self._create_tables()
                        self._schema_ready = True
            yield self.engine.connect
        except _UNREACHABLE as exc:
            error = _public_error(exc)
            with self._state_lock:
                self._down_until = time.monotonic() + self.retry_after_s
                if self._health.available:
                    log.error("feedback database unreachable (%s); retrying every %.0fs", _first_line(exc),
                              self.retry_after_s)
                    self._health = StoreHealth(self._health.backend, False, _now(), error, self.retry_after_s)
            raise StoreUnavailable(self._unavailable_reason(error), self.retry_after_s) from exc
        with self._state_lock:
            if not self._health.available:
                log.warning("feedback database reachable again")
                self._health = StoreHealth(self._health.backend, True, _now())

    def _unavailable_reason(self, error: str | None) -> str:
        return (f"the feedback database ({self.engine.dialect.name}) is unreachable"
                f"{f' ({error})' if error else ''}; predictions are served, feedback is not recorded "
                "now: retry later")

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
        with self._reachable() as connect, connect() as conn:
            if self._is_sqlite:
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for reads, under the same availability rules as writes."""
        with self._reachable() as connect, connect() as conn:
            yield conn

    # --- writes -----------------------------------------------------------------------------

    def record_predictions(self, model: str, version: str, rows: Sequence[tuple[str, int]]) -> int:
        """Log what the server predicted: ``rows`` of (prediction_id, predicted label).

        A logged prediction is never overwritten: an id already in the log (or twice in ``rows``)
        keeps its first answer and the later one is skipped with a warning. Feedback joined with an
        id must pair with the answer first given under it, and a client re-using an id must not
        change what another client's feedback is counted against. Ids longer than
        :data:`MAX_ID_LENGTH` are skipped (they could never be named in feedback). Returns the
        number of rows logged.
        """
        first: dict[str, int] = {}
        valid = 0
        for prediction_id, label in rows:
            if not prediction_id or len(prediction_id) > MAX_ID_LENGTH:
                log.warning("not logging prediction id of length %d for model %s", len(prediction_id), model)
                continue
            first.setdefault(prediction_id, int(label))
            valid += 1
        if not first:
            return 0
        now = _now()
        created_at = self._bind_created_at(now) if self._bind_created_at else now
        logged = 0
        with self._write() as conn:
            for ids in _chunks(list(first)):  # 5 parameters a row: 500 rows stay far below every driver's limit
                params = tuple(p for pid in ids for p in (model, version, pid, first[pid], created_at))
                logged += conn.exec_driver_sql(_log_insert_sql(len(ids), self._placeholder), params).rowcount
        if logged < valid:
            log.warning("model %s: %d of %d prediction ids were already logged or repeated; kept their first answer",
                        model, valid - logged, valid)
        return logged

    def add_feedback(self, model: str, pairs: Sequence[tuple[int, int]],
                     submission_id: str | None = None, *, version: str = "",
                     source: str = SOURCE_API) -> Submission:
        """Record (true label, predicted label) pairs of the Katonic form, atomically.

        Label validity is the caller's business (the API checks them against labels_file.json).
        ``submission_id`` (the client's) makes a resend idempotent, see :meth:`_submit`. ``version`` is
        the model version that made the predictions (the client knows it from the response's
        ``model_version``; the API defaults it to the version served now).
        """
        if not pairs:
            raise BadInput("a feedback submission needs at least one label")
        _check_source(source)
        clean = [(int(t), int(p)) for t, p in pairs]

        def record(conn: Connection) -> Submission:
            submission = Submission(uuid.uuid4().hex, clean, _now(), versions=[version] * len(clean))
            conn.execute(feedback.insert(), [
                {"model": model, "submission_id": submission.submission_id, "prediction_id": None,
                 "true_label": t, "predicted_label": p, "created_at": submission.created_at,
                 "version": version, "source": source} for t, p in clean])
            return submission

        return self._submit(model, submission_id, [(None, t, p) for t, p in clean], record)

    def add_feedback_by_ids(
        self,
        model: str,
        items: Sequence[tuple[str, int]],
        allowed_predicted: Collection[int] | None = None,
        submission_id: str | None = None,
        *,
        source: str = SOURCE_API,
    ) -> Submission:
        """Record (prediction_id, true label) items, joining each id with the logged prediction.

        All in one transaction: ids missing from the log raise :class:`UnknownPredictions`, ids that
        already have feedback (before or concurrently) raise :class:`DuplicateFeedback`, an id given
        twice raises :class:`BadInput`, and a logged predicted label outside ``allowed_predicted``
        (a model since replaced by one with fewer classes) raises :class:`BadInput`; in every case
        nothing is recorded. A resend with the same ``submission_id`` returns the first answer
        instead of a :class:`DuplicateFeedback`, see :meth:`_submit`. Each row takes the version its
        prediction was logged with, so feedback arriving after a model swap is counted against the
        version that really answered.
        """
        if not items:
            raise BadInput("a feedback submission needs at least one item")
        _check_source(source)
        ids = [pid for pid, _ in items]
        repeated = _duplicates(ids)
        if repeated:
            raise BadInput(f"prediction ids given more than once in one submission: {repeated[:20]}")

        def record(conn: Connection) -> Submission:
            predicted = self._logged_predictions(conn, model, ids)
            unknown = [pid for pid in ids if pid not in predicted]
            if unknown:
                raise UnknownPredictions(model, unknown)
            if allowed_predicted is not None:
                stray = sorted({p for p, _ in predicted.values() if p not in allowed_predicted})
                if stray:
                    raise BadInput(f"the logged predictions name labels {stray} that are no longer in "
                                   f"labels_file.json of model {model}")
            already = self._ids_with_feedback(conn, model, ids)
            if already:
                raise DuplicateFeedback(model, already)
            submission = Submission(uuid.uuid4().hex, [(int(t), predicted[pid][0]) for pid, t in items], _now(),
                                    versions=[predicted[pid][1] for pid, _ in items])
            conn.execute(feedback.insert(), [
                {"model": model, "submission_id": submission.submission_id, "prediction_id": pid,
                 "true_label": int(t), "predicted_label": predicted[pid][0], "created_at": submission.created_at,
                 "version": predicted[pid][1], "source": source}
                for pid, t in items])
            return submission

        def duplicate(conn: Connection) -> ClientError:
            # Another transaction recorded one of these ids between our check and our insert
            # (possible on PostgreSQL's READ COMMITTED; SQLite's write lock excludes it).
            return DuplicateFeedback(model, self._ids_with_feedback(conn, model, ids))

        return self._submit(model, submission_id, [(pid, int(t), None) for pid, t in items], record, duplicate)

    def _submit(
        self,
        model: str,
        client_id: str | None,
        rows: list[tuple[str | None, int, int | None]],
        record: Callable[[Connection], Submission],
        on_conflict: Callable[[Connection], ClientError] | None = None,
    ) -> Submission:
        """Run ``record`` in one write transaction, idempotently when the client named the submission.

        With a ``client_id`` the first submission under it is remembered in ``feedback_submissions``
        in the same transaction; a later one whose ``rows`` (prediction id, true label, predicted
        label; None where the form does not give it) are the same gets the first submission back
        with ``replayed`` set and records nothing; different rows raise :class:`SubmissionIdReused`.
        A concurrent twin (a constraint violation, or a duplicate seen by ``record``) is resolved the
        same way after the rollback; other constraint violations by ``on_conflict``.
        """
        if client_id is not None and not 0 < len(client_id) <= MAX_SUBMISSION_ID_LENGTH:
            raise BadInput(f"submission_id must have 1 to {MAX_SUBMISSION_ID_LENGTH} characters")
        try:
            with self._write() as conn:
                earlier = self._earlier(conn, model, client_id, rows)
                if earlier is not None:
                    return earlier
                submission = record(conn)
                if client_id is not None:
                    conn.execute(feedback_submissions.insert(), {
                        "model": model, "client_submission_id": client_id,
                        "submission_id": submission.submission_id, "created_at": submission.created_at})
            return submission
        except (IntegrityError, DuplicateFeedback) as exc:
            # On PostgreSQL a concurrent twin may commit after our look-up: its rows then collide
            # with ours (IntegrityError) or are seen by our duplicate check. Look again.
            with self._read() as conn:
                earlier = self._earlier(conn, model, client_id, rows)
                if earlier is not None:
                    return earlier
                if isinstance(exc, IntegrityError) and on_conflict is not None:
                    raise on_conflict(conn) from exc
            raise

    @staticmethod
    def _earlier(conn: Connection, model: str, client_id: str | None,
                 rows: list[tuple[str | None, int, int | None]]) -> Submission | None:
        """The submission recorded earlier under ``client_id``, if any; it must have the same ``rows``."""
        if client_id is None:
            return None
        found = conn.execute(select(feedback_submissions.c.submission_id, feedback_submissions.c.created_at).where(
            feedback_submissions.c.model == model,
            feedback_submissions.c.client_submission_id == client_id)).first()
        if found is None:
            return None
        stored = conn.execute(
            select(feedback.c.prediction_id, feedback.c.true_label, feedback.c.predicted_label, feedback.c.version)
            .where(feedback.c.model == model, feedback.c.submission_id == found.submission_id)
            .order_by(feedback.c.id)).all()
        same = len(stored) == len(rows) and all(
            pid == want_pid and true == want_true and (want_pred is None or pred == want_pred)
            for (pid, true, pred, _), (want_pid, want_true, want_pred) in zip(stored, rows, strict=True))
        if not same:
            raise SubmissionIdReused(model, client_id)
        return Submission(found.submission_id, [(int(t), int(p)) for _, t, p, _ in stored], found.created_at,
                          replayed=True, versions=[v for *_, v in stored])

    @staticmethod
    def _logged_predictions(conn: Connection, model: str, ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """prediction id -> (predicted label, model version) of the ids the log holds."""
        found: dict[str, tuple[int, str]] = {}
        for chunk in _chunks(ids):
            log_ = prediction_log.c
            q = select(log_.prediction_id, log_.predicted_label, log_.version).where(
                log_.model == model, log_.prediction_id.in_(chunk))
            found.update({pid: (int(label), version) for pid, label, version in conn.execute(q)})
        return found

    @staticmethod
    def _ids_with_feedback(conn: Connection, model: str, ids: Sequence[str]) -> list[str]:
        done: set[str] = set()
        for chunk in _chunks(ids):
            q = select(feedback.c.prediction_id).where(feedback.c.model == model, feedback.c.prediction_id.in_(chunk))
            done.update(pid for (pid,) in conn.execute(q))
        return [pid for pid in ids if pid in done]

    def prune_predictions(self, older_than: datetime, batch: int = PRUNE_BATCH) -> int:
        """Delete logged predictions made before ``older_than``; returns how many.

        The log grows with every inference; feedback can only name ids still in it, so the
        retention (e.g. a week) is the longest delay after which ground truth can be joined.
        Feedback rows are never pruned: they are the metrics. Deleted in transactions of at most
        ``batch`` rows, so the write lock (SQLite) or row locks are held only briefly and the
        prediction log keeps committing in between.
        """
        oldest = (select(prediction_log.c.id).where(prediction_log.c.created_at < older_than)
                  .order_by(prediction_log.c.created_at).limit(batch).scalar_subquery())
        removed = 0
        while True:
            with self._write() as conn:
                n = int(conn.execute(prediction_log.delete().where(prediction_log.c.id.in_(oldest))).rowcount)
            removed += n
            if n < batch:
                return removed

    # --- reads ------------------------------------------------------------------------------

    def confusion(self, model: str, labels: Sequence[int], since: datetime | None = None, *,
                  version: str | None = None, sources: Collection[str] | None = None) -> np.ndarray:
        """The KxK confusion matrix (rows: true label, columns: predicted) over exactly ``labels``.

        Counted in SQL (``GROUP BY true_label, predicted_label``), so the cost does not grow with
        the number of feedback rows shipped to Python. Rows whose labels are not in ``labels``
        are left out. ``since`` (aware datetime) keeps only feedback recorded at or after it,
        ``version`` only feedback on that model version, ``sources`` only feedback from those sources.
        """
        index = {int(label): i for i, label in enumerate(labels)}
        matrix = np.zeros((len(index), len(index)), dtype=np.int64)
        q = _filtered(select(feedback.c.true_label, feedback.c.predicted_label, func.count()),
                      model, index, since, version, sources).group_by(feedback.c.true_label, feedback.c.predicted_label)
        with self._read() as conn:
            for true, predicted, n in conn.execute(q):
                matrix[index[int(true)], index[int(predicted)]] = int(n)
        return matrix

    def confusion_by_version(self, model: str, labels: Sequence[int], since: datetime | None = None, *,
                             sources: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """One confusion matrix per model version with feedback, oldest version first.

        "Oldest" is by the first feedback recorded for the version, which is the order versions were
        served in; version strings themselves need not sort. One ``GROUP BY`` query for all versions.
        """
        index = {int(label): i for i, label in enumerate(labels)}
        q = _filtered(select(feedback.c.version, feedback.c.true_label, feedback.c.predicted_label, func.count(),
                             func.min(feedback.c.created_at)),
                      model, index, since, None, sources).group_by(
            feedback.c.version, feedback.c.true_label, feedback.c.predicted_label)
        matrices: dict[str, np.ndarray] = {}
        first: dict[str, datetime] = {}
        with self._read() as conn:
            for version, true, predicted, n, earliest in conn.execute(q):
                matrix = matrices.setdefault(version, np.zeros((len(index), len(index)), dtype=np.int64))
                matrix[index[int(true)], index[int(predicted)]] = int(n)
                earliest = _as_utc(earliest)
                if version not in first or earliest < first[version]:
                    first[version] = earliest
        return {v: matrices[v] for v in sorted(matrices, key=lambda v: (first[v], v))}

    def latest_logged_version(self, model: str) -> str | None:
        """The version of the model's most recently logged prediction; None when the log holds none."""
        q = (select(prediction_log.c.version).where(prediction_log.c.model == model)
             .order_by(prediction_log.c.id.desc()).limit(1))
        with self._read() as conn:
            return conn.execute(q).scalar()

    def feedback_count(self, model: str | None = None) -> int:
        """Number of feedback rows (all models, or one): what the tests use to check "nothing recorded"."""
        q = select(func.count()).select_from(feedback)
        if model is not None:
            q = q.where(feedback.c.model == model)
        with self._read() as conn:
            return int(conn.execute(q).scalar_one())

    def prediction_count(self, model: str | None = None) -> int:
        """Number of logged predictions (all models, or one)."""
        q = select(func.count()).select_from(prediction_log)
        if model is not None:
            q = q.where(prediction_log.c.model == model)
        with self._read() as conn:
            return int(conn.execute(q).scalar_one())


def _as_utc(value: datetime | str) -> datetime:
    """An aggregate's timestamp (``min(created_at)`` loses the column type on SQLite: a string there)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _filtered(q: Any, model: str, index: dict[int, int], since: datetime | None, version: str | None,
              sources: Collection[str] | None) -> Any:
    """``q`` restricted to the feedback rows a report counts (see :meth:`FeedbackStore.confusion`)."""
    q = q.where(feedback.c.model == model, feedback.c.true_label.in_(list(index)),
                feedback.c.predicted_label.in_(list(index)))
    if since is not None:
        q = q.where(feedback.c.created_at >= since)
    if version is not None:
        q = q.where(feedback.c.version == version)
    if sources is not None:
        q = q.where(feedback.c.source.in_(list(sources)))
    return q


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
            _enable_wal(cur)
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _enable_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, retried while the database is locked.

    Processes opening a new database together (``--workers``) race to switch it to WAL; a
    connection that loses may get "database is locked" at once, busy timeout or not (SQLite
    does not wait where waiting could deadlock), so it tries again within the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
