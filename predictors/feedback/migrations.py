"""Versioned schema migrations of the feedback database, SQLite and PostgreSQL alike.

Why our own small table rather than Alembic: the schema is three tables that the server creates
itself on first contact, every replica and ``--workers`` process may be the first, and the
migrations must run inside the same lock that already serialises that creation (a PostgreSQL
advisory lock, SQLite's write lock). A numbered list of idempotent steps and one row recording the
number reached does that with no new dependency and no separate deploy step.

``feedback_schema_version`` holds one row: the number of the last migration applied. A database
made before this table existed holds the baseline schema (version 1). Each step checks what it
changes (a column that is already there is not added again), so a step interrupted after its DDL
but before its version row, or a table created fresh by ``create_all`` in the newer shape, is
harmless. A database whose version is newer than this code knows is refused: an older server
would write rows the newer schema does not expect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Column, DateTime, Integer, MetaData, Table, inspect, select, text
from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

VERSION_TABLE = "feedback_schema_version"

_version_metadata = MetaData()
schema_version = Table(
    VERSION_TABLE,
    _version_metadata,
    Column("version", Integer, nullable=False),
    Column("applied_at", DateTime, nullable=False),
)


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer server than this one."""


def _columns(conn: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}


def _indexes(conn: Connection, table: str) -> set[str]:
    return {i["name"] for i in inspect(conn).get_indexes(table) if i.get("name")}


def _add_versions_and_sources(conn: Connection) -> None:
    """Feedback rows carry the model version they judge and where they came from (API or browser page).

    Existing rows named by prediction id take the version their prediction was logged with; rows of the
    Katonic form (no id) and ids already pruned from the log keep ``''`` (unknown). Existing rows came
    through the API as far as anyone can tell, so their source is ``api``. The server defaults also
    let a replica still running the previous code insert during a rolling upgrade.
    """
    columns = _columns(conn, "feedback")
    if "version" not in columns:
        conn.execute(text("ALTER TABLE feedback ADD COLUMN version VARCHAR(64) NOT NULL DEFAULT ''"))
        conn.execute(text(
            "UPDATE feedback SET version = (SELECT p.version FROM prediction_log p "
            "WHERE p.model = feedback.model AND p.prediction_id = feedback.prediction_id) "
            "WHERE prediction_id IS NOT NULL AND EXISTS (SELECT 1 FROM prediction_log p "
            "WHERE p.model = feedback.model AND p.prediction_id = feedback.prediction_id)"))
    if "source" not in columns:
        conn.execute(text("ALTER TABLE feedback ADD COLUMN source VARCHAR(16) NOT NULL DEFAULT 'api'"))
    if "ix_feedback_model_version" not in _indexes(conn, "feedback"):
        conn.execute(text("CREATE INDEX ix_feedback_model_version ON feedback (model, version)"))


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (2, "feedback.version and feedback.source", _add_versions_and_sources),
]
"""(version reached, description, step); version 1 is the schema before versioned migrations."""

LATEST = MIGRATIONS[-1][0]

_BASELINE_TABLES = frozenset({"prediction_log", "feedback", "feedback_submissions"})


def current_version(conn: Connection) -> int | None:
    """The schema version recorded in the database; None when it has no version table."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return None
    return conn.execute(select(schema_version.c.version).order_by(schema_version.c.version.desc())).scalar()


def _record(conn: Connection, version: int) -> None:
    conn.execute(schema_version.insert(), {"version": version, "applied_at": datetime.now(UTC).replace(tzinfo=None)})


def migrate(conn: Connection, metadata: MetaData) -> int:
    """Bring the database to :data:`LATEST` inside the caller's transaction (and lock); returns the version.

    An empty database gets ``metadata``'s tables in their current shape and the latest version. A
    database with tables but no version table is at version 1. Missing tables are created before the
    steps run, so each step sees every table it alters.
    """
    existing = set(inspect(conn).get_table_names())
    found = current_version(conn)
    if found is None:
        found = 1 if existing & _BASELINE_TABLES else 0
        _version_metadata.create_all(conn, checkfirst=True)
    if found > LATEST:
        raise SchemaTooNew(f"the feedback database's schema is at version {found}, newer than this server's "
                           f"{LATEST}; run a server at least as new as the one that migrated it")
    metadata.create_all(conn, checkfirst=True)
    if found == 0:
        _record(conn, LATEST)
        return LATEST
    for version, description, step in MIGRATIONS:
        if version <= found:
            continue
        log.warning("feedback database: migrating schema to version %d (%s)", version, description)
        step(conn)
        _record(conn, version)
        found = version
    return found
