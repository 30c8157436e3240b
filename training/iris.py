"""Iris: a logistic regression tuned by grid search, packaged for the tabular predictor.

Protocol (all seeded): the 150 rows are split 3:1:1 into train / validation / test, stratified
by class (90/30/30). ``GridSearchCV`` cross-validates the grid over ``C``, ``max_iter``,
``class_weight`` and ``solver`` on the training rows only. Iris is so easy that many candidates
tie on cross-validated accuracy, so the validation rows break the tie among the top-ranked ones
(grid order breaks any tie that remains). The test rows are touched once, for the final score,
and written to ``test.csv`` so the streaming producer can replay labelled traffic.

The shipped model is the selected candidate fitted on the training rows, so the validation and
test numbers in ``metrics.json`` describe exactly the artifact in the package.
"""

from __future__ import annotations

import csv
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split

from predictors.package import (
    FORMAT_VERSION,
    Batching,
    LabelsFile,
    ModelPackage,
    PackageConfig,
    TensorSpec,
    save_package,
)
from training import reports
from training.datasets import Tabular, load_iris

NAME = "iris"
TEST_CSV = "test.csv"
ARTIFACT = "model.joblib"
SEARCHED_PARAMS = ("C", "max_iter", "class_weight", "solver")

PARAM_GRID: dict[str, list[Any]] = {
    "C": [0.01, 0.1, 1.0, 10.0, 100.0],
    "max_iter": [100, 1000, 5000],
    "class_weight": [None, "balanced"],
    "solver": ["lbfgs", "newton-cg", "sag", "saga"],
}
QUICK_PARAM_GRID: dict[str, list[Any]] = {
    "C": [0.1, 10.0],
    "max_iter": [500],
    "class_weight": [None, "balanced"],
    "solver": ["lbfgs"],
}


@dataclass(frozen=True)
class Split:
    """Row indices into the full data set for each part; disjoint and together all rows."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def split_3_1_1(y: np.ndarray, seed: int) -> Split:
    """Stratified 3:1:1 split of row indices: test is 1/5 of all rows, validation 1/4 of the rest."""
    rows = np.arange(len(y))
    rest, test = train_test_split(rows, test_size=0.2, stratify=y, random_state=seed)
    train, validation = train_test_split(rest, test_size=0.25, stratify=y[rest], random_state=seed)
    return Split(np.sort(train), np.sort(validation), np.sort(test))


def grid_search(x: np.ndarray, y: np.ndarray, grid: dict[str, list[Any]], seed: int, folds: int = 5) -> GridSearchCV:
    """Cross-validate every combination in ``grid`` on (x, y); no refit (selection happens after)."""
    search = GridSearchCV(
        LogisticRegression(random_state=seed), grid, scoring="accuracy", refit=False, error_score="raise",
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed), n_jobs=1)
    with warnings.catch_warnings():
        # small max_iter values are in the grid on purpose; not converging is a result, not news
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(x, y)
    return search


def select_on_validation(
    search: GridSearchCV, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int
) -> tuple[LogisticRegression, dict[str, Any], float, int]:
    """Among the candidates ranked first by cross-validation, the one most accurate on validation.

    A candidate whose solver converged beats an equally accurate one that hit ``max_iter``; grid
    order settles what is still tied. Returns the fitted model, its params, its validation
    accuracy and how many candidates tied on cross-validation.
    """
    results = search.cv_results_
    top = [i for i, rank in enumerate(results["rank_test_score"]) if rank == 1]
    best: tuple[LogisticRegression, dict[str, Any], float] | None = None
    best_key = (-1.0, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for i in top:
            params = dict(results["params"][i])
            model = LogisticRegression(random_state=seed, **params).fit(x_train, y_train)
            acc = float(model.score(x_val, y_val))
            key = (acc, bool(np.all(model.n_iter_ < params["max_iter"])))
            if key > best_key:
                best, best_key = (model, params, acc), key
    assert best is not None  # rank 1 always exists
    return best[0], best[1], best[2], len(top)


def write_test_csv(path: Path, data: Tabular, rows: np.ndarray) -> Path:
    """The held-out rows with their true labels: feature columns, ``label`` (encoded id), ``label_name``."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*data.feature_names, "label", "label_name"])
        for r in rows:
            label = int(data.y[r])
            writer.writerow([*(f"{v:g}" for v in data.x[r]), label, data.class_names[label]])
    return path


def package_config(data: Tabular, version: str = "1") -> PackageConfig:
    n = data.x.shape[1]
    return PackageConfig(
        format_version=FORMAT_VERSION, name=NAME, version=version, framework="sklearn",
        task="tabular_classification", artifact=ARTIFACT,
        description="Iris species from four flower measurements (cm): scikit-learn LogisticRegression "
                    "tuned with GridSearchCV.",
        inputs=[TensorSpec(name="input-0", datatype="FP32", shape=[-1, n])],
        feature_names=list(data.feature_names),
        # Batching off: an Iris row is microseconds of work, so merging concurrent requests saves less than
        # the batcher's hand-offs cost; without a window the server answers as many requests or more, at the
        # same or less CPU, over gRPC and REST alike. The streaming bridge merges its requests into
        # multi-row calls itself.
        batching=Batching(max_batch_size=1),
    )


def train_iris(out: str | Path, *, quick: bool = False, seed: int = 0, folds: int = 5) -> ModelPackage:
    """Run the whole Iris pipeline and write the package to ``out``; returns the loaded package."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_iris()
    split = split_3_1_1(data.y, seed)
    grid = QUICK_PARAM_GRID if quick else PARAM_GRID
    x_tr, y_tr = data.x[split.train], data.y[split.train]
    x_va, y_va = data.x[split.validation], data.y[split.validation]
    x_te, y_te = data.x[split.test], data.y[split.test]

    wall, cpu = time.perf_counter(), time.process_time()
    search = grid_search(x_tr, y_tr, grid, seed, folds=3 if quick else folds)
    model, params, val_acc, tied = select_on_validation(search, x_tr, y_tr, x_va, y_va, seed)
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu

    joblib.dump(model, out / ARTIFACT)
    write_test_csv(out / TEST_CSV, data, split.test)
    test = reports.classification_report(y_te, model.predict(x_te), data.class_names)
    reports.plot_confusion_matrix(test["confusion_matrix"], data.class_names, out / reports.CONFUSION_PNG,
                                  title="Iris: confusion matrix (test set)")
    searched = sorted({k for p in search.cv_results_["params"] for k in p})
    metrics: dict[str, Any] = {
        "model": NAME,
        "accuracy": test["accuracy"],
        "validation": {"accuracy": val_acc},
        "test": test,
        "dataset": {"name": "iris", "source": "scikit-learn load_iris", "split": "3:1:1 stratified",
                    "sizes": split.sizes(), "test_csv": TEST_CSV},
        "search": {
            "estimator": "LogisticRegression",
            "param_grid": grid,
            "searched_params": searched,
            "n_candidates": len(search.cv_results_["params"]),
            "cv_folds": search.n_splits_,
            "cv_best_accuracy": float(search.best_score_),
            "tied_at_best_cv": tied,
            "selection": ("best mean CV accuracy on train; ties broken by validation accuracy, "
                          "then by solver convergence, then grid order"),
            "best_params": params,
        },
        "training_seconds": round(seconds, 3),
        "training_cpu_seconds": round(cpu_seconds, 3),
        "seed": seed,
        "quick": quick,
        "environment": reports.environment(),
    }
    labels = LabelsFile(labels=list(range(len(data.class_names))), names=list(data.class_names))
    return save_package(out, package_config(data), labels, metrics)
