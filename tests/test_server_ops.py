"""Operations against real server processes: auth, hot swap under load, non-blocking predict, shutdown."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import joblib
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tests.fixtures.server import REPO, TRAINED_MODELS, start_model_server
from tests.support.metrics import sample_value
from tests.support.v2 import bytes_tensor, output, png_bytes, raw_stub, tensor

SETOSA = [5.1, 3.5, 1.4, 0.2]
IRIS_BODY = {"inputs": [tensor("input-0", [SETOSA], "FP32")]}
KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    models = tmp / "models"
    shutil.copytree(TRAINED_MODELS / "iris", models / "iris")
    with start_model_server(models, tmp, api_key=KEY) as server:
        yield server


@pytest.mark.parametrize("method, path", [
    ("POST", "/v2/models/iris/infer"),
    ("GET", "/v2/models/iris"),
    ("GET", "/v2"),
    ("GET", "/v2/models"),
    ("POST", "/v2/repository/models/iris/load"),
    ("POST", "/v2/repository/models/iris/unload"),
    ("GET", "/v2/models/iris/feedback"),
    ("POST", "/v2/models/iris/feedback"),
])
def test_protected_endpoints_need_the_key(secured, method, path):
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.request(method, secured.http_url + path, headers=headers, json=IRIS_BODY)
        assert response.status_code == 401, (headers, response.text)
        assert "API key" in response.json()["error"]


def test_health_stays_open_and_the_key_works(secured):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/iris/ready", "/metrics", "/openapi.json"):
        assert httpx.get(secured.http_url + path).status_code == 200, path
    for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        response = httpx.post(secured.http_url + "/v2/models/iris/infer", headers=headers, json=IRIS_BODY)
        assert response.status_code == 200 and output(response.json(), "label").tolist() == [0]


def test_metrics_auth_closes_metrics_and_openapi(tmp_path, iris_dir):
    """Open by default (above: Prometheus scrapes without app credentials); ``--metrics-auth`` closes them."""
    with start_model_server(iris_dir, tmp_path, api_key=KEY, extra_args=["--metrics-auth"]) as server:
        for path in ("/metrics", "/openapi.json"):
            refused = httpx.get(server.http_url + path)
            assert refused.status_code == 401 and "API key" in refused.json()["error"], path
            assert httpx.get(server.http_url + path, headers={"X-API-Key": KEY}).status_code == 200, path
        assert httpx.get(server.http_url + "/v2/health/ready").status_code == 200
        unauthenticated = httpx.post(server.http_url + "/v2/models/iris/infer", json=IRIS_BODY)
        metrics = httpx.get(server.http_url + "/metrics", headers={"X-API-Key": KEY}).text
    assert unauthenticated.status_code == 401
    assert sample_value(metrics, "classifier_requests_total", model="_unauthenticated", version="", protocol="rest",
                        status="401") == 1.0


def test_access_log_is_off_by_default_and_on_with_the_flag(tmp_path, iris_dir):
    for args, logged in (([], False), (["--access-log"], True)):
        (tmp_path / str(logged)).mkdir()
        with start_model_server(iris_dir, tmp_path / str(logged), extra_args=args) as server:
            assert server.client().post("/v2/models/iris/infer", json=IRIS_BODY).status_code == 200
            server.stop()
            assert ('"POST /v2/models/iris/infer HTTP/1.1" 200' in server.log()) is logged, server.log()[-2000:]


def test_grpc_needs_the_key(secured):
    channel = grpc.insecure_channel(secured.grpc_target)
    stub = raw_stub(channel)
    m = stub.messages
    tensor_ = m["ModelInferRequest"].InferInputTensor(
        name="input-0", datatype="FP64", shape=[1, 4], contents=m["InferTensorContents"](fp64_contents=SETOSA))
    request = m["ModelInferRequest"](model_name="iris", inputs=[tensor_])
    for metadata in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(m["ModelMetadataRequest"](name="iris"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ServerLive(m["ServerLiveRequest"]()).live  # health stays open
    ok = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {KEY}"),))
    assert ok.model_name == "iris"
    channel.close()


def test_api_key_file(tmp_path, iris_dir):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    with start_model_server(iris_dir, tmp_path, env={"KCP_API_KEY_FILE": str(key_file)}) as server:
        url = server.http_url + "/v2/models/iris/infer"
        assert httpx.post(url, json=IRIS_BODY).status_code == 401
        assert httpx.post(url, json=IRIS_BODY, headers={"X-API-Key": "from-a-file"}).status_code == 200


def _write_version(package: Path, version: str, C: float) -> None:
    """Retrain the iris artifact with another C and bump the package version, as a new release would."""
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(C=C, max_iter=500).fit(x, y), package / "model.joblib.new")
    (package / "model.joblib.new").replace(package / "model.joblib")
    config = json.loads((package / "config.json").read_text())
    config["version"] = version
    (package / "config.json").write_text(json.dumps(config))


def test_hot_swap_under_load_fails_no_request(tmp_path, iris_dir):
    package = iris_dir / "iris"
    with start_model_server(iris_dir, tmp_path) as server:
        stop = threading.Event()
        versions: list[str] = []
        failures: list[str] = []

        def hammer() -> None:
            with httpx.Client(base_url=server.http_url, timeout=30) as client:
                while not stop.is_set():
                    r = client.post("/v2/models/iris/infer", json=IRIS_BODY)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    else:
                        versions.append(r.json()["model_version"])

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(hammer)
            with httpx.Client(base_url=server.http_url, timeout=60) as admin:
                for version, c in (("swap-2", 0.5), ("swap-3", 2.0)):
                    _write_version(package, version, c)
                    response = admin.post("/v2/repository/models/iris/load")
                    assert response.status_code == 200, response.text
                    assert admin.get("/v2/models/iris").json()["versions"] == [version]
                served_before = len(versions)
                deadline = time.monotonic() + 60
                while len(versions) < served_before + 20 and time.monotonic() < deadline:
                    time.sleep(0.01)
            stop.set()
        assert not failures, failures[:3]
        assert "swap-3" in versions and versions[-1] == "swap-3"

        with httpx.Client(base_url=server.http_url) as admin:
            assert admin.post("/v2/repository/models/iris/unload").status_code == 200
            assert admin.post("/v2/models/iris/infer", json=IRIS_BODY).status_code == 404
            assert admin.post("/v2/repository/models/iris/unload").status_code == 404
            assert admin.post("/v2/repository/models/iris/load").status_code == 200
            assert admin.post("/v2/models/iris/infer", json=IRIS_BODY).status_code == 200
            assert admin.post("/v2/repository/models/nothing/load").status_code == 404


def test_broken_new_version_keeps_the_old_one_serving(tmp_path, iris_dir):
    package = iris_dir / "iris"
    with start_model_server(iris_dir, tmp_path) as server, server.client() as client:
        before = client.get("/v2/models/iris").json()["versions"]
        config = json.loads((package / "config.json").read_text())
        (package / "config.json").write_text(json.dumps({**config, "format_version": 99}))
        response = client.post("/v2/repository/models/iris/load")
        assert response.status_code == 400
        assert "format_version" in response.json()["error"] and "config.json" in response.json()["error"]
        assert client.get("/v2/models/iris").json()["versions"] == before
        assert client.post("/v2/models/iris/infer", json=IRIS_BODY).status_code == 200


def test_health_answers_while_a_large_batch_runs(model_server, mnist_digits):
    images, _ = mnist_digits
    photos = [png_bytes(np.kron(images[i % len(images)], np.ones((12, 12), dtype=np.uint8))) for i in range(256)]
    body = {"inputs": [bytes_tensor("input-0", photos)]}
    done = threading.Event()
    health_before_done: list[bool] = []

    def big_batch() -> int:
        try:
            return httpx.post(model_server.http_url + "/v2/models/mnist/infer", json=body, timeout=120).status_code
        finally:
            done.set()

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(big_batch)
        with httpx.Client(base_url=model_server.http_url, timeout=30) as client:
            while not done.is_set():
                ok = client.get("/v2/health/live").status_code == 200
                health_before_done.append(ok and not done.is_set())
        assert future.result() == 200
    assert sum(health_before_done) >= 2, "health checks did not answer while the batch was being processed"


def test_sigterm_shuts_down_cleanly(tmp_path, iris_dir):
    with start_model_server(iris_dir, tmp_path) as server:
        assert server.client().post("/v2/models/iris/infer", json=IRIS_BODY).status_code == 200
        code = server.stop(signal.SIGTERM, timeout=40)
        assert code == 0, server.log()[-2000:]


@pytest.mark.parametrize("breakage, expected", [
    (lambda p: (p / "labels_file.json").unlink(), "labels_file.json: file is missing"),
    (lambda p: (p / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    (lambda p: (p / "labels_file.json").write_text('{"labels": [0, 1]}'), "labels_file.json: field 'labels'"),
])
def test_server_refuses_to_start_on_a_broken_package(tmp_path, iris_dir, breakage, expected):
    breakage(iris_dir / "iris")
    result = subprocess.run(
        [sys.executable, "-m", "predictors", "serve", "--model_dir", str(iris_dir), "--host", "127.0.0.1",
         "--http_port", "0", "--grpc_port", "0"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert expected in result.stdout + result.stderr
