"""Evaluation reports written into every package: ``metrics.json`` content and the plots.

The numbers come from scikit-learn (accuracy, per-class precision/recall/F1, confusion matrix)
so every model, tabular or image, is scored the same way. Plots use matplotlib's ``Agg``
backend: training runs headless in CI and in containers.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class and macro precision/recall/F1/support, and the confusion matrix (rows = truth)."""
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    per_class = {
        name: {"label": i, "precision": float(precision[i]), "recall": float(recall[i]),
               "f1": float(f1[i]), "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_avg": {"precision": float(macro[0]), "recall": float(macro[1]), "f1": float(macro[2])},
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": len(y_true),
    }


def environment() -> dict[str, Any]:
    """Where the numbers were measured: timings mean little without the machine they came from."""
    load = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "load_average_1_5_15m": load}


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                          title: str = "Confusion matrix (test set)") -> Path:
    """Heat map with counts in each cell; rows are true classes, columns predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(matrix)
    k = len(class_names)
    size = max(4.0, 0.6 * k + 2.0)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), dpi=80)
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(k), yticks=range(k), xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true", title=title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    threshold = cm.max() / 2.0 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_training_curves(history: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, training and validation side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=80)
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for key, style in ((metric, "-o"), (f"val_{metric}", "--s")):
            values = history.get(key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=key, markersize=3)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{title} {metric}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_line(name: str, metrics: Mapping[str, Any]) -> str:
    """One human line per package for the end of a training run."""
    parts = [f"{name}: test accuracy {metrics['test']['accuracy']:.4f}"]
    if "validation" in metrics and "accuracy" in metrics["validation"]:
        parts.append(f"validation {metrics['validation']['accuracy']:.4f}")
    if "photos" in metrics:
        parts.append(f"photographed digits {metrics['photos']['accuracy']:.4f}")
    if metrics.get("training_seconds") is not None:
        cpu = metrics.get("training_cpu_seconds", 0.0)
        parts.append(f"training {metrics['training_seconds']:.1f}s wall / {cpu:.1f}s CPU")
    if metrics.get("quick"):
        parts.append("(quick mode)")
    return ", ".join(parts)
