"""The model server through a real PostgreSQL outage, end to end (issue 14, "Test it for real").

Everything is a real process: ``python -m predictors serve`` with its feedback database on a
PostgreSQL cluster of the test's own, which the test stops (``pg_ctl stop``) and starts again while
client threads keep sending predictions over REST and gRPC. What must hold: no prediction fails,
readiness stays 200, feedback by id is refused with 503 + ``Retry-After`` while the database is
down, the store's health route and metrics show it down and then up, feedback for predictions made
*during* the outage is accepted once the buffered prediction log has caught up, and every
prediction id the server answered is in PostgreSQL after a SIGTERM (no acknowledged row lost,
none logged twice).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.ports import wait_for
from tests.fixtures.postgres import PostgresServer
from tests.fixtures.server import ServerHandle, start_model_server
from tests.support.v2 import RawV2Stub, output, raw_stub, tensor

SETOSA = [5.1, 3.5, 1.4, 0.2]
DATABASE = "feedback"
RETRY_S = 1  # the store's down period: short, so the test sees the database come back within seconds


@dataclass(frozen=True)
class Answer:
    """One prediction as a client saw it: when it was sent, whether it worked, the ids it was given."""

    protocol: str
    sent: float  # time.monotonic()
    ok: bool
    detail: str
    prediction_ids: tuple[str, ...] = ()


@dataclass
class Load:
    """Client threads sending predictions (and readiness probes) until :meth:`stop`."""

    server: ServerHandle
    answers: list[Answer] = field(default_factory=list)
    readiness: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self, rest_clients: int = 2) -> Load:
        targets: list[Callable[[], None]] = [self._rest] * rest_clients + [self._grpc, self._ready]
        self.threads = [threading.Thread(target=t, daemon=True) for t in targets]
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a client thread hangs"

    def made_between(self, start: float, end: float) -> list[str]:
        """Prediction ids of requests sent in [start, end)."""
        return [pid for a in list(self.answers) if start <= a.sent < end for pid in a.prediction_ids]

    def _rest(self) -> None:
        with self.server.client() as c:
            n = 0
            while not self.done.is_set():
                n += 1
                rows = [SETOSA] * (1 + n % 3)  # single-row and batch prediction ids alike
                sent = time.monotonic()
                try:
                    r = c.post("/v2/models/iris/infer", json={"inputs": [tensor("input-0", rows, "FP32")]})
                except httpx.HTTPError as exc:
                    self.answers.append(Answer("rest", sent, False, repr(exc)))
                    continue
                ids = tuple(str(i) for i in output(r.json(), "prediction_id")) if r.status_code == 200 else ()
                self.answers.append(Answer("rest", sent, r.status_code == 200, f"{r.status_code} {r.text[:200]}", ids))

    def _grpc(self) -> None:
        with grpc.insecure_channel(self.server.grpc_target) as channel:
            stub = raw_stub(channel)
            request = grpc_request(stub)
            while not self.done.is_set():
                sent = time.monotonic()
                try:
                    response = stub.ModelInfer(request, timeout=30)
                except grpc.RpcError as exc:
                    self.answers.append(Answer("grpc", sent, False, f"{exc.code()} {exc.details()}"))
                    continue
                self.answers.append(Answer("grpc", sent, True, "OK", grpc_prediction_ids(response)))

    def _ready(self) -> None:
        with self.server.client() as c:
            while not self.done.is_set():
                self.readiness.append(c.get("/v2/health/ready").status_code)
                self.done.wait(0.05)


def grpc_request(stub: RawV2Stub) -> Any:
    """A one-row iris ModelInferRequest."""
    request_cls = stub.messages["ModelInferRequest"]
    return request_cls(model_name="iris", inputs=[request_cls.InferInputTensor(
        name="input-0", datatype="FP32", shape=[1, 4],
        contents=stub.messages["InferTensorContents"](fp32_contents=SETOSA))])


def grpc_prediction_ids(response: Any) -> tuple[str, ...]:
    """The ``prediction_id`` output (BYTES) of a gRPC response, typed or in raw_output_contents."""
    for i, out in enumerate(response.outputs):
        if out.name != "prediction_id":
            continue
        if not response.raw_output_contents:
            return tuple(b.decode() for b in out.contents.bytes_contents)
        raw, ids, offset = response.raw_output_contents[i], [], 0
        while offset < len(raw):  # V2 binary BYTES: 4-byte little-endian length, then the bytes
            n = int.from_bytes(raw[offset:offset + 4], "little")
            ids.append(raw[offset + 4:offset + 4 + n].decode())
            offset += 4 + n
        return tuple(ids)
    raise AssertionError(f"no prediction_id output in {[o.name for o in response.outputs]}")


def metric(c: httpx.Client, name: str) -> float:
    """The value of an unlabelled sample of the server's /metrics."""
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    raise AssertionError(f"no sample {name} in /metrics")


