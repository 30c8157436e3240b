"""Keras image classifiers compiled to ONNX and run by onnxruntime, admitted only if they answer as Keras does.

A small convolutional network's call through TensorFlow costs more in TensorFlow's own dispatch than
in arithmetic, and onnxruntime runs the same graph with far less around it. The model is exported
with Keras's own ONNX export, and the compiled model serves only if it gives the same labels and
probabilities (within :data:`~predictors.models.compiled.TOLERANCE`) as the TensorFlow function on probe
images: random pictures and the blank extremes. Otherwise TensorFlow serves, and the reason is reported.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from predictors.models.compiled import Candidate, Compilation, CompileError, first_agreeing, first_line

PROBE_IMAGES = 64


def probe_images(shape: tuple[int, ...], count: int = PROBE_IMAGES, seed: int = 0) -> np.ndarray:
    """Images in the model's [0, 1] scale: uniform noise, smooth gradients, and all-black and all-white."""
    rng = np.random.default_rng(seed)
    noise = rng.random((count, *shape), dtype=np.float32)
    ramps = np.linspace(0.0, 1.0, count, dtype=np.float32).reshape(count, *([1] * len(shape)))
    smooth = np.clip(ramps + 0.2 * rng.standard_normal((count, *shape)).astype(np.float32), 0, 1)
    extremes = np.stack([np.zeros(shape, np.float32), np.ones(shape, np.float32)])
    return np.concatenate([noise, smooth, extremes])


def export_onnx(keras_model: Any) -> bytes:
    """The model as an ONNX graph, through ``keras.Model.export(format="onnx")``."""
    with tempfile.TemporaryDirectory() as work, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(work) / "model.onnx"
        try:
            keras_model.export(str(path), format="onnx", verbose=False)
        except Exception as exc:  # the exporter raises whatever its converter does for an op it lacks
            raise CompileError(f"Keras cannot export the model to ONNX: {first_line(exc)}") from exc
        return path.read_bytes()


def compile_keras(keras_model: Any, reference: Callable[[np.ndarray], np.ndarray], input_shape: tuple[int, ...], *,
                  threads: int = 1, model_bytes: bytes | None = None) -> Compilation:
    """The checked compiled model: ``model_bytes`` (a package's ``model.onnx``) if given and it agrees, else a
    fresh export. ``reference`` is the served TensorFlow function, ``input_shape`` the model's own (no batch)."""
    probes = probe_images(input_shape)
    expected = np.asarray(reference(probes), dtype=np.float64)
    candidates: list[Candidate] = [("fresh export", lambda: export_onnx(keras_model))]
    if model_bytes is not None:
        candidates.insert(0, ("the package's model.onnx", lambda: model_bytes))
    return first_agreeing(candidates, probes, expected, schema=None, threads=threads, original="Keras",
                          rows="probe images")
