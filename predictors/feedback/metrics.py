"""Classification metrics from a confusion matrix, with scikit-learn's definitions.

Why from the matrix rather than from label lists: the store counts the matrix in SQL
(``GROUP BY true, predicted``), so the report costs O(K²) whatever the number of feedback rows,
and the same function serves one submission, the cumulative totals and a time window.

The numbers match ``sklearn.metrics.classification_report(y_true, y_pred, labels=all K labels,
zero_division=0, output_dict=True)``: per class, precision = TP / predicted, recall = TP / support,
F1 = 2·TP / (2·TP + FP + FN), each 0 where its denominator is 0; the macro average is the
unweighted mean over *all* labels of labels_file.json (classes never seen count as 0, exactly as
scikit-learn does when given ``labels=``); the weighted average weights by support. Accuracy is
the trace over the total; with no feedback at all it is ``None`` (undefined, not 0).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from predictors.package import LabelsFile


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class ClassMetrics(_Frozen):
    """Precision, recall, F1 and support of one class."""

    label: int
    name: str
    precision: float
    recall: float
    f1: float
    support: int


class AverageMetrics(_Frozen):
    """Macro or weighted average over all classes; ``support`` is the total count."""

    precision: float
    recall: float
    f1: float
    support: int


class ConfusionMatrix(_Frozen):
    """``matrix[i][j]``: feedback with true label ``labels[i]`` that was predicted as ``labels[j]``."""

    labels: list[int]
    names: list[str]
    matrix: list[list[int]]


class ClassificationMetrics(_Frozen):
    """The report returned by the feedback API."""

    count: int
    accuracy: float | None
    per_class: list[ClassMetrics]
    macro_avg: AverageMetrics
    weighted_avg: AverageMetrics
    confusion_matrix: ConfusionMatrix


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise division that yields 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def compute_metrics(matrix: np.ndarray, labels: LabelsFile) -> ClassificationMetrics:
    """The classification report of a KxK confusion matrix over exactly the labels of ``labels``.

    Rows are true labels, columns predicted labels, both in the order of ``labels.labels``.
    """
    cm = np.asarray(matrix)
    k = len(labels.labels)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix has shape {cm.shape}, labels_file.json has {k} labels")
    if cm.size and (cm.min() < 0 or not np.issubdtype(cm.dtype, np.integer)):
        raise ValueError("a confusion matrix holds non-negative integer counts")
    cm = cm.astype(np.int64)

    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    total = int(cm.sum())

    precision = _safe_divide(tp, predicted.astype(np.float64))
    recall = _safe_divide(tp, support.astype(np.float64))
    f1 = _safe_divide(2 * tp, (support + predicted).astype(np.float64))  # 2TP+FP+FN == support+predicted

    def average(weights: np.ndarray | None) -> AverageMetrics:
        if weights is not None and weights.sum() == 0:
            return AverageMetrics(precision=0.0, recall=0.0, f1=0.0, support=total)
        return AverageMetrics(
            precision=float(np.average(precision, weights=weights)),
            recall=float(np.average(recall, weights=weights)),
            f1=float(np.average(f1, weights=weights)),
            support=total,
        )

    names = [labels.name_of(label) for label in labels.labels]
    return ClassificationMetrics(
        count=total,
        accuracy=float(tp.sum() / total) if total else None,
        per_class=[
            ClassMetrics(label=label, name=names[i], precision=float(precision[i]), recall=float(recall[i]),
                         f1=float(f1[i]), support=int(support[i]))
            for i, label in enumerate(labels.labels)
        ],
        macro_avg=average(None),
        weighted_avg=average(support.astype(np.float64)),
        confusion_matrix=ConfusionMatrix(labels=list(labels.labels), names=names, matrix=cm.tolist()),
    )


def confusion_from_pairs(pairs: list[tuple[int, int]], k: int) -> np.ndarray:
    """KxK matrix of (true, predicted) pairs whose labels are 0..K-1 (checked by the caller)."""
    cm = np.zeros((k, k), dtype=np.int64)
    if pairs:
        arr = np.asarray(pairs, dtype=np.int64)
        np.add.at(cm, (arr[:, 0], arr[:, 1]), 1)
    return cm
