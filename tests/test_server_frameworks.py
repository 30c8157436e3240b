"""The framework registry: `framework` picks the predictor class; `validate` refuses what cannot work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from predictors.models import ServingContext, model_for
from predictors.models.tabular import TabularModel
from predictors.package import FRAMEWORKS, load_package
from tests.fixtures.server import REPO, TRAINED_MODELS, start_model_server


def validate(package) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "predictors", "validate", str(package)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("change, message", [
    ({"framework": "xgboost"}, "unknown framework 'xgboost'; this server serves katonic, keras, sklearn"),
    ({"task": "image_classification"}, "framework 'sklearn' cannot serve task 'image_classification'"),
])
def test_validate_refuses_unknown_or_impossible_frameworks(tmp_path, change, message):
    package = tmp_path / "iris"
    shutil.copytree(TRAINED_MODELS / "iris", package)
    config = json.loads((package / "config.json").read_text())
    (package / "config.json").write_text(json.dumps({**config, **change}))
    code, out = validate(package)
    assert code == 1, out
    assert message in out and '"ok": false' in out


def test_every_registered_framework_names_an_importable_model_class():
    for name, spec in FRAMEWORKS.items():
        module, _, cls = spec.model_class.partition(":")
        assert module.startswith("predictors.models.") and cls, name
    model = model_for(load_package(TRAINED_MODELS / "iris"), ServingContext())
    assert type(model) is TabularModel


@pytest.mark.parametrize("setting, inline_rows", [(True, 64), (False, 0)])
def test_inline_predict_is_decided_per_model_and_config_overrides_it(tmp_path, caplog, setting, inline_rows):
    package = tmp_path / "iris"
    shutil.copytree(TRAINED_MODELS / "iris", package)
    config = json.loads((package / "config.json").read_text())
    (package / "config.json").write_text(json.dumps({**config, "inline_predict": setting}))
    with caplog.at_level("INFO", logger="predictors.models.base"):
        model = model_for(load_package(package), ServingContext())
        model.load()
    assert model.inline_max_rows == inline_rows
    assert "model iris: predict runs" in caplog.text and "config.json inline_predict" in caplog.text


def test_without_a_setting_the_load_log_states_the_measured_choice(caplog):
    with caplog.at_level("INFO", logger="predictors.models.base"):
        model_for(load_package(TRAINED_MODELS / "iris"), ServingContext()).load()
    assert "model iris: predict runs" in caplog.text and "one-row call" in caplog.text


def test_the_server_log_states_each_models_choice(tmp_path, iris_dir):
    with start_model_server(iris_dir, tmp_path) as server:
        server.stop()
    assert "model iris: predict runs " in server.log() and "one-row call" in server.log(), server.log()[-2000:]
