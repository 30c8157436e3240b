"""scikit-learn classifiers compiled to ONNX and run by onnxruntime, admitted only if they answer as the estimator.

scikit-learn validates its input and walks Python on every call, so a one-row ``predict_proba``
costs far more than its arithmetic (a forest visits each tree from Python). The same fitted model
as an ONNX graph runs in onnxruntime's C++ kernels. Conversion is not exact for every model: tree
thresholds are float32 in scikit-learn, neighbour ties may break differently, and a custom
transformer has no converter at all. So a compiled model is served only if it reproduces the
estimator's labels and probabilities on probe rows (:data:`TOLERANCE`); otherwise the estimator
serves and :class:`Compilation` says why. Numeric inputs are tried in double precision first (exact
for linear models, scalers, naive Bayes), then in float (what scikit-learn's trees compute in).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from predictors.models.columns import ColumnBatch, Features, TabularSchema

logger = logging.getLogger(__name__)

TOLERANCE = 1e-5
"""Largest difference in any class probability between the compiled model and the estimator."""
OPSETS = {"": 17, "ai.onnx.ml": 3}
_NUMPY_TYPES = {"tensor(double)": np.float64, "tensor(float)": np.float32, "tensor(int64)": np.int64,
                "tensor(string)": object}


class CompileError(Exception):
    """The estimator could not be converted, or the graph does not load in onnxruntime."""


class OnnxClassifier:
    """A classifier's ONNX graph in an onnxruntime session: features in, class probabilities ``[N, K]`` out.

    ``schema`` None means one input tensor (an image batch), fed as it comes."""

    def __init__(self, model_bytes: bytes, schema: TabularSchema | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise CompileError(f"onnxruntime cannot load the graph: {first_line(exc)}") from exc
        self.model_bytes = model_bytes
        self.schema = schema
        inputs = self._session.get_inputs()
        self._input_types = {i.name: _NUMPY_TYPES.get(i.type, np.float32) for i in inputs}
        self._matrix_name = inputs[0].name if schema is None or schema.matrix else None
        outputs = [o.name for o in self._session.get_outputs()]
        self._outputs = ["probabilities" if "probabilities" in outputs else outputs[-1]]
        self.precision = "double" if np.float64 in self._input_types.values() else "float"

    def __call__(self, features: Features) -> np.ndarray:
        if self._matrix_name is not None:
            feeds = {self._matrix_name: np.asarray(features, dtype=self._input_types[self._matrix_name])}
        else:
            assert isinstance(features, ColumnBatch)
            feeds = {name: array.reshape(-1, 1).astype(self._input_types[name], copy=False)
                     for name, array in features.arrays.items()}
        return self._session.run(self._outputs, feeds)[0]


@dataclass(frozen=True)
class Compilation:
    """The outcome of compiling one estimator: the checked compiled model, or None and the reason."""

    model: OnnxClassifier | None
    reason: str


def convert(estimator: Any, schema: TabularSchema, precision: str) -> bytes:
    """The estimator as a serialized ONNX graph (skl2onnx), inputs typed by ``schema``."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, StringTensorType

    number = DoubleTensorType if precision == "double" else FloatTensorType
    if schema.matrix:
        types = [("input", number([None, schema.n_features]))]
    else:
        types = [(c.name, StringTensorType([None, 1]) if c.kind == "string" else number([None, 1]))
                 for c in schema.columns]
    try:
        graph = to_onnx(estimator, initial_types=types, options={id(estimator): {"zipmap": False}},
                        target_opset=OPSETS)
    except Exception as exc:  # skl2onnx raises RuntimeError, NotImplementedError, MissingShapeCalculator, ...
        raise CompileError(f"skl2onnx cannot convert {type(estimator).__name__}: {first_line(exc)}") from exc
    return graph.SerializeToString()


