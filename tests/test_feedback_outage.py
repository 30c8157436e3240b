"""The feedback store while its PostgreSQL is down, stalled or restarted (a real server, really stopped).

What must hold: constructing the store never connects (a server can start while the database is
down), calls fail with :class:`StoreUnavailable` instead of hanging, a down store does not even
try the network until its retry time, and the store recovers on its own once the database is back.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import event

from predictors.feedback import FeedbackStore
from predictors.feedback.store import StoreUnavailable
from tests.fixtures.ports import wait_for
from tests.fixtures.postgres import PostgresServer


@pytest.fixture
def down_url(stoppable_postgres: PostgresServer) -> Iterator[str]:
    """The URL of a database whose server has been stopped."""
    url = stoppable_postgres.create_database("feedback")
    stoppable_postgres.stop()
    yield url


def connect_attempts(store: FeedbackStore) -> list[int]:
    """A list that grows by one at every attempt the store makes to open a database connection."""
    attempts: list[int] = []
    event.listen(store.engine, "do_connect", lambda *_: attempts.append(1))
    return attempts


def test_store_starts_while_the_database_is_down_and_recovers(stoppable_postgres: PostgresServer,
                                                              down_url: str) -> None:
    store = FeedbackStore(down_url, retry_after_s=60)
    attempts = connect_attempts(store)
    assert attempts == []  # construction did not connect
    with pytest.raises(StoreUnavailable, match="unreachable") as exc:
        store.record_predictions("iris", "1", [("a", 0)])
    assert exc.value.status == 503 and exc.value.retry_after_s == 60
    health = store.health()
    assert not health.available and health.backend == "postgresql" and health.error
    tried = len(attempts)
    with pytest.raises(StoreUnavailable):  # inside the down period: refused without touching the network
        store.add_feedback("iris", [(0, 0)])
    assert store.check() == health
    assert len(attempts) == tried

    store.close()

    recovering = FeedbackStore(down_url, retry_after_s=0.5)
    with pytest.raises(StoreUnavailable):
        recovering.feedback_count()
    stoppable_postgres.start()
    wait_for(lambda: recovering.check().available, timeout=60, what="the store to notice the database is back")
    assert recovering.record_predictions("iris", "1", [("a", 0)]) == 1  # tables were created on first contact
    recovering.add_feedback_by_ids("iris", [("a", 0)])
    assert recovering.feedback_count("iris") == 1
    recovering.close()


def test_pooled_connections_survive_a_database_restart(stoppable_postgres: PostgresServer) -> None:
    store = FeedbackStore(stoppable_postgres.create_database("feedback"))
    store.record_predictions("iris", "1", [("before", 0)])
    stoppable_postgres.stop()
    stoppable_postgres.start()
    # every pooled connection died with the server; the pre-ping replaces them and the call succeeds
    assert store.record_predictions("iris", "1", [("after", 1)]) == 1
    assert store.prediction_count("iris") == 2 and store.health().available
    store.close()


def test_a_stalled_statement_times_out_instead_of_hanging(postgres_server: PostgresServer) -> None:
    store = FeedbackStore(postgres_server.create_database("stalled"), statement_timeout_s=1, retry_after_s=0.5)
    store.record_predictions("iris", "1", [("a", 0)])
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1s"
    with psycopg.connect(postgres_server.conninfo("stalled")) as holder:
        holder.execute("LOCK TABLE prediction_log IN ACCESS EXCLUSIVE MODE")  # the table stops answering
        with pytest.raises(StoreUnavailable, match="timeout"):
            store.record_predictions("iris", "1", [("b", 1)])
    wait_for(lambda: store.check().available, timeout=30, what="the store to recover")
    assert store.record_predictions("iris", "1", [("b", 1)]) == 1
    store.close()
