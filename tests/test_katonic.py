"""A Katonic-style package (launch.py + schema.py) served unchanged behind V2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.fixtures.server import REPO, start_model_server
from tests.support.v2 import output

EXAMPLE = REPO / "models" / "iris-katonic"
SETOSA = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
VIRGINICA = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}


def rows(*docs) -> dict:
    data = [d if isinstance(d, str) else json.dumps(d) for d in docs]
    return {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [len(data)], "data": data}]}


@pytest.fixture(scope="module")
def katonic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("katonic")
    models = tmp / "models"
    shutil.copytree(EXAMPLE, models / "iris-katonic")
    no_schema = models / "iris-katonic-noschema"
    shutil.copytree(EXAMPLE, no_schema)
    (no_schema / "schema.py").unlink()
    config = json.loads((no_schema / "config.json").read_text())
    (no_schema / "config.json").write_text(json.dumps({**config, "name": "iris-katonic-noschema"}))
    with start_model_server(models, tmp) as server, server.client() as client:
        yield client


def test_metadata_and_prediction(katonic):
    meta = katonic.get("/v2/models/iris-katonic").json()
    assert meta["platform"] == "katonic"
    assert meta["inputs"][0] == {"name": "data", "datatype": "BYTES", "shape": [-1]}
    response = katonic.post("/v2/models/iris-katonic/infer", json=rows(SETOSA, VIRGINICA))
    assert response.status_code == 200, response.text
    body = response.json()
    assert output(body, "label").tolist() == [0, 2]
    assert output(body, "label_name").tolist() == ["setosa", "virginica"]


@pytest.mark.parametrize("docs, message", [
    ([{**SETOSA, "sepal_length": -1}], "sepal_length"),
    ([{k: v for k, v in SETOSA.items() if k != "petal_width"}], "petal_width"),
    ([{**SETOSA, "colour": "blue"}], "colour"),
    (["{not json"], "not JSON"),
])
def test_schema_rejects_bad_rows(katonic, docs, message):
    response = katonic.post("/v2/models/iris-katonic/infer", json=rows(*docs))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_preprocessing_false_is_a_400(katonic):
    response = katonic.post("/v2/models/iris-katonic-noschema/infer", json=rows({**SETOSA, "sepal_length": -1}))
    assert response.status_code == 400
    assert "preprocessing rejected the input" in response.json()["error"]
    ok = katonic.post("/v2/models/iris-katonic-noschema/infer", json=rows(SETOSA))
    assert output(ok.json(), "label").tolist() == [0]


def test_non_bytes_input_is_a_400(katonic):
    body = {"inputs": [{"name": "data", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
    response = katonic.post("/v2/models/iris-katonic/infer", json=body)
    assert response.status_code == 400 and "JSON document" in response.json()["error"]


def test_launch_py_without_predict_is_refused(tmp_path):
    package = tmp_path / "models" / "broken"
    shutil.copytree(EXAMPLE, package)
    source = (package / "launch.py").read_text().replace("def predict(", "def not_predict(")
    (package / "launch.py").write_text(source)
    result = subprocess.run([sys.executable, "-m", "predictors", "validate", str(package)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 1
    assert "launch.py" in result.stdout and "predict" in result.stdout


def test_kserve_style_client_can_call_it(katonic):
    response = httpx.post(str(katonic.base_url) + "/v2/models/iris-katonic/infer",
                          json={**rows(VIRGINICA), "id": "kat-1"})
    assert response.json()["id"] == "kat-1"