def predict(c: httpx.Client) -> str:
    r = c.post("/v2/models/iris/infer", json={"inputs": [tensor("input-0", [SETOSA], "FP32")]})
    assert r.status_code == 200, r.text
    return str(output(r.json(), "prediction_id")[0])


def feedback(c: httpx.Client, ids: list[str]) -> httpx.Response:
    return c.post("/v2/models/iris/feedback", json={"items": [{"id": i, "true_label": 0} for i in ids]})


def assert_refused_while_down(c: httpx.Client, prediction_id: str) -> None:
    """Feedback by id: 503 with a reason and Retry-After; the store's health route and gauge say down."""
    refused = feedback(c, [prediction_id])
    assert refused.status_code == 503, refused.text
    assert "unreachable" in refused.json()["error"] and int(refused.headers["retry-after"]) >= 1
    store = c.get("/v2/feedback/store")
    assert store.status_code == 503 and store.json()["available"] is False and store.json()["error"]
    assert metric(c, "classifier_feedback_store_up") == 0


def accepted_once_back(c: httpx.Client, ids: list[str]) -> httpx.Response:
    """Feedback for ``ids``, resent while the server still answers 503 (it records nothing then)."""
    answers: list[httpx.Response] = []

    def sent() -> bool:
        answers.append(feedback(c, ids))
        return answers[-1].status_code != 503

    wait_for(sent, timeout=60, interval=0.2, what="feedback to be accepted after PostgreSQL came back")
    return answers[-1]


def logged_ids(pg: PostgresServer) -> list[str]:
    """Every prediction id of model iris in the PostgreSQL prediction log."""
    with psycopg.connect(pg.conninfo(DATABASE)) as conn:
        return [pid for (pid,) in conn.execute("SELECT prediction_id FROM prediction_log WHERE model = 'iris'")]


def feedback_rows(pg: PostgresServer) -> int:
    with psycopg.connect(pg.conninfo(DATABASE)) as conn:
        return conn.execute("SELECT count(*) FROM feedback WHERE model = 'iris'").fetchone()[0]


@pytest.fixture
def pg_server(stoppable_postgres: PostgresServer, iris_dir: Path, tmp_path: Path) -> Iterator[ServerHandle]:
    """The model server with its feedback database on ``stoppable_postgres``."""
    env = {"KCP_FEEDBACK_DB_URL": stoppable_postgres.create_database(DATABASE), "KCP_FEEDBACK_DB_RETRY_S": str(RETRY_S)}
    with start_model_server(iris_dir, tmp_path, env=env) as server:
        yield server


