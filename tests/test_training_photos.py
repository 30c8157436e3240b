"""Photographed-style digits (training.photos), and the committed MNIST package scored on them.

The pinned accuracy goes the whole real path: the photos are encoded bytes sent to a running
model server over a socket, which decodes and preprocesses them with the package's own steps.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from predictors.models.preprocessing import decode
from predictors.package import DecodeStep
from tests.support.v2 import bytes_tensor, output
from training import photos
from training.datasets import load_mnist
from training.images import PHOTO_SEED, PHOTOS_PER_DIGIT

PINNED_ROWS = 100  # a seeded choice of test digits, with all their photos exactly as in the full set
# The committed package reads 293 of these 300 photos (0.977) in process; one flip of slack for the
# server's float path. The full 3,000-photo figure is in its metrics.json and the README.
PINNED_ACCURACY = 0.973


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


def test_committed_mnist_reads_photos_through_the_server(model_server, test_split) -> None:
    """The pinned real-path figure: photos of a seeded set of test digits, sent as encoded images."""
    x, y = test_split
    rows = np.sort(np.random.default_rng(PHOTO_SEED).permutation(len(y))[:PINNED_ROWS])
    photo_set = photos.photo_set(x, y, per_digit=PHOTOS_PER_DIGIT, seed=PHOTO_SEED, rows=rows)
    predicted: list[int] = []
    with model_server.client() as client:
        for start in range(0, len(photo_set.images), 60):
            chunk = photo_set.images[start:start + 60]
            response = client.post("/v2/models/mnist/infer", json={"inputs": [bytes_tensor("input-0", chunk)]})
            assert response.status_code == 200, response.text
            predicted.extend(output(response.json(), "label").tolist())
    accuracy = float((np.array(predicted) == photo_set.labels).mean())
    assert accuracy >= PINNED_ACCURACY, f"photographed-digit accuracy {accuracy:.3f} over {len(predicted)} photos"
