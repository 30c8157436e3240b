"""The browser page's server side over real HTTP: static shell, /preprocess, /card, auth, /docs, packaging.

The page itself is exercised in a real browser in tests/test_ui.py; these tests pin down the
contracts it relies on, and the bad-input and auth behaviour of the two helper routes.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
import uvicorn

from predictors.ui import STATIC_DIR
from tests.fixtures.digits import photo_of_digit
from tests.fixtures.ports import free_port, wait_for
from tests.fixtures.server import REPO, TRAINED_MODELS, ServerHandle, start_model_server
from tests.support.v2 import bytes_tensor, output, tensor

KEY = "ui-test-key"


@pytest.fixture(scope="module")
def client(model_server: ServerHandle) -> Iterator[httpx.Client]:
    with model_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """Iris only (quick to start), an API key, and KServe's /docs switched on."""
    tmp = tmp_path_factory.mktemp("ui-keyed")
    shutil.copytree(TRAINED_MODELS / "iris", tmp / "models" / "iris")
    with start_model_server(tmp / "models", tmp, api_key=KEY, extra_args=["--enable_docs_url", "true"]) as server:
        yield server


def preprocess(client: httpx.Client, body: dict | bytes, model: str = "mnist") -> httpx.Response:
    if isinstance(body, bytes):
        return client.post(f"/v2/models/{model}/preprocess", content=body,
                           headers={"Content-Type": "application/json"})
    return client.post(f"/v2/models/{model}/preprocess", json=body)


# --- the static shell -------------------------------------------------------------------------


def test_page_and_assets_are_served_without_a_key_with_security_headers(keyed: ServerHandle) -> None:
    with httpx.Client(base_url=keyed.http_url) as anonymous:
        redirect = anonymous.get("/ui")
        assert redirect.status_code == 308
        assert redirect.headers["location"] == "ui/"
        page = anonymous.get("/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "<title>Classifier playground</title>" in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert anonymous.get("/ui/app.js").headers["content-type"].split(";")[0] in (
            "text/javascript", "application/javascript")
        assert anonymous.get("/ui/style.css").headers["content-type"].startswith("text/css")
        missing = anonymous.get("/ui/nothing-here.js")
        assert missing.status_code == 404
        # ...while the API next to it still wants the key
        assert anonymous.get("/v2/models").status_code == 401


def test_static_files_load_nothing_from_elsewhere() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    references = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert references, "index.html references its script and stylesheet"
    for ref in references:
        assert not re.match(r"^(?:[a-z]+:)?//", ref, re.I), f"index.html loads {ref} from another origin"
    assert "<script>" not in html and "style=" not in html, "inline script/style would break the CSP"
    css = (STATIC_DIR / "style.css").read_text()
    assert "@import" not in css and "url(" not in css
    js = (STATIC_DIR / "app.js").read_text()
    assert not re.search(r"""fetch\(\s*["'`](?:https?:)?//""", js)
    assert "innerHTML" not in js, "server text must go in as text, never as HTML"


# --- /preprocess ------------------------------------------------------------------------------


