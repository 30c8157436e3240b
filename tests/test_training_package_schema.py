"""The package contract (predictors/package.py) rejects broken packages, naming file and field.

Each case starts from a real package written by a training pipeline and breaks one thing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import pytest

from predictors.package import PackageError, check_artifact, load_package


def _copy(quick_packages: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(quick_packages / name, tmp_path / name))


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _load_keras(package_dir: Path) -> Any:
    import keras

    return keras.models.load_model(package_dir / "model.keras", compile=False)


def test_missing_config_file(quick_packages: Path, tmp_path: Path) -> None:
    pkg = _copy(quick_packages, "iris", tmp_path)
    (pkg / "config.json").unlink()
    with pytest.raises(PackageError, match=r"config\.json: file is missing") as exc:
        load_package(pkg)
    assert exc.value.file == "config.json"


def test_missing_artifact(quick_packages: Path, tmp_path: Path) -> None:
    pkg = _copy(quick_packages, "mnist", tmp_path)
    (pkg / "model.keras").unlink()
    with pytest.raises(PackageError) as exc:
        load_package(pkg)
    assert exc.value.file == "model.keras"
    assert "missing" in str(exc.value) and str(pkg) in str(exc.value)


def test_bad_json(quick_packages: Path, tmp_path: Path) -> None:
    pkg = _copy(quick_packages, "iris", tmp_path)
    (pkg / "labels_file.json").write_text('{"labels": [0, 1, 2,')
    with pytest.raises(PackageError, match=r"labels_file\.json: not valid JSON") as exc:
        load_package(pkg)
    assert exc.value.file == "labels_file.json"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda d: d.update(labels=[1, 2, 3]), "labels", "0..K-1"),
        (lambda d: d.update(labels=[0, 0, 1]), "labels", "unique"),
        (lambda d: d.update(labels=["a", "b", "c"]), "labels.0", "integer"),
        (lambda d: d.update(names=["setosa", "versicolor"]), "names", "names has 2 entries for 3 labels"),
        (lambda d: d.pop("labels"), "labels", "required"),
    ],
)
def test_wrong_labels(quick_packages: Path, tmp_path: Path, change: Callable, field: str | None,
                      message: str) -> None:
    pkg = _copy(quick_packages, "iris", tmp_path)
    _edit_json(pkg / "labels_file.json", change)
    with pytest.raises(PackageError, match=message) as exc:
        load_package(pkg)
    assert exc.value.file == "labels_file.json"
    if field is not None:
        assert exc.value.field == field


def test_labels_that_disagree_with_the_artifact(quick_packages: Path, tmp_path: Path) -> None:
    pkg = _copy(quick_packages, "mnist", tmp_path)
    _edit_json(pkg / "labels_file.json", lambda d: d.update(labels=list(range(9)), names=d["names"][:9]))
    package = load_package(pkg)  # valid on its own ...
    with pytest.raises(PackageError, match="has 10 outputs, labels file lists 9") as exc:
        check_artifact(package, _load_keras(pkg))  # ... but not for this model
    assert (exc.value.file, exc.value.field) == ("labels_file.json", "labels")


def test_image_input_shape_that_disagrees_with_the_artifact(quick_packages: Path, tmp_path: Path) -> None:
    pkg = _copy(quick_packages, "fashion-mnist", tmp_path)
    _edit_json(pkg / "config.json", lambda d: d["inputs"][0].update(shape=[-1, 32, 32]))
    package = load_package(pkg)
    with pytest.raises(PackageError, match=r"takes input shape \[None, 28, 28\], config says \[-1, 32, 32\]") as exc:
        check_artifact(package, _load_keras(pkg))
    assert (exc.value.file, exc.value.field) == ("config.json", "inputs.0.shape")


def test_tabular_feature_count_that_disagrees_with_the_artifact(quick_packages: Path, tmp_path: Path) -> None:
    pkg = _copy(quick_packages, "iris", tmp_path)
    _edit_json(pkg / "config.json", lambda d: (d["inputs"][0].update(shape=[-1, 5]), d.update(feature_names=None)))
    package = load_package(pkg)
    with pytest.raises(PackageError, match="takes 4 features, config says 5") as exc:
        check_artifact(package, joblib.load(pkg / "model.joblib"))
    assert exc.value.field == "inputs.0.shape"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda d: d.update(format_version=2), "format_version", "unknown format_version 2"),
        (lambda d: d.pop("format_version"), "format_version", "required"),
        (lambda d: d.update(framework="pytorch"), "framework", "sklearn"),
        (lambda d: d.update(artifact="model.keras"), None, "expects artifact 'model.joblib'"),
        (lambda d: d.update(artifact="../model.joblib"), "artifact", "file name inside the package"),
        (lambda d: d.update(name="Iris_Model"), "name", "pattern"),
        (lambda d: d["inputs"][0].update(shape=[-1, 0]), "inputs.0.shape", "positive or -1"),
        (lambda d: d.update(feature_names=["a", "b"]), None, "feature_names has 2 names for 4 input features"),
        (lambda d: d.update(colour="blue"), "colour", "Extra inputs"),
    ],
)
def test_broken_config(quick_packages: Path, tmp_path: Path, change: Callable, field: str | None,
                       message: str) -> None:
    pkg = _copy(quick_packages, "iris", tmp_path)
    _edit_json(pkg / "config.json", change)
    with pytest.raises(PackageError, match=message) as exc:
        load_package(pkg)
    assert exc.value.file == "config.json"
    if field is not None:
        assert exc.value.field == field
    assert str(exc.value).startswith(f"model package {pkg}: config.json")


def test_unknown_preprocessing_step(quick_packages: Path, tmp_path: Path) -> None:
    pkg = _copy(quick_packages, "mnist", tmp_path)
    _edit_json(pkg / "config.json", lambda d: d["preprocessing"].append({"op": "sharpen"}))
    with pytest.raises(PackageError) as exc:
        load_package(pkg)
    assert exc.value.file == "config.json" and exc.value.field.startswith("preprocessing.7")


def test_missing_package_directory(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="package directory does not exist"):
        load_package(tmp_path / "nothing-here")
