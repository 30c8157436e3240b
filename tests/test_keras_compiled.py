"""Keras image models compiled to ONNX: served by onnxruntime only where they answer as TensorFlow does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from predictors.models import ServingContext, model_for
from predictors.models.compiled import TOLERANCE
from predictors.models.keras_compiled import compile_keras
from predictors.package import load_package
from predictors.settings import ServerSettings
from tests.fixtures.server import TRAINED_MODELS


def loaded(path):
    model = model_for(load_package(path), ServingContext(ServerSettings(execution_cache=None)))
    model.load()
    return model


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_the_shipped_image_models_are_compiled_and_answer_as_tensorflow(name):
    model = loaded(TRAINED_MODELS / name)
    assert model.runtime == "onnxruntime", model.runtime_reason
    assert "matches Keras" in model.runtime_reason
    keras_model = model.keras_model
    rng = np.random.default_rng(3)
    for n in (1, 5, 64):
        images = rng.random((n, 28, 28), dtype=np.float32)
        expected = keras_model(images[..., None] if len(keras_model.input_shape) == 4 else images,
                               training=False).numpy()
        got = model.predict_array(images)
        assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
        assert np.abs(got - expected).max() <= TOLERANCE


def test_runtime_keras_in_config_keeps_tensorflow(tmp_path):
    package = tmp_path / "fashion-mnist"
    shutil.copytree(TRAINED_MODELS / "fashion-mnist", package)
    config = json.loads((package / "config.json").read_text())
    (package / "config.json").write_text(json.dumps({**config, "runtime": "keras"}))
    model = loaded(package)
    assert model.runtime == "keras" and model.properties()["runtime"] == "keras"


def test_a_compiled_graph_that_disagrees_is_refused():
    """The check is what makes compilation safe: against a reference that answers differently, the compiled
    model is refused and the reason says so."""
    model = loaded(TRAINED_MODELS / "fashion-mnist")

    def shifted(images: np.ndarray) -> np.ndarray:
        return np.roll(model.predict_array(images.reshape(len(images), 28, 28)), 1, axis=1)

    compilation = compile_keras(model.keras_model, shifted, model.model_input_shape,
                                model_bytes=model.onnx_bytes)
    assert compilation.model is None
    assert "another label" in compilation.reason
