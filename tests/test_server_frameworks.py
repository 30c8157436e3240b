"""The framework registry: `framework` picks the predictor class; `validate` refuses what cannot work."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import REGISTRY

from predictors.models import ServingContext, model_for
from predictors.models.base import Prepared
from predictors.models.tabular import TabularModel
from predictors.package import FRAMEWORKS, load_package
from predictors.protocol.errors import BadInput
from predictors.protocol.v2 import Tensor, V2Request
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


# --- the image model's serving choices ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_model():
    model = model_for(load_package(TRAINED_MODELS / "fashion-mnist"), ServingContext())
    model.load()
    return model


def test_image_models_predict_in_the_thread_pool_without_timing_a_call(caplog):
    with caplog.at_level("INFO", logger="predictors.models.base"):
        model = model_for(load_package(TRAINED_MODELS / "fashion-mnist"), ServingContext())
        model.load()
    assert model.inline_max_rows == 0
    assert "model fashion-mnist: predict runs in the thread pool (keras computes outside the GIL)" in caplog.text


def test_an_image_model_can_still_be_made_inline_by_config(tmp_path):
    package = tmp_path / "fashion-mnist"
    shutil.copytree(TRAINED_MODELS / "fashion-mnist", package)
    config = json.loads((package / "config.json").read_text())
    (package / "config.json").write_text(json.dumps({**config, "inline_predict": True}))
    model = model_for(load_package(package), ServingContext())
    model.load()
    assert model.inline_max_rows == 64


def test_the_served_call_answers_as_keras_does_for_any_batch_size(fashion_model):
    rng = np.random.default_rng(1)
    for n in (1, 3, 64):
        x = rng.random((n, 28, 28), dtype=np.float32)
        served = fashion_model.predict_array(x)
        assert served.shape == (n, 10) and served.dtype == np.float32
        assert np.allclose(served, fashion_model.keras_model.predict_on_batch(x[..., None]), atol=1e-5)
    # the same rows give the same answer alone and inside a batch (batch-mates do not change a result)
    assert np.allclose(fashion_model.predict_array(x[:1]), fashion_model.predict_array(x)[:1], atol=1e-6)


@pytest.mark.parametrize("value, message", [
    (np.nan, "NaN or infinity"), (np.inf, "NaN or infinity"), (-np.inf, "NaN or infinity"),
    (-0.5, "must be in [0, 1]"), (1.5, "must be in [0, 1]"),
])
def test_raw_fp32_pixels_must_be_finite_and_in_range(fashion_model, value, message):
    pixels = np.full((1, 28, 28), 0.5, dtype="<f4")
    pixels[0, 3, 4] = value
    with pytest.raises(BadInput, match=re.escape(message)):
        asyncio.run(fashion_model.decode_features(Tensor("input-0", "FP32", [1, 28, 28], raw=pixels.tobytes())))
    pixels[0, 3, 4] = 1.0
    decoded = asyncio.run(fashion_model.decode_features(Tensor("input-0", "FP32", [1, 28, 28], raw=pixels.tobytes())))
    assert np.array_equal(decoded, pixels) and decoded.dtype == np.float32


def test_a_request_that_fills_a_batch_by_itself_skips_the_batcher(fashion_model):
    def batched_calls() -> float:
        return REGISTRY.get_sample_value("classifier_batch_requests_count", {"model": "fashion-mnist"}) or 0.0

    async def predict(x: np.ndarray) -> np.ndarray:
        prepared = Prepared(V2Request(None, []), "r", x, len(x), None, False)
        return (await fashion_model.predict(prepared)).probabilities

    assert fashion_model.batcher is not None and fashion_model.batcher.max_batch_size == 64
    x = np.random.default_rng(2).random((64, 28, 28), dtype=np.float32)
    before = batched_calls()
    np.testing.assert_allclose(asyncio.run(predict(x)), fashion_model.predict_array(x), atol=1e-6)
    assert batched_calls() == before  # ran on its own, not as a batch
    np.testing.assert_allclose(asyncio.run(predict(x[:3])), fashion_model.predict_array(x[:3]), atol=1e-6)
    assert batched_calls() == before + 1  # a smaller request still goes through the batcher