def test_preprocess_returns_exactly_the_input_the_model_classifies(client: httpx.Client, mnist_digits) -> None:
    """The preview is the model's own preprocessing: feeding it back as FP32 gives the same answer."""
    images, _ = mnist_digits
    rng = np.random.default_rng(11)
    photos = [photo_of_digit(images[i], rng, fmt="PNG") for i in range(3)]
    answer = preprocess(client, {"inputs": [bytes_tensor("input-0", photos)]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_name"] == "mnist"
    (tensor_out,) = body["outputs"]
    assert tensor_out["name"] == "input-0" and tensor_out["datatype"] == "FP32"
    assert tensor_out["shape"] == [3, 28, 28]
    seen = np.asarray(tensor_out["data"], dtype=np.float32).reshape(3, 28, 28)
    assert seen.min() >= 0.0 and seen.max() == pytest.approx(1.0, abs=0.05)
    # a dark digit placed off-centre on a 400x300 page comes back light-on-dark and centred by mass
    ys, xs = np.indices((28, 28))
    for image in seen:
        assert abs((ys * image).sum() / image.sum() - 13.5) < 1.5
        assert abs((xs * image).sum() / image.sum() - 13.5) < 1.5
        assert image[0].max() < 0.1 and image[:, 0].max() < 0.1  # background is dark at the border

    from_bytes = client.post("/v2/models/mnist/infer", json={"inputs": [bytes_tensor("input-0", photos)]}).json()
    from_preview = client.post("/v2/models/mnist/infer",
                               json={"inputs": [tensor("input-0", seen, "FP32")]}).json()
    np.testing.assert_allclose(output(from_preview, "probabilities"), output(from_bytes, "probabilities"),
                               atol=1e-5)


NOT_AN_IMAGE = base64.b64encode(b"this is a text file, not a picture").decode()


@pytest.mark.parametrize("model, body, status, message", [
    ("mnist", {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": [NOT_AN_IMAGE]}]},
     400, "not a valid"),
    ("mnist", {"inputs": [{"name": "input-0", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]},
     400, "not base64"),
    ("mnist", {"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": [NOT_AN_IMAGE]}]},
     400, "unknown input"),
    ("mnist", {"inputs": [{"name": "input-0", "shape": [1, 3, 3], "datatype": "FP32", "data": [0.0] * 9}]},
     400, "shape"),
    ("mnist", {"instances": [[1, 2]]}, 400, "invalid inference request"),
    ("mnist", b"{not json", 400, "not valid JSON"),
    ("iris", {"inputs": [tensor("input-0", [[5.1, 3.5, 1.4, 0.2]], "FP32")]}, 400, "not an image model"),
    ("no-such-model", {"inputs": [tensor("input-0", [[0.0]], "FP32")]}, 404, "does not exist"),
])
def test_preprocess_bad_input_is_a_4xx_json_error(client: httpx.Client, model: str, body: dict | bytes,
                                                  status: int, message: str) -> None:
    answer = preprocess(client, body, model)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]


def test_preprocess_is_post_only(client: httpx.Client) -> None:
    answer = client.get("/v2/models/mnist/preprocess")
    assert answer.status_code == 405
    assert "error" in answer.json()


# --- /card ------------------------------------------------------------------------------------


def test_card_tells_the_page_what_to_ask_for(client: httpx.Client) -> None:
    iris = client.get("/v2/models/iris/card").json()
    assert iris["task"] == "tabular_classification"
    assert iris["input"]["name"] == "input-0" and iris["input"]["shape"][-1] == 4
    assert len(iris["feature_names"]) == 4
    assert [entry["label"] for entry in iris["labels"]] == [0, 1, 2]
    assert iris["image_size"] is None
    mnist = client.get("/v2/models/mnist/card").json()
    assert mnist["task"] == "image_classification" and mnist["image_size"] == 28
    assert [entry["name"] for entry in mnist["labels"]] == [str(d) for d in range(10)]
    assert 1 <= mnist["top_k"] <= 10
    missing = client.get("/v2/models/no-such-model/card")
    assert missing.status_code == 404 and "does not exist" in missing.json()["error"]


def test_mount_ui_in_any_app_with_an_explicit_model_lookup(tmp_path: Path) -> None:
    """The server may hand mount_ui its repository directly; readiness is honoured (503, not 500)."""
    from fastapi import FastAPI
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from predictors.models import ServingContext, model_for
    from predictors.package import LabelsFile, PackageConfig, save_package
    from predictors.settings import ServerSettings
    from predictors.ui import mount_ui

    data = load_iris()
    (tmp_path / "iris").mkdir()
    joblib.dump(LogisticRegression(max_iter=500).fit(data.data, data.target), tmp_path / "iris" / "model.joblib")
    package = save_package(tmp_path / "iris", PackageConfig(
        format_version=1, name="iris", version="7", framework="sklearn", task="tabular_classification",
        artifact="model.joblib", inputs=[{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]),
        LabelsFile(labels=[0, 1, 2]))
    model = model_for(package, ServingContext(settings=ServerSettings(prediction_log=False)))
    app = FastAPI()
    mount_ui(app, models={"iris": model}.get)
    with serve_app(app) as base_url, httpx.Client(base_url=base_url) as http:
        assert http.get("/ui/").status_code == 200
        not_ready = http.get("/v2/models/iris/card")
        assert not_ready.status_code == 503 and "not ready" in not_ready.json()["error"]
        model.load()
        card = http.get("/v2/models/iris/card").json()
        assert card["version"] == "7" and card["feature_names"] is None
        assert [entry["name"] for entry in card["labels"]] == ["0", "1", "2"]
        assert http.get("/v2/models/other/card").status_code == 404


@contextlib.contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on a free loopback port; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, timeout=30, what="uvicorn startup")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# --- auth and /docs ---------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("POST", "/v2/models/iris/preprocess"),
    ("GET", "/v2/models/iris/card"),
])
def test_helper_routes_need_the_api_key(keyed: ServerHandle, method: str, path: str) -> None:
    body = {"inputs": [tensor("input-0", [[5.1, 3.5, 1.4, 0.2]], "FP32")]}
    kwargs = {"json": body} if method == "POST" else {}
    with httpx.Client(base_url=keyed.http_url) as anonymous:
        denied = anonymous.request(method, path, **kwargs)
        wrong = anonymous.request(method, path, headers={"X-API-Key": "wrong"}, **kwargs)
    assert denied.status_code == wrong.status_code == 401
    assert "API key" in denied.json()["error"]
    with keyed.client() as authorised:
        allowed = authorised.request(method, path, **kwargs)
    assert allowed.status_code != 401
    assert allowed.status_code == (400 if method == "POST" else 200)  # iris is tabular: no preview


def test_openapi_docs_answer_when_enabled(keyed: ServerHandle, client: httpx.Client) -> None:
    with httpx.Client(base_url=keyed.http_url) as anonymous:
        docs = anonymous.get("/docs")
        assert docs.status_code == 200
        assert "swagger" in docs.text.lower()
        schema = anonymous.get("/openapi.json").json()
    assert "/v2/models/{model_name}/preprocess" in schema["paths"]
    assert "/v2/models/{model_name}/card" in schema["paths"]
    assert client.get("/docs").status_code == 404  # the session server runs without --enable_docs_url


# --- packaging --------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    """pyproject's package-data must carry the static files, or an installed server has no page."""
    source = tmp_path / "source"  # a copy, so the build writes nothing into the working tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in ("predictors", "streaming", "training"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("kserve_classifiers-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for static in ("index.html", "app.js", "style.css"):
        assert f"predictors/ui/static/{static}" in names
