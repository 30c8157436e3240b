"""The model packages the benchmarks serve: the trained ones in models/ when present, stand-ins otherwise.

Benchmarks measure serving, not accuracy, so a stand-in is fine as long as it costs the
same to run: Iris is the same estimator family the training pipeline picks
(LogisticRegression), Fashion-MNIST a CNN of the usual small shape with fixed random
weights. Every result records which one was used (``source``).

Each benchmark gets its own model directory under ``bench/.work`` holding only the models it
needs, so "the iris-only server" really loads one model.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import joblib

from bench.common import PYTHON, REPO, WORK
from predictors.package import Batching, LabelsFile, PackageConfig, TensorSpec, load_package, save_package

MODELS = REPO / "models"
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]


@dataclass(frozen=True)
class BenchPackage:
    name: str
    path: Path
    source: str  # "models/<name>" or "stand-in: ..."


def _with_batching(path: Path, batching: Batching | None) -> None:
    if batching is None:
        return
    package = load_package(path)
    config = package.config.model_copy(update={"batching": batching})
    save_package(path, config, package.labels, package.metrics)


def _copy_trained(name: str, target: Path) -> bool:
    source = MODELS / name
    if not (source / "config.json").is_file():
        return False
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.png", "*.csv"))
    return True


def iris(model_dir: Path, batching: Batching | None = None) -> BenchPackage:
    """``model_dir/iris``: the trained package if models/iris exists, else a fitted LogisticRegression."""
    target = model_dir / "iris"
    model_dir.mkdir(parents=True, exist_ok=True)
    if _copy_trained("iris", target):
        source = "models/iris"
    else:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression

        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        x, y = load_iris(return_X_y=True)
        joblib.dump(LogisticRegression(max_iter=1000).fit(x, y), target / "model.joblib")
        save_package(target, PackageConfig(format_version=1, name="iris", version="bench", framework="sklearn",
                                           task="tabular_classification", artifact="model.joblib",
                                           inputs=[TensorSpec(name="input-0", datatype="FP32", shape=[-1, 4])]),
                     LabelsFile(labels=[0, 1, 2], names=["setosa", "versicolor", "virginica"]))
        source = "stand-in: LogisticRegression fitted on all 150 Iris rows"
    _with_batching(target, batching)
    return BenchPackage("iris", target, source)


_STAND_IN_CNN = """
import os, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras
keras.utils.set_random_seed(0)
L = keras.layers
model = keras.Sequential([
    keras.Input((28, 28)), L.Reshape((28, 28, 1)),
    L.Conv2D(32, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(),
    L.Conv2D(32, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(),
    L.Conv2D(64, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(),
    L.Conv2D(64, 3, padding="same", use_bias=False), L.BatchNormalization(), L.ReLU(), L.MaxPooling2D(),
    L.Flatten(), L.Dense(128, activation="relu"), L.Dropout(0.3), L.Dense(10, activation="softmax"),
])
model.save(sys.argv[1])
"""
STAND_IN_DESCRIPTION = ("stand-in CNN (fixed random weights): 4×Conv3×3 (32,32,64,64)+BN, 2×MaxPool, "
                        "Dense 128, Dense 10")


def fashion_mnist(model_dir: Path, batching: Batching | None = None) -> BenchPackage:
    """``model_dir/fashion-mnist``: the trained package if models/fashion-mnist exists, else a stand-in CNN."""
    target = model_dir / "fashion-mnist"
    model_dir.mkdir(parents=True, exist_ok=True)
    if _copy_trained("fashion-mnist", target):
        source = "models/fashion-mnist"
    else:
        cached = WORK / "stand-in-fashion-mnist.keras"
        if not cached.is_file():
            WORK.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name("partial-stand-in.keras")
            subprocess.run([PYTHON, "-c", _STAND_IN_CNN, str(partial)], check=True, cwd=REPO)
            partial.replace(cached)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        shutil.copyfile(cached, target / "model.keras")
        save_package(target, PackageConfig(format_version=1, name="fashion-mnist", version="bench",
                                           framework="keras", task="image_classification", artifact="model.keras",
                                           inputs=[TensorSpec(name="input-0", datatype="FP32", shape=[-1, 28, 28])]),
                     LabelsFile(labels=list(range(10)), names=FASHION_NAMES))
        source = STAND_IN_DESCRIPTION
    _with_batching(target, batching)
    return BenchPackage("fashion-mnist", target, source)
