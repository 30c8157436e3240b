"""The compiled scikit-learn runtime: every kind of model a user brings is served with the estimator's answers.

Each zoo model is fitted here, compiled with the package's probe rows, and then compared with the
estimator on rows the check never saw. A model that does not compile (a custom transformer) or whose
compiled form disagrees is served by scikit-learn, with the reason.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_iris
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from sklearn.svm import SVC
from sklearn.tree import DecisionTreeClassifier

from predictors.models.columns import ColumnBatch, TabularSchema
from predictors.models.compiled import TOLERANCE, check, compile_checked
from predictors.models.probes import synthesize
from predictors.models.tabular import sklearn_predict_proba
from predictors.package import TensorSpec

ZOO = {
    "pipeline-logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
    "logistic": lambda: LogisticRegression(max_iter=1000),
    "decision-tree": lambda: DecisionTreeClassifier(random_state=0),
    "random-forest": lambda: RandomForestClassifier(100, random_state=0),
    "extra-trees": lambda: ExtraTreesClassifier(50, random_state=0),
    "gradient-boosting": lambda: GradientBoostingClassifier(random_state=0),
    "hist-gradient-boosting": lambda: HistGradientBoostingClassifier(max_iter=100, random_state=0),
    "svc": lambda: SVC(probability=True, random_state=0),
    "naive-bayes": lambda: GaussianNB(),
    "pipeline-forest": lambda: make_pipeline(StandardScaler(), RandomForestClassifier(30, random_state=0)),
}
MATRIX = TabularSchema.of([TensorSpec(name="input-0", datatype="FP32", shape=[-1, 4])])


@pytest.fixture(scope="module")
def iris() -> tuple[np.ndarray, np.ndarray]:
    return load_iris(return_X_y=True)


def unseen_rows(x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.vstack([x + rng.normal(0, 0.2, x.shape), rng.uniform(-5, 15, (300, 4))])


def assert_same_answers(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert np.abs(got - expected).max() <= TOLERANCE


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_each_zoo_model_compiles_and_answers_as_the_estimator(iris, kind):
    x, y = iris
    estimator = ZOO[kind]().fit(x, y)
    compilation = compile_checked(estimator, MATRIX, x)
    assert compilation.model is not None, compilation.reason
    assert "matches the estimator" in compilation.reason
    rows = unseen_rows(x)
    assert_same_answers(np.asarray(compilation.model(rows), dtype=np.float64), estimator.predict_proba(rows))
    assert_same_answers(np.asarray(compilation.model(rows[:1]), dtype=np.float64), estimator.predict_proba(rows[:1]))


@pytest.mark.parametrize("kind", [*sorted(ZOO), "k-neighbours", "custom-transformer"])
def test_the_scikit_learn_runtime_answers_exactly_as_the_estimator(iris, kind):
    """What is served by scikit-learn (a fallback, or runtime: sklearn) skips scikit-learn's re-validation of
    parameters: the answers must be bit for bit the estimator's."""
    x, y = iris
    make = {**ZOO, "k-neighbours": lambda: KNeighborsClassifier(5),
            "custom-transformer": lambda: Pipeline([("double", FunctionTransformer(np.square)),
                                                    ("clf", LogisticRegression(max_iter=1000))])}[kind]
    estimator = make().fit(x, y)
    served = sklearn_predict_proba(estimator, matrix=True)
    for rows in (unseen_rows(x), x[:1]):
        assert np.array_equal(served(rows), estimator.predict_proba(rows))


