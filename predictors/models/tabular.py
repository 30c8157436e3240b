"""scikit-learn classifiers over tabular features: one numeric matrix, or one typed tensor per column.

The estimator in ``model.joblib`` is served compiled to ONNX by onnxruntime when the compiled
model answers as the estimator does on the package's probe rows (:mod:`predictors.models.compiled`),
and by scikit-learn otherwise. ``runtime`` in config.json picks: ``auto`` (compiled if it checks,
else scikit-learn, with the reason logged and in the model metadata), ``onnx`` (compiled or fail to
load) or ``sklearn``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import joblib
import numpy as np
import sklearn

from predictors.models.base import PackageModel
from predictors.models.columns import ColumnBatch, Features, TabularSchema
from predictors.models.compiled import Compilation, compile_checked
from predictors.models.probes import NoProbes, learned_categories, load_probes, synthesize
from predictors.package import ONNX_FILE, PackageError
from predictors.protocol.codecs import as_text, require_finite, to_numpy
from predictors.protocol.errors import BadInput
from predictors.protocol.v2 import Tensor

logger = logging.getLogger(__name__)

NUMERIC = ("FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


class TabularModel(PackageModel):
    """Serves a ``model.joblib`` classifier with ``predict_proba``, compiled where that is exact."""

    _predict_proba: Callable[[Features], np.ndarray]

    def load_artifact(self) -> None:
        estimator = self._estimator = joblib.load(self.package.artifact_path)
        self.package.check_artifact(estimator)
        self.schema = TabularSchema.of(self.config.inputs)
        threads = self.context.settings.model_threads
        _limit_threads(threads)
        self._predict_proba = sklearn_predict_proba(estimator, matrix=self.schema.matrix)
        self.runtime, self.runtime_reason = "sklearn", "runtime: sklearn in config.json"
        if self.config.runtime != "sklearn":
            compilation = self._compile(estimator, threads)
            if compilation.model is not None:
                self._predict_proba = compilation.model
                self.runtime, self.runtime_reason = "onnxruntime", compilation.reason
            elif self.config.runtime == "onnx":
                raise PackageError(self.package.path, "config.json", "runtime",
                                   f"runtime 'onnx' asked for, but the model does not compile: {compilation.reason}")
            else:
                self.runtime_reason = f"served by scikit-learn: {compilation.reason}"
                logger.warning("model %s: not compiled, %s", self.name, self.runtime_reason)
        logger.info("model %s: %s (%s)", self.name, self.runtime, self.runtime_reason)
        self.predict_array(self.sample_features())  # warm-up: the first call pays one-off costs

    def _compile(self, estimator: Any, threads: int) -> Compilation:
        probes = load_probes(self.package.path, self.schema, self.config.input.name)
        if probes is None:
            try:
                probes = synthesize(self.schema, estimator)
            except NoProbes as exc:
                return Compilation(None, str(exc))
        onnx_file = self.package.path / ONNX_FILE
        stored = onnx_file.read_bytes() if onnx_file.is_file() else None
        compilation = compile_checked(estimator, self.schema, probes, threads=threads, model_bytes=stored)
        if compilation.model is None and stored is not None:  # a stale model.onnx: compile afresh
            fresh = compile_checked(estimator, self.schema, probes, threads=threads)
            compilation = fresh if fresh.model is not None else Compilation(
                None, f"{compilation.reason}; {fresh.reason}")
        self._probes = probes
        return compilation

    def categories(self) -> dict[str, list[str]]:
        """String column → the categories the fitted encoders know (the browser page offers them)."""
        return learned_categories(self._estimator)

    def sample_features(self) -> Features:
        probes = getattr(self, "_probes", None)
        if probes is not None:
            return probes.rows(0, 1) if isinstance(probes, ColumnBatch) else probes[:1]
        if self.schema.matrix:
            return np.zeros((1, self.schema.n_features))
        return ColumnBatch({c.name: np.array(["" if c.kind == "string" else 0.0], dtype=object if c.kind == "string"
                                             else np.float64) for c in self.schema.columns})

    def batching_refusal(self) -> str | None:
        return None if self.schema.matrix else "column inputs are not merged into one call"

    def sample_batch(self, rows: int) -> Features:
        """Distinct probe rows where the package has enough (a neighbour search or a tree walk may cost
        differently on one row repeated)."""
        probes = getattr(self, "_probes", None)
        if isinstance(probes, np.ndarray) and len(probes) >= rows:
            return probes[:rows]
        return super().sample_batch(rows)

    def predict_array(self, features: Features) -> np.ndarray:
        return self._predict_proba(features)

    async def decode_inputs(self, by_name: dict[str, Tensor]) -> Features:
        if self.schema.matrix:
            return await self.decode_features(by_name[self.config.input.name])
        arrays = {spec.name: _column(by_name[spec.name], spec.datatype) for spec in self.config.inputs}
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise BadInput(f"columns must have the same number of rows, got {lengths}")
        return ColumnBatch(arrays)

    async def decode_features(self, tensor: Tensor) -> np.ndarray:
        n_features = self.config.input.shape[-1]
        if tensor.datatype not in NUMERIC:
            raise BadInput(f"input '{tensor.name}' must be a numeric tensor (FP32/FP64), got {tensor.datatype}")
        array = to_numpy(tensor)
        if array.ndim == 1 and array.shape[0] == n_features:
            array = array.reshape(1, n_features)
        if array.ndim != 2 or array.shape[1] != n_features:
            raise BadInput(f"input '{tensor.name}' must have shape [N, {n_features}], got {list(array.shape)}")
        array = array.astype(np.float64)
        require_finite(array, tensor.name)
        return array


def _column(tensor: Tensor, datatype: str) -> np.ndarray:
    """One column: a ``[N]`` or ``[N, 1]`` tensor of the datatype the package declares for it."""
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise BadInput(f"input '{tensor.name}' is a column: shape [N] or [N, 1], got {tensor.shape}")
    if datatype == "BYTES":
        if tensor.datatype != "BYTES":
            raise BadInput(f"input '{tensor.name}' must be BYTES (strings), got {tensor.datatype}")
        return np.array([as_text(v, tensor.name) for v in to_numpy(tensor).ravel()], dtype=object)
    if tensor.datatype not in NUMERIC:
        raise BadInput(f"input '{tensor.name}' must be a numeric tensor ({datatype}), got {tensor.datatype}")
    array = to_numpy(tensor).ravel()
    if datatype.startswith(("INT", "UINT")) and array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0):
        raise BadInput(f"input '{tensor.name}' must hold whole numbers ({datatype})")
    array = array.astype(np.float64)
    require_finite(array, tensor.name)
    return array


def sklearn_predict_proba(estimator: Any, *, matrix: bool) -> Callable[[Features], np.ndarray]:
    """``predict_proba`` without scikit-learn's per-call re-validation of the estimators' parameters, which were
    validated when it was fitted (``skip_parameter_validation``). The answers are the same; the call does less
    Python work. Finiteness is checked again only where it can have changed: a pipeline's later steps see what its
    earlier steps made of the input (a step can overflow finite input to infinity), while a plain estimator sees
    the request's array itself, which decoding has already checked (:func:`_sees_only_the_request`).
    ``matrix``: the features come as one array, else as columns (:class:`ColumnBatch`, handed over as a frame)."""
    config = {"skip_parameter_validation": True, "assume_finite": matrix and _sees_only_the_request(estimator)}

    def predict_proba(batch: Features) -> np.ndarray:
        with sklearn.config_context(**config):
            return estimator.predict_proba(batch if matrix else batch.to_frame())

    return predict_proba


def _sees_only_the_request(estimator: Any) -> bool:
    """A scikit-learn estimator with no estimator or function among its parameters: nothing runs before it that
    could make an infinity out of the checked input."""
    if not type(estimator).__module__.startswith("sklearn."):
        return False
    return not any(_runs_code(value) for value in estimator.get_params(deep=True).values())


def _runs_code(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_runs_code(item) for item in value)
    return callable(value) or hasattr(value, "fit")


def _limit_threads(threads: int) -> None:
    """BLAS and OpenMP (scikit-learn's histogram boosting) use every core by default; on a server each
    call should use ``threads``, leaving the other cores to concurrent requests."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
