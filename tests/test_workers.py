"""``serve --workers 2``: two real worker processes behind one REST and one gRPC port, one feedback database.

Which worker answered is read from the prediction id: its server part starts with a random prefix
drawn once per process (:class:`predictors.protocol.ids.UniqueSuffixes`). A keep-alive HTTP
connection or a gRPC channel stays with the worker that accepted it, so holding one connection
per worker lets a test send a prediction to one worker and its feedback to the other.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.fixtures.ports import free_port, wait_for
from tests.fixtures.server import REPO, ServerHandle, start_model_server
from tests.support.v2 import raw_stub
from tests.test_server_prediction_log import logged

SETOSA = [5.1, 3.5, 1.4, 0.2]
PREFIX_LEN = 12  # hex digits of the per-process prefix of a prediction id's server part
WORKERS = 2


@contextlib.contextmanager
def workers_server(tmp_path: Path, model_dir: Path, env: dict[str, str] | None = None) -> Iterator[ServerHandle]:
    """``serve --workers 2``, yielded once the supervisor reports every worker ready."""
    with start_model_server(model_dir, tmp_path, extra_args=["--workers", str(WORKERS)], env=env) as server:
        wait_for(lambda: f"{WORKERS} workers ready" in server.log(), timeout=120, what="every worker ready")
        yield server


def worker_pids(server: ServerHandle) -> set[int]:
    """The supervisor's child processes (Linux: /proc/<pid>/task/<pid>/children)."""
    pid = server.process.pid
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def worker_of(prediction_id: str) -> str:
    return prediction_id.rsplit(":", 1)[1][:PREFIX_LEN]


def infer_body(request_id: str) -> str:
    return json.dumps({"id": request_id, "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                                                     "data": SETOSA}]})


class Connection:
    """One keep-alive HTTP connection, hence one worker, for its whole life."""

    def __init__(self, port: int) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, body: str) -> tuple[int, dict]:
        self.http.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = self.http.getresponse()
        return response.status, json.loads(response.read())

    def get(self, path: str) -> tuple[int, dict]:
        self.http.request("GET", path)
        response = self.http.getresponse()
        return response.status, json.loads(response.read())

    def predict(self, request_id: str) -> str:
        status, body = self.post("/v2/models/iris/infer", infer_body(request_id))
        assert status == 200, body
        (out,) = [o for o in body["outputs"] if o["name"] == "prediction_id"]
        assert next(o for o in body["outputs"] if o["name"] == "label")["data"] == [0]
        return out["data"][0]


def until_every_worker(connect: Callable[[int], tuple[object, str]], tries: int = 200) -> dict[str, object]:
    """Open connections (``connect(i)`` → (connection, prediction id)) until each worker holds one."""
    by_worker: dict[str, object] = {}
    for i in range(tries):
        connection, prediction_id = connect(i)
        by_worker.setdefault(worker_of(prediction_id), connection)
        if len(by_worker) == WORKERS:
            break
    return by_worker


def rest_connections(server: ServerHandle) -> dict[str, Connection]:
    def connect(i: int) -> tuple[Connection, str]:
        connection = Connection(server.http_port)
        return connection, connection.predict(f"conn-{i}")

    return until_every_worker(connect)  # type: ignore[return-value]


def grpc_predict(stub, request_id: str) -> str:
    request = stub.messages["ModelInferRequest"](model_name="iris", id=request_id)
    tensor = request.inputs.add(name="input-0", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend(SETOSA)
    response = stub.ModelInfer(request, timeout=30)
    (out,) = [o for o in response.outputs if o.name == "prediction_id"]
    return out.contents.bytes_contents[0].decode()


def test_one_rest_and_one_grpc_port_served_by_every_worker(tmp_path, iris_dir):
    with workers_server(tmp_path, iris_dir) as server:
        assert len(worker_pids(server)) == WORKERS
        rest = rest_connections(server)
        channels = []

        def connect_grpc(i: int) -> tuple[object, str]:
            # A local subchannel pool: every channel its own TCP connection, which the kernel hands to one worker.
            channel = grpc.insecure_channel(server.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
            channels.append(channel)
            return channel, grpc_predict(raw_stub(channel), f"grpc-{i}")

        try:
            grpc_workers = until_every_worker(connect_grpc)
        finally:
            for channel in channels:
                channel.close()
        assert len(rest) == WORKERS, f"REST reached only {list(rest)}"
        assert set(grpc_workers) == set(rest), "gRPC and REST are not served by the same worker processes"
        assert "Uvicorn running" not in server.log()  # no worker bound a port of its own


def test_feedback_on_one_worker_for_a_prediction_answered_by_another(tmp_path, iris_dir):
    """Feedback sent at once to the other worker: its lookup retries after one flush interval, by which
    time the answering worker has written the prediction (default flush interval, 50 ms)."""
    with workers_server(tmp_path, iris_dir) as server:
        conn_a, conn_b = rest_connections(server).values()
        pairs = [(conn_a, conn_b), (conn_b, conn_a)] * 10
        for i, (answering, other) in enumerate(pairs):
            prediction_id = answering.predict(f"cross-{i}")
            status, body = other.post("/v2/models/iris/feedback",
                                      json.dumps({"items": [{"id": prediction_id, "true_label": 0}]}))
            assert status == 200, body
            assert body["accepted"] == 1
        status, body = conn_a.post("/v2/models/iris/feedback",
                                   json.dumps({"items": [{"id": prediction_id, "true_label": 0}]}))
        assert status == 409, body  # counted once, whichever worker is asked again


def test_sigterm_stops_every_worker_and_writes_every_queued_prediction(tmp_path, iris_dir):
    # A flush interval longer than the test: every row is still queued in its worker when SIGTERM arrives.
    with workers_server(tmp_path, iris_dir, env={"KCP_PREDICTION_LOG_FLUSH_MS": "600000"}) as server:
        pids = worker_pids(server)
        connections = rest_connections(server)
        ids = [connection.predict(f"term-{i}-{n}") for n in range(50)
               for i, connection in enumerate(connections.values())]
        assert {worker_of(i) for i in ids} == set(connections)
        assert server.stop(signal.SIGTERM, timeout=90) == 0, server.log()[-3000:]
    assert not any(alive(pid) for pid in pids)
    assert all(logged(tmp_path, ids))


def test_a_killed_worker_is_restarted(tmp_path, iris_dir):
    with workers_server(tmp_path, iris_dir) as server:
        before = worker_pids(server)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(worker_pids(server)) == WORKERS and victim not in worker_pids(server), timeout=60,
                 what="a replacement worker")
        wait_for(lambda: server.log().count(" ready (pid ") == WORKERS + 1, timeout=120,
                 what="the replacement worker ready")
        assert "exited unexpectedly (signal SIGKILL); restarting" in server.log()
        assert server.process.poll() is None
        assert len(rest_connections(server)) == WORKERS  # both serve again, on the same port


def test_a_hot_swap_on_one_worker_reaches_every_worker(tmp_path, iris_dir):
    config_path = iris_dir / "iris" / "config.json"
    with workers_server(tmp_path, iris_dir) as server:
        first, second = rest_connections(server).values()
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "version": "swap-2"}))
        assert first.post("/v2/repository/models/iris/load", "")[0] == 200
        wait_for(lambda: second.get("/v2/models/iris")[1]["versions"] == ["swap-2"], timeout=60,
                 what="the other worker to load the new version")
        assert first.get("/v2/models/iris")[1]["versions"] == ["swap-2"]
        assert second.post("/v2/repository/models/iris/unload", "")[0] == 200
        wait_for(lambda: first.get("/v2/models/iris")[0] == 404, timeout=60, what="the other worker to unload")
        assert "model iris: unload by worker" in server.log()


