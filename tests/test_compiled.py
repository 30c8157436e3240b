"""The closed-form predict_proba for linear classifiers: used only where it reproduces the estimator."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier

from predictors.models.compiled import compile_predict_proba


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    return load_iris(return_X_y=True)


@pytest.mark.parametrize("classes", [3, 2], ids=["multiclass", "binary"])
def test_the_closed_form_gives_the_estimators_probabilities(iris, classes):
    x, y = iris
    keep = y < classes
    estimator = LogisticRegression(max_iter=1000).fit(x[keep], y[keep])
    compiled = compile_predict_proba(estimator, 4)
    assert compiled is not None
    rows = np.vstack([x, np.random.default_rng(1).normal(0, 50, (200, 4))])
    np.testing.assert_allclose(compiled(rows), estimator.predict_proba(rows), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(compiled(rows[:1]), estimator.predict_proba(rows[:1]), rtol=1e-12, atol=1e-15)


def test_other_estimators_keep_their_own_predict_proba(iris):
    x, y = iris

    class Tempered(LogisticRegression):
        def predict_proba(self, features: np.ndarray) -> np.ndarray:
            return super().predict_proba(features / 2)

    assert compile_predict_proba(DecisionTreeClassifier().fit(x, y), 4) is None
    assert compile_predict_proba(Tempered(max_iter=1000).fit(x, y), 4) is None


def test_a_formula_that_does_not_match_the_estimator_is_not_used(iris, monkeypatch):
    """The probe check is what makes the formula safe: break the formula and it must be refused."""
    x, y = iris
    estimator = LogisticRegression(max_iter=1000).fit(x, y)

    def predict_proba_of_scaled_rows(rows: np.ndarray) -> np.ndarray:
        return LogisticRegression.predict_proba(estimator, rows * 1.001)

    monkeypatch.setattr(estimator, "predict_proba", predict_proba_of_scaled_rows)
    assert compile_predict_proba(estimator, 4) is None
