"""scikit-learn classifiers over tabular features (Iris: FP32/FP64 ``[N, 4]``)."""

from __future__ import annotations

import logging

import joblib
import numpy as np

from predictors.models.base import PackageModel
from predictors.models.compiled import PredictProba, compile_predict_proba
from predictors.protocol.codecs import require_finite, to_numpy
from predictors.protocol.errors import BadInput
from predictors.protocol.v2 import Tensor

logger = logging.getLogger(__name__)

NUMERIC = ("FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


class TabularModel(PackageModel):
    """Serves a ``model.joblib`` estimator with ``predict_proba`` (its closed form where one is exact)."""

    _predict_proba: PredictProba

    def load_artifact(self) -> None:
        estimator = joblib.load(self.package.artifact_path)
        self.package.check_artifact(estimator)
        n_features = self.config.input.shape[-1]
        compiled = compile_predict_proba(estimator, n_features)
        self._predict_proba = compiled or estimator.predict_proba
        logger.info("model %s: predict_proba %s", self.name,
                    "in closed form (matches the estimator)" if compiled else "by the estimator")
        self.predict_array(np.zeros((1, n_features)))  # warm-up: first call pays import/validation costs

    def predict_array(self, features: np.ndarray) -> np.ndarray:
        return self._predict_proba(features)

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