def test_postgres_stopped_and_started_under_load(stoppable_postgres: PostgresServer, pg_server: ServerHandle) -> None:
    pg = stoppable_postgres
    with pg_server.client() as c:
        before = predict(c)
        assert feedback(c, [before]).status_code == 200
        assert c.get("/v2/feedback/store").json()["available"] is True
        load = Load(pg_server).start()
        try:
            wait_for(lambda: len(load.answers) >= 20, timeout=60, what="the load to run")
            pg.stop("immediate")
            down_at = time.monotonic()
            during = predict(c)
            refused_at = time.monotonic()
            assert_refused_while_down(c, during)
            refusal_s = time.monotonic() - refused_at
            wait_for(lambda: metric(c, "classifier_prediction_log_store_up") == 0, timeout=30,
                     what="the prediction log to notice PostgreSQL is gone")
            wait_for(lambda: len(load.made_between(down_at, time.monotonic())) >= 100
                     and metric(c, "classifier_prediction_log_queued_rows") > 0,
                     timeout=60, what="predictions to be served and queued while PostgreSQL is down")
            up_at = time.monotonic()
            pg.start()
            caught_up = accepted_once_back(c, [during])
            assert caught_up.status_code == 200, caught_up.text
            outage_ids = load.made_between(down_at, up_at)
            late = feedback(c, outage_ids)
            assert late.status_code == 200, late.text
            assert late.json()["accepted"] == len(outage_ids)
            assert c.get("/v2/feedback/store").json()["available"] is True
            assert metric(c, "classifier_feedback_store_up") == 1
            wait_for(lambda: metric(c, "classifier_prediction_log_store_up") == 1, timeout=30,
                     what="the prediction log to flush again")
        finally:
            load.stop()
        assert metric(c, "classifier_prediction_log_dropped_rows_total") == 0
        assert metric(c, "classifier_prediction_log_flush_failures_total") > 0  # it really met the outage

    failed = [a for a in load.answers if not a.ok]
    assert not failed, f"{len(failed)} of {len(load.answers)} predictions failed, e.g. {failed[:3]}"
    assert {a.protocol for a in load.answers} == {"rest", "grpc"}
    assert load.readiness and set(load.readiness) == {200}
    assert pg_server.stop() == 0, pg_server.log()[-3000:]  # SIGTERM writes whatever is still queued

    answered = [before, during] + [pid for a in load.answers for pid in a.prediction_ids]
    logged = logged_ids(pg)
    assert len(set(answered)) == len(answered)
    assert sorted(logged) == sorted(answered), (f"{len(set(answered) - set(logged))} answered predictions not "
                                                f"logged, {len(set(logged) - set(answered))} logged unanswered")
    assert feedback_rows(pg) == 2 + len(outage_ids)  # the refused and resent submissions counted once
    print(f"{len(load.answers)} predictions ({len(outage_ids)} ids during the outage), "
          f"feedback refused in {refusal_s:.2f}s while down")


def test_server_starts_while_postgres_is_down(stoppable_postgres: PostgresServer, iris_dir: Path,
                                              tmp_path: Path) -> None:
    """No crash loop: the server becomes ready and predicts without its database; feedback for those
    predictions works once PostgreSQL starts."""
    pg = stoppable_postgres
    env = {"KCP_FEEDBACK_DB_URL": pg.create_database(DATABASE), "KCP_FEEDBACK_DB_RETRY_S": str(RETRY_S)}
    pg.stop()
    with start_model_server(iris_dir, tmp_path, env=env) as server, server.client() as c:
        ids = [predict(c) for _ in range(5)]
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = raw_stub(channel)
            ids += grpc_prediction_ids(stub.ModelInfer(grpc_request(stub), timeout=30))
        assert_refused_while_down(c, ids[0])
        assert c.get("/v2/health/ready").status_code == 200
        pg.start()
        accepted = accepted_once_back(c, ids)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["accepted"] == len(ids)
        assert metric(c, "classifier_feedback_store_up") == 1
        assert server.stop() == 0, server.log()[-3000:]
    assert sorted(logged_ids(pg)) == sorted(ids)


def test_feedback_for_predictions_the_log_could_not_write_is_deferred_not_refused(
        postgres_server: PostgresServer, iris_dir: Path, tmp_path: Path) -> None:
    """The log's writes stall (a lock blocks INSERT, reads still answer) past the feedback API's flush
    timeout: feedback naming a prediction still queued gets 503 + Retry-After, never a 400 "unknown
    id" that a client would not retry, and is accepted once the log has written it."""
    name = f"stall_{uuid.uuid4().hex[:8]}"
    env = {"KCP_FEEDBACK_DB_URL": postgres_server.create_database(name),
           "KCP_FEEDBACK_DB_STATEMENT_TIMEOUT_S": "60"}  # the writer stays blocked, it does not fail
    with start_model_server(iris_dir, tmp_path, env=env) as server, server.client() as c:
        assert feedback(c, [predict(c)]).status_code == 200  # tables exist, the store is up
        with psycopg.connect(postgres_server.conninfo(name)) as holder:
            holder.execute("LOCK TABLE prediction_log IN EXCLUSIVE MODE")  # INSERT waits, SELECT does not
            queued = predict(c)
            deferred = feedback(c, [queued])
            assert deferred.status_code == 503, deferred.text
            assert int(deferred.headers["retry-after"]) >= 1
            assert c.get("/v2/health/ready").status_code == 200
        accepted = accepted_once_back(c, [queued])
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["accepted"] == 1