def check(model: OnnxClassifier, estimator: Any, probes: Features) -> str | None:
    """None if ``model`` gives the estimator's labels and probabilities on ``probes``, else what differs."""
    sklearn_input = probes.to_frame() if isinstance(probes, ColumnBatch) else probes
    return agreement(model, probes, np.asarray(estimator.predict_proba(sklearn_input), dtype=np.float64))


def agreement(model: OnnxClassifier, probes: Features, expected: np.ndarray) -> str | None:
    """None if ``model`` gives ``expected`` (the original's probabilities) on ``probes``: the same label for
    every row and every probability within :data:`TOLERANCE`; else what differs."""
    try:
        got = np.asarray(model(probes), dtype=np.float64)
    except Exception as exc:  # a graph that loads may still fail on real rows
        return f"onnxruntime failed on the probe rows: {first_line(exc)}"
    if got.shape != expected.shape:
        return f"probabilities of shape {list(got.shape)}, the estimator gives {list(expected.shape)}"
    labels = (got.argmax(axis=1) != expected.argmax(axis=1)).sum()
    if labels:
        return f"{labels} of {len(expected)} probe rows get another label"
    worst = float(np.abs(got - expected).max())
    if not worst <= TOLERANCE:
        return f"probabilities differ by up to {worst:.2g} (tolerance {TOLERANCE:g})"
    return None


def compile_checked(estimator: Any, schema: TabularSchema, probes: Features, *, threads: int = 1,
                    model_bytes: bytes | None = None) -> Compilation:
    """The first compiled form that passes :func:`check`: ``model_bytes`` if given (a package's
    ``model.onnx``), else a fresh conversion in each precision of :func:`_candidates`."""
    sklearn_input = probes.to_frame() if isinstance(probes, ColumnBatch) else probes
    expected = np.asarray(estimator.predict_proba(sklearn_input), dtype=np.float64)
    return first_agreeing(_candidates(estimator, schema, model_bytes), probes, expected, schema=schema,
                          threads=threads, original="the estimator", rows="probe rows")


Candidate = tuple[str, Callable[[], bytes]]
"""A compiled form to try: its name in the reason, and how to build its graph."""


def first_agreeing(candidates: list[Candidate], probes: Features, expected: np.ndarray, *,
                   schema: TabularSchema | None, threads: int, original: str, rows: str) -> Compilation:
    """The first candidate whose graph loads and gives ``expected`` (the original's probabilities) on
    ``probes`` (:func:`agreement`); else no model, and every candidate's reason."""
    failures = []
    for label, build in candidates:
        try:
            model = OnnxClassifier(build(), schema, threads)
        except CompileError as exc:
            failures.append(f"{label}: {exc}")
            continue
        mismatch = agreement(model, probes, expected)
        if mismatch is None:
            return Compilation(model, f"compiled to ONNX ({label}); matches {original} on {len(probes)} {rows}")
        failures.append(f"{label}: {mismatch}")
    return Compilation(None, "; ".join(failures))


def _candidates(estimator: Any, schema: TabularSchema, model_bytes: bytes | None) -> list[Candidate]:
    """Compiled forms to try, most exact first. A pipeline's steps compute in float64 while a final tree
    ensemble compares float32 features, as scikit-learn does: hence double precision with a cast to float32
    before the last step."""
    if model_bytes is not None:
        return [("the package's model.onnx", lambda: model_bytes)]
    candidates = [("double precision", lambda: convert(estimator, schema, "double"))]
    if hasattr(estimator, "steps") and len(estimator.steps) > 1:
        candidates.append(("double precision, float32 into the final estimator",
                           lambda: convert(_cast_before_last_step(estimator), schema, "double")))
    candidates.append(("float precision", lambda: convert(estimator, schema, "float")))
    return candidates


def _cast_before_last_step(pipeline: Any) -> Any:
    from skl2onnx.sklapi import CastTransformer
    from sklearn.pipeline import Pipeline

    cast = CastTransformer(dtype=np.float32).fit(np.zeros((1, 1)))
    return Pipeline([*pipeline.steps[:-1], ("float32", cast), pipeline.steps[-1]])


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