def test_only_a_plain_scikit_learn_estimator_skips_the_finiteness_check(iris):
    """Decoding refuses non-finite input, so a plain estimator (which sees that input itself) need not check it
    again; a pipeline, an estimator with a function parameter and a class of the user's own keep the check."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    from predictors.models.tabular import _sees_only_the_request

    class OwnClassifier(ClassifierMixin, BaseEstimator):
        pass

    assert _sees_only_the_request(KNeighborsClassifier(5))
    assert _sees_only_the_request(LogisticRegression())
    assert not _sees_only_the_request(make_pipeline(StandardScaler(), LogisticRegression()))
    assert not _sees_only_the_request(KNeighborsClassifier(5, weights=lambda d: 1 / d))
    assert not _sees_only_the_request(OwnClassifier())


def test_the_scikit_learn_runtime_refuses_what_the_estimator_refuses(iris):
    """Finite input a pipeline step overflows to infinity: scikit-learn's check on the next step must still refuse
    it (the server answers that request alone with an error), not hand back NaN probabilities."""
    x, y = iris
    estimator = Pipeline([("square", FunctionTransformer(np.square)), ("clf", LogisticRegression(max_iter=1000))])
    estimator.fit(x, y)
    overflowing = np.full((1, 4), 1e200)
    with pytest.raises(ValueError, match="infinity"):
        estimator.predict_proba(overflowing)
    with pytest.raises(ValueError, match="infinity"):
        sklearn_predict_proba(estimator, matrix=True)(overflowing)


def test_synthesised_probes_suffice_for_a_package_without_stored_ones(iris):
    x, y = iris
    estimator = make_pipeline(StandardScaler(), GradientBoostingClassifier(random_state=0)).fit(x, y)
    compilation = compile_checked(estimator, MATRIX, synthesize(MATRIX, estimator))
    assert compilation.model is not None, compilation.reason
    assert_same_answers(np.asarray(compilation.model(x), dtype=np.float64), estimator.predict_proba(x))


def test_neighbours_that_tie_are_not_compiled_when_the_probes_show_it(iris):
    """Iris repeats rows, so k-nearest neighbours meet distance ties that onnxruntime breaks its own way: on
    the training rows as probes the compiled model gives other probabilities and scikit-learn keeps serving."""
    x, y = iris
    estimator = KNeighborsClassifier(5).fit(x, y)
    compilation = compile_checked(estimator, MATRIX, x)
    if compilation.model is None:
        assert "differ" in compilation.reason or "label" in compilation.reason
    else:  # no tie broke differently: then it must really agree on unseen rows too
        rows = unseen_rows(x)
        assert_same_answers(np.asarray(compilation.model(rows), dtype=np.float64), estimator.predict_proba(rows))


def test_a_custom_transformer_is_served_by_scikit_learn_with_the_reason(iris):
    x, y = iris
    estimator = Pipeline([("double", FunctionTransformer(np.square)), ("clf", LogisticRegression(max_iter=1000))])
    estimator.fit(x, y)
    compilation = compile_checked(estimator, MATRIX, x)
    assert compilation.model is None
    assert "FunctionTransformer" in compilation.reason


def test_a_compiled_model_that_disagrees_is_refused(iris, monkeypatch):
    """The check is what makes compilation safe: make the estimator answer differently and it must fail."""
    x, y = iris
    estimator = LogisticRegression(max_iter=1000).fit(x, y)
    compiled = compile_checked(estimator, MATRIX, x).model
    assert compiled is not None
    monkeypatch.setattr(estimator, "predict_proba",
                        lambda rows: LogisticRegression.predict_proba(estimator, rows * 1.01))
    assert check(compiled, estimator, x) is not None


def test_a_column_transformer_with_string_categories_compiles():
    rng = np.random.default_rng(0)
    n = 400
    frame = pd.DataFrame({"age": rng.integers(18, 80, n).astype(float), "income": rng.normal(50, 15, n),
                          "city": rng.choice(["paris", "rome", "oslo"], n), "plan": rng.choice(["basic", "pro"], n)})
    y = np.where((frame.age > 40) & (frame.city != "rome"), "churn", "stay")
    for final in (LogisticRegression(max_iter=1000), RandomForestClassifier(40, random_state=0)):
        estimator = Pipeline([
            ("columns", ColumnTransformer([("num", StandardScaler(), ["age", "income"]),
                                           ("cat", OneHotEncoder(handle_unknown="ignore"), ["city", "plan"])])),
            ("clf", final)]).fit(frame, y)
        schema = TabularSchema.of([TensorSpec(name="age", datatype="FP64", shape=[-1]),
                                   TensorSpec(name="income", datatype="FP64", shape=[-1]),
                                   TensorSpec(name="city", datatype="BYTES", shape=[-1]),
                                   TensorSpec(name="plan", datatype="BYTES", shape=[-1])])
        batch = ColumnBatch({c: frame[c].to_numpy(dtype=object if frame[c].dtype == object else np.float64)
                             for c in frame.columns})
        compilation = compile_checked(estimator, schema, batch.rows(0, 200))
        assert compilation.model is not None, compilation.reason
        unseen = batch.rows(200, 400)
        assert_same_answers(np.asarray(compilation.model(unseen), dtype=np.float64),
                            estimator.predict_proba(unseen.to_frame()))
        synthetic = synthesize(schema, estimator)  # categories come from the fitted encoder
        assert set(synthetic.arrays["city"]) <= {"paris", "rome", "oslo"}
