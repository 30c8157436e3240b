"""scikit-learn classifiers over tabular features (Iris: FP32/FP64 ``[N, 4]``)."""

from __future__ import annotations

import joblib
import numpy as np

from predictors.codecs import require_finite, to_numpy
from predictors.errors import BadInput
from predictors.models.base import PackageModel
from predictors.v2 import Tensor

NUMERIC = ("FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


class TabularModel(PackageModel):
    """Serves a ``model.joblib`` estimator with ``predict_proba``."""

    estimator = None

    def load_artifact(self) -> None:
        estimator = joblib.load(self.package.artifact_path)
        self.package.check_artifact(estimator)
        self.estimator = estimator
        n_features = self.config.input.shape[-1]
        self.predict_array(np.zeros((1, n_features)))  # warm-up: first call pays import/validation costs

    def predict_array(self, features: np.ndarray) -> np.ndarray:
        return self.estimator.predict_proba(features)

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
