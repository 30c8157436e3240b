"""compute_metrics agrees with scikit-learn's classification_report / confusion_matrix."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

from predictors.feedback import compute_metrics
from predictors.feedback.metrics import confusion_from_pairs, macro_f1
from predictors.package import LabelsFile


def _labels(k: int, names: bool = True) -> LabelsFile:
    return LabelsFile(labels=list(range(k)), names=[f"class-{i}" for i in range(k)] if names else None)


def _check_against_sklearn(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> None:
    labels = _labels(k)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    ours = compute_metrics(cm, labels)
    report = classification_report(y_true, y_pred, labels=list(range(k)), target_names=labels.names,
                                    output_dict=True, zero_division=0)

    assert ours.count == len(y_true)
    assert ours.accuracy == pytest.approx(accuracy_score(y_true, y_pred))
    assert ours.confusion_matrix.matrix == cm.tolist()
    assert ours.confusion_matrix.labels == list(range(k))
    assert ours.confusion_matrix.names == labels.names
    for cls in ours.per_class:
        expected = report[cls.name]
        assert cls.precision == pytest.approx(expected["precision"]), cls.name
        assert cls.recall == pytest.approx(expected["recall"]), cls.name
        assert cls.f1 == pytest.approx(expected["f1-score"]), cls.name
        assert cls.support == expected["support"], cls.name
    # scikit-learn's default (no labels=): macro over the classes present in truth or prediction.
    default = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    present = np.union1d(y_true, y_pred)
    for ours_avg, expected, classes in ((ours.macro_avg, default["macro avg"], len(present)),
                                        (ours.macro_avg_all_labels, report["macro avg"], k),
                                        (ours.weighted_avg, report["weighted avg"], k),
                                        (ours.weighted_avg, default["weighted avg"], k)):
        assert ours_avg.precision == pytest.approx(expected["precision"])
        assert ours_avg.recall == pytest.approx(expected["recall"])
        assert ours_avg.f1 == pytest.approx(expected["f1-score"])
        assert ours_avg.support == expected["support"]
        assert ours_avg.classes == classes


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 10])
def test_random_data_matches_sklearn(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    y_true = rng.integers(0, k, n)
    # mostly right, sometimes wrong: a realistic, non-degenerate matrix
    y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, k, n))
    _check_against_sklearn(y_true, y_pred, k)


def test_classes_with_zero_support_and_never_predicted() -> None:
    rng = np.random.default_rng(42)
    k = 10
    y_true = rng.choice([0, 1, 2, 5], 200)  # classes 3, 4, 6..9 never occur as truth
    y_pred = rng.choice([0, 1, 2, 3], 200)  # class 3 predicted without support; 5 never predicted
    _check_against_sklearn(y_true, y_pred, k)
    ours = compute_metrics(confusion_matrix(y_true, y_pred, labels=list(range(k))), _labels(k))
    assert ours.per_class[3].support == 0 and ours.per_class[3].precision == 0.0
    assert ours.per_class[5].precision == 0.0 and ours.per_class[5].recall == 0.0


def test_binary_all_one_class() -> None:
    y_true = np.array([1, 1, 1, 1])
    y_pred = np.array([1, 0, 1, 1])
    _check_against_sklearn(y_true, y_pred, 2)


def test_perfect_predictions() -> None:
    y = np.arange(30) % 3
    ours = compute_metrics(confusion_matrix(y, y, labels=[0, 1, 2]), _labels(3))
    assert ours.accuracy == 1.0
    assert ours.macro_avg.f1 == 1.0
    _check_against_sklearn(y, y, 3)


def test_no_feedback_has_undefined_accuracy_and_zero_averages() -> None:
    ours = compute_metrics(np.zeros((3, 3), dtype=np.int64), _labels(3))
    assert ours.count == 0
    assert ours.accuracy is None
    assert ours.macro_avg.f1 == 0.0 and ours.weighted_avg.f1 == 0.0
    assert ours.macro_avg.classes == 0 and ours.macro_avg_all_labels.classes == 3
    assert all(c.support == 0 for c in ours.per_class)


def test_ten_right_predictions_of_ten_classes_score_one_not_a_fraction() -> None:
    """Ten correct MNIST predictions over 7 of its 10 classes: accuracy 1 and macro F1 1, not 0.7."""
    y = np.array([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    ours = compute_metrics(confusion_matrix(y, y, labels=list(range(10))), _labels(10))
    assert ours.accuracy == 1.0
    assert ours.macro_avg.f1 == 1.0 and ours.macro_avg.classes == 7
    assert ours.macro_avg_all_labels.f1 == pytest.approx(0.7)


def test_macro_f1_helper_matches_the_report() -> None:
    rng = np.random.default_rng(3)
    y_true, y_pred = rng.choice([0, 2, 4], 100), rng.choice([0, 1, 2], 100)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(6)))
    assert macro_f1(cm) == pytest.approx(compute_metrics(cm, _labels(6)).macro_avg.f1)


def test_names_default_to_label_ids() -> None:
    ours = compute_metrics(np.eye(2, dtype=np.int64), _labels(2, names=False))
    assert [c.name for c in ours.per_class] == ["0", "1"]


def test_matrix_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(np.zeros((2, 2), dtype=np.int64), _labels(3))
    with pytest.raises(ValueError, match="non-negative"):
        compute_metrics(-np.eye(2, dtype=np.int64), _labels(2))


def test_confusion_from_pairs_matches_sklearn() -> None:
    rng = np.random.default_rng(7)
    y_true, y_pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    pairs = list(zip(y_true.tolist(), y_pred.tolist(), strict=True))
    assert confusion_from_pairs(pairs, 4).tolist() == confusion_matrix(y_true, y_pred, labels=range(4)).tolist()
