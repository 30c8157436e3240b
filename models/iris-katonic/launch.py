"""A Katonic-style custom model: the three functions Katonic's custom-model template asks for.

This file is user code: it does not import anything from this project, so it runs
unchanged on Katonic and behind our KServe predictor (``framework: katonic``).
"""

import os

import joblib
import numpy as np

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")


def loadmodel(logger):
    """Load the fitted scikit-learn pipeline that sits next to this file."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.joblib")
    logger.info("loading model from %s", path)
    return joblib.load(path)


def preprocessing(data, logger):
    """Rows of measurements (validated by schema.py) -> feature matrix; False rejects the input."""
    try:
        features = np.array([[float(row[name]) for name in FEATURES] for row in data], dtype=float)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("rejecting input: %s", exc)
        return False
    if features.size == 0 or (features <= 0).any():
        logger.warning("rejecting input: measurements must be positive")
        return False
    return features


def predict(features, model, logger):
    """Class probabilities, one row per input row, columns in labels_file.json order."""
    return model.predict_proba(features).tolist()