def test_workers_stop_themselves_when_the_supervisor_is_killed(tmp_path, iris_dir):
    """No orphan keeps the ports: a worker whose supervisor vanished stops as on SIGTERM (and writes its log)."""
    with workers_server(tmp_path, iris_dir, env={"KCP_PREDICTION_LOG_FLUSH_MS": "600000"}) as server:
        pids = worker_pids(server)
        ids = [c.predict(f"orphan-{i}") for i, c in enumerate(rest_connections(server).values())]
        server.stop(signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in pids), timeout=90, what="orphaned workers to stop")
    assert all(logged(tmp_path, ids))


OPEN_AND_LOG = """
import pathlib, sys, time
from predictors.feedback.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
print("ready", flush=True)
while not pathlib.Path(sys.argv[2]).exists():
    time.sleep(0.001)
store.record_predictions("iris", "1", [(sys.argv[3], 0)])
"""


def test_workers_opening_a_new_sqlite_store_at_once_all_write(tmp_path):
    """Workers share a new SQLite file: the first writes of several processes race to switch it to WAL
    and to create the tables; none may fail (a failure marks the store down for 5 s)."""
    for attempt in range(5):
        where = tmp_path / f"attempt-{attempt}"
        where.mkdir()
        db, go = where / "feedback.db", where / "go"
        processes = [subprocess.Popen([sys.executable, "-c", OPEN_AND_LOG, f"sqlite:///{db}", str(go), f"p{i}"],
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for i in range(3)]
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        go.touch()
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr[-2000:]
        assert all(logged(where, ["p0", "p1", "p2"]))


def run_serve(args: list[str], tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "KCP_FEEDBACK_DB_URL": f"sqlite:///{tmp_path / 'f.db'}"}
    return subprocess.run([sys.executable, "-m", "predictors", "serve", "--host", "127.0.0.1", *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def test_a_broken_package_stops_every_worker_with_exit_code_2(tmp_path, iris_dir):
    config = iris_dir / "iris" / "config.json"
    config.write_text("{not json")
    done = run_serve(["--model_dir", str(iris_dir), "--http_port", str(free_port()), "--grpc_port", str(free_port()),
                      "--workers", "2"], tmp_path)
    assert done.returncode == 2, done.stdout[-3000:]
    assert "config.json" in done.stdout and "could not start (exit code 2)" in done.stdout


@pytest.mark.parametrize("busy", ["http", "grpc"])
def test_a_port_in_use_fails_at_once(tmp_path, iris_dir, busy):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"http": free_port(), "grpc": free_port(), busy: taken}
        done = run_serve(["--model_dir", str(iris_dir), "--http_port", str(ports["http"]),
                          "--grpc_port", str(ports["grpc"]), "--workers", "2"], tmp_path, timeout=60)
    assert done.returncode == 1
    assert "cannot bind 127.0.0.1" in done.stdout and "Address already in use" in done.stdout
    assert "worker 1 started" not in done.stdout
