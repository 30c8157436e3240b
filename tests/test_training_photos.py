"""Photographed-style digits (training.photos): seeded, reproducible by subset, every transformation."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from predictors.package import DecodeStep
from predictors.preprocessing import decode
from training import photos
from training.datasets import load_mnist


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    data = load_mnist()
    return data.x_test, data.y_test


def test_subset_reproduces_the_same_photos_as_the_full_set(test_split) -> None:
    x, y = test_split
    full = photos.photo_set(x[:6], y[:6], per_digit=2, seed=5)
    part = photos.photo_set(x[:6], y[:6], per_digit=2, seed=5, rows=[4, 1])
    assert part.images == full.images[8:10] + full.images[2:4]
    assert part.labels.tolist() == [y[4], y[4], y[1], y[1]]
    assert [p["row"] for p in part.params] == [4, 4, 1, 1]
    other = photos.photo_set(x[:6], y[:6], per_digit=2, seed=6)
    assert all(a != b for a, b in zip(full.images, other.images, strict=True))


def test_photos_cover_every_transformation_and_decode_as_described(test_split) -> None:
    x, y = test_split
    photo_set = photos.photo_set(x, y, per_digit=1, seed=0, rows=range(0, 1000, 10))
    recipes = photo_set.params
    scales = [r["scale"] for r in recipes]
    assert photos.MIN_SCALE <= min(scales) < 0.5 and 3.0 < max(scales) <= photos.MAX_SCALE
    assert {r["mode"] for r in recipes} == set(photos.MODES)
    assert {r["format"] for r in recipes} == {"JPEG", "PNG"}
    assert {r["inverted"] for r in recipes} == {True, False} and any(r["transparent"] for r in recipes)
    assert max(r["shadow"] for r in recipes) > 40 and max(r["blur"] for r in recipes) > 1.0
    assert min(r["stroke"] for r in recipes) < -0.5 and max(r["stroke"] for r in recipes) > 1.5
    qualities = [r["quality"] for r in recipes if r["format"] == "JPEG"]
    assert photos.JPEG_QUALITY[0] <= min(qualities) and max(qualities) <= photos.JPEG_QUALITY[1]
    for data, recipe in zip(photo_set.images, recipes, strict=True):
        image = decode(data, DecodeStep())
        assert image.format == recipe["format"] and image.mode == recipe["mode"]
        assert list(image.size) == recipe["size"]


def test_a_photo_is_dark_ink_on_light_paper_off_centre(test_split) -> None:
    x, _ = test_split
    rng = np.random.default_rng(0)
    for _ in range(20):
        data, recipe = photos.photograph(x[3], rng)
        if not recipe["inverted"] and not recipe["transparent"] and recipe["scale"] > 1:
            break
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    assert np.median(border) > 120 and pixels.min() < np.median(border) - 50
    assert pixels.shape[0] > 28 and pixels.shape[1] > 28
