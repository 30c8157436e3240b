"""Loads, unloads and inferences racing each other on a real model server, and the load-lock table.

A load is made slow for real: the Katonic package's own ``loadmodel`` (user code, run by the load)
waits for a gate file, and tells the test it started by writing a marker. So the test can place an
unload exactly while a load is in flight, with no timing guesses.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from predictors.models import ServingContext
from predictors.protocol.errors import UnknownModel
from predictors.runtime.repository import PackageRepository
from predictors.settings import ServerSettings
from tests.fixtures.ports import wait_for
from tests.fixtures.server import REPO, start_model_server

NAME = "iris-katonic"
ROW = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
BODY = {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1], "data": [json.dumps(ROW)]}]}
GATED_LOADMODEL = '''

_loadmodel = loadmodel


def loadmodel(logger):
    """Wait (at most a minute) until the test opens the gate; say that the load has started."""
    import pathlib
    import time

    here = pathlib.Path(__file__).parent
    (here / "load.started").touch()
    for _ in range(1200):
        if (here / "load.gate").exists():
            break
        time.sleep(0.05)
    return _loadmodel(logger)
'''


@pytest.fixture
def gated_package(tmp_path: Path) -> Path:
    """A model directory with the Katonic Iris example whose load waits for ``load.gate`` (open at first)."""
    package = tmp_path / "models" / NAME
    shutil.copytree(REPO / "models" / NAME, package)
    with open(package / "launch.py", "a", encoding="utf-8") as launch:
        launch.write(GATED_LOADMODEL)
    (package / "load.gate").touch()
    return package


def test_an_unload_during_a_load_stands_and_inference_never_fails(gated_package: Path, tmp_path: Path) -> None:
    statuses: list[int] = []
    done = threading.Event()
    with (start_model_server(gated_package.parent, tmp_path) as server, server.client() as admin,
          ThreadPoolExecutor(1) as background):
        def infer_forever() -> None:
            with server.client() as c:
                while not done.is_set():
                    statuses.append(c.post(f"/v2/models/{NAME}/infer", json=BODY).status_code)

        clients = [threading.Thread(target=infer_forever) for _ in range(2)]
        for t in clients:
            t.start()
        try:
            for _ in range(2):
                (gated_package / "load.gate").unlink()
                (gated_package / "load.started").unlink(missing_ok=True)
                loading = background.submit(httpx.post, f"{server.http_url}/v2/repository/models/{NAME}/load",
                                            timeout=120)
                wait_for((gated_package / "load.started").exists, timeout=60, what="the load to start")
                assert admin.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
                assert admin.post(f"/v2/models/{NAME}/infer", json=BODY).status_code == 404
                (gated_package / "load.gate").touch()
                answer = loading.result(timeout=120)
                assert answer.status_code == 409, answer.text
                assert "unloaded while this load was in progress" in answer.json()["error"]
                assert admin.post(f"/v2/models/{NAME}/infer", json=BODY).status_code == 404  # the unload stands

                assert admin.post(f"/v2/repository/models/{NAME}/load").status_code == 200
                assert admin.post(f"/v2/models/{NAME}/infer", json=BODY).status_code == 200
            # an unload of a name neither served nor loading is still a 404
            assert admin.post("/v2/repository/models/nothing/unload").status_code == 404
        finally:
            done.set()
            for t in clients:
                t.join(timeout=60)
    assert 200 in statuses and set(statuses) <= {200, 404}, set(statuses)


def test_loads_of_unknown_names_leave_no_lock_behind(gated_package: Path) -> None:
    repository = PackageRepository(gated_package.parent, ServingContext(settings=ServerSettings(prediction_log=False)))

    async def main() -> None:
        names = [f"random-{uuid.uuid4().hex}" for _ in range(200)]
        results = await asyncio.gather(*(repository.load(n) for n in names), repository.load(NAME),
                                       repository.load(NAME), return_exceptions=True)
        assert all(isinstance(r, UnknownModel) for r in results[:200])
        assert results[200:] == [True, True]

    asyncio.run(main())
    assert repository._pending == {}  # no entry per name asked for, nor for the loads that finished
    assert list(repository.models) == [NAME]


def test_load_and_unload_over_grpc(iris_dir: Path, tmp_path: Path) -> None:
    """The repository RPCs answer like REST: unload takes the model away, load brings it back, unknown is NOT_FOUND."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    with start_model_server(iris_dir, tmp_path) as server, grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        unloaded = stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="iris"), timeout=30)
        assert (unloaded.model_name, unloaded.isUnloaded) == ("iris", True)
        with pytest.raises(grpc.RpcError) as gone:
            stub.ModelReady(pb.ModelReadyRequest(name="iris"), timeout=30)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        loaded = stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="iris"), timeout=60)
        assert (loaded.model_name, loaded.isLoaded) == ("iris", True)
        assert stub.ModelReady(pb.ModelReadyRequest(name="iris"), timeout=30).ready
        with pytest.raises(grpc.RpcError) as unknown:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="no-such-model"), timeout=30)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
