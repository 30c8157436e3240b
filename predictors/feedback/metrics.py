"""Classification metrics from a confusion matrix, with scikit-learn's definitions.

Why from the matrix rather than from label lists: the store counts the matrix in SQL
(``GROUP BY true, predicted``), so the report costs O(K²) whatever the number of feedback rows,
and the same function serves one submission, the cumulative totals and a time window.

Per class, precision = TP / predicted, recall = TP / support, F1 = 2·TP / (2·TP + FP + FN), each 0
where its denominator is 0 (scikit-learn's ``zero_division=0``), for every label of labels_file.json.

Two macro averages, named for what they average over:

* ``macro_avg``: the unweighted mean over the classes *present* in the truth or the predictions, as
  ``sklearn.metrics.classification_report(y_true, y_pred, zero_division=0)`` computes it by default.
  A class nobody has given feedback on and the model never predicted has no score yet; counting it
  as 0 would report a perfect model on a few samples as a poor one.
* ``macro_avg_all_labels``: the mean over *all* labels of labels_file.json, absent ones counting as
  0, as scikit-learn does when given ``labels=`` every class. It says how much of the label space
  the feedback has covered well.

The weighted average weights by support (absent classes weigh nothing, so it is the same either way).
Accuracy is the trace over the total; with no feedback at all it is ``None`` (undefined, not 0).
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
    """Macro or weighted average; ``support`` is the total count, ``classes`` how many classes were averaged."""

    precision: float
    recall: float
    f1: float
    support: int
    classes: int


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
    macro_avg_all_labels: AverageMetrics
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

    present = (support + predicted) > 0

    def average(weights: np.ndarray | None, where: np.ndarray | None = None) -> AverageMetrics:
        mask = np.ones(k, dtype=bool) if where is None else where
        classes = int(mask.sum())
        w = None if weights is None else weights[mask]
        if classes == 0 or (w is not None and w.sum() == 0):
            return AverageMetrics(precision=0.0, recall=0.0, f1=0.0, support=total, classes=classes)
        return AverageMetrics(
            precision=float(np.average(precision[mask], weights=w)),
            recall=float(np.average(recall[mask], weights=w)),
            f1=float(np.average(f1[mask], weights=w)),
            support=total,
            classes=classes,
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
        macro_avg=average(None, present),
        macro_avg_all_labels=average(None),
        weighted_avg=average(support.astype(np.float64)),
        confusion_matrix=ConfusionMatrix(labels=list(labels.labels), names=names, matrix=cm.tolist()),
    )


def macro_f1(matrix: np.ndarray) -> float:
    """Macro F1 over the classes present in truth or prediction (``macro_avg.f1`` without the report)."""
    cm = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(cm)
    denominator = cm.sum(axis=1) + cm.sum(axis=0)
    present = denominator > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / denominator[present]))


def confusion_from_pairs(pairs: list[tuple[int, int]], k: int) -> np.ndarray:
    """KxK matrix of (true, predicted) pairs whose labels are 0..K-1 (checked by the caller)."""
    cm = np.zeros((k, k), dtype=np.int64)
    if pairs:
        arr = np.asarray(pairs, dtype=np.int64)
        np.add.at(cm, (arr[:, 0], arr[:, 1]), 1)
    return cm
