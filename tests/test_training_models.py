"""The committed, fully trained packages in ``models/``: valid, small, and as accurate as their metrics say.

These re-score each artifact on its test set, so a stale or hand-edited metrics.json fails here,
and check the MNIST model on ordinary images (rendered digits, dark on light, any size and
position, PNG/JPEG, RGB/RGBA) through the exact preprocessing the server applies.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest

from predictors.package import check_artifact, load_package
from training.datasets import load_fashion_mnist, load_mnist
from training.images import PHOTO_SEED, PHOTOS_PER_DIGIT

TARGETS = {"iris": 0.9, "mnist": 0.97, "fashion-mnist": 0.92}
# Issue 15: photographed-style digits through the server's preprocessing, without losing the clean split.
MNIST_PHOTO_TARGET, MNIST_CLEAN_TARGET = 0.98, 0.985
MAX_PACKAGE_BYTES = 8 * 1024 * 1024  # an image package holds model.keras and its compiled model.onnx


def _keras(package_dir: Path) -> Any:
    import keras

    return keras.models.load_model(package_dir / "model.keras", compile=False)


@pytest.mark.parametrize("name", list(TARGETS))
def test_trained_package_is_valid_small_and_meets_its_target(trained_model_dir: Path, name: str) -> None:
    package = load_package(trained_model_dir / name)
    model = joblib.load(package.artifact_path) if name == "iris" else _keras(package.path)
    check_artifact(package, model)
    metrics = package.metrics
    assert metrics is not None and metrics["quick"] is False
    assert metrics["accuracy"] == metrics["test"]["accuracy"] >= TARGETS[name]
    assert sum(p.stat().st_size for p in package.path.iterdir()) < MAX_PACKAGE_BYTES


def test_trained_iris_rescored_on_test_csv(trained_model_dir: Path) -> None:
    package = load_package(trained_model_dir / "iris")
    with (package.path / "test.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    x = np.array([[float(r[n]) for n in package.config.feature_names] for r in rows], dtype=np.float32)
    y = np.array([int(r["label"]) for r in rows])
    accuracy = float((joblib.load(package.artifact_path).predict(x) == y).mean())
    assert accuracy == pytest.approx(package.metrics["test"]["accuracy"])


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_trained_cnn_rescored_on_its_test_split(trained_model_dir: Path, name: str) -> None:
    package = load_package(trained_model_dir / name)
    data = load_mnist() if name == "mnist" else load_fashion_mnist()
    model = _keras(package.path)
    x = data.x_test.astype(np.float32) / 255.0
    predicted = np.concatenate([np.asarray(model.predict_on_batch(x[i:i + 1000])).argmax(axis=1)
                                for i in range(0, len(x), 1000)])
    accuracy = float((predicted == data.y_test).mean())
    assert accuracy == pytest.approx(package.metrics["test"]["accuracy"], abs=2e-3)
    assert accuracy >= TARGETS[name]


def test_trained_mnist_metrics_hold_its_photo_score(trained_model_dir: Path) -> None:
    """Training scored all photos of the test split; the pinned subset re-reads them through the server."""
    metrics = load_package(trained_model_dir / "mnist").metrics
    photos = metrics["photos"]
    assert photos["n"] == PHOTOS_PER_DIGIT * metrics["test"]["n"] == photos["per_digit"] * metrics["test"]["n"]
    assert photos["seed"] == PHOTO_SEED and photos["path"].startswith("encoded bytes")
    assert photos["accuracy"] >= MNIST_PHOTO_TARGET and metrics["accuracy"] >= MNIST_CLEAN_TARGET


# --- MNIST on ordinary images ---------------------------------------------------------------------

FONTS = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
         "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf"]
# (font size px, canvas w×h, encoding, mode): from a small icon to a phone-sized photo
RENDERINGS = [(40, (80, 60), "PNG", "RGB"), (160, (400, 300), "JPEG", "RGB"), (24, (64, 64), "PNG", "RGBA"),
              (300, (640, 480), "JPEG", "RGB")]


def _render(digit: int, font_file: str, size: int, canvas: tuple[int, int], fmt: str, mode: str,
            rng: np.random.Generator) -> bytes:
    """Dark ink on light paper, somewhere off-centre in a larger canvas, encoded as a file would be."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / font_file), size)
    offset = (int(rng.integers(0, max(1, canvas[0] - size * 0.7))),
              int(rng.integers(0, max(1, canvas[1] - size * 1.2))))
    if mode == "RGBA":  # transparent background: the server composites it on white
        image = Image.new("RGBA", canvas, (0, 0, 0, 0))
        ImageDraw.Draw(image).text(offset, str(digit), font=font, fill=(20, 20, 20, 255))
    else:
        image = Image.new("RGB", canvas, (245, 242, 235))
        ImageDraw.Draw(image).text(offset, str(digit), font=font, fill=(25, 25, 40))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_trained_mnist_reads_rendered_digits_after_server_preprocessing(trained_model_dir: Path) -> None:
    from predictors.models.preprocessing import run_image_pipeline

    package = load_package(trained_model_dir / "mnist")
    model = _keras(package.path)
    rng = np.random.default_rng(0)
    images, labels = [], []
    for font in FONTS:
        for digit in range(10):
            for size, canvas, fmt, mode in RENDERINGS:
                data = _render(digit, font, size, canvas, fmt, mode, rng)
                images.append(run_image_pipeline(data, package.config.preprocessing))
                labels.append(digit)
    x = np.stack(images)
    assert x.shape == (len(labels), 28, 28) and x.min() >= 0.0 and x.max() <= 1.0
    predicted = np.asarray(model.predict_on_batch(x)).argmax(axis=1)
    accuracy = float((predicted == np.array(labels)).mean())
    assert accuracy >= 0.9, f"rendered-digit accuracy {accuracy:.3f}"
