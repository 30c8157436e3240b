"""The declarative CNN builder and the augmentation steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from training import augment as aug
from training import cnn
from training.datasets import load_mnist
from training.images import FASHION_MNIST_SPEC, MNIST_SPEC

TINY = cnn.CNNSpec(
    name="tiny", num_classes=3, input_shape=(12, 12),
    layers=[cnn.Conv(filters=4), cnn.MaxPool(), cnn.Flatten(), cnn.Dense(units=8)],
    optimizer=cnn.OptimizerSpec(learning_rate=1e-2, schedule="constant"), epochs=8, batch_size=16,
)


def _digits(n: int = 8) -> np.ndarray:
    data = load_mnist()
    return data.x_train[::400][:n].astype(np.float32)[..., None] / 255.0


def _stripes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A learnable toy task: class = orientation of a bright bar (horizontal, vertical, diagonal)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (n, 12, 12)).astype(np.uint8)
    y = np.arange(n) % 3
    for i, c in enumerate(y):
        k = rng.integers(2, 10)
        if c == 0:
            x[i, k, :] = 255
        elif c == 1:
            x[i, :, k] = 255
        else:
            np.fill_diagonal(x[i], 255)
    return x, y


# --- spec -------------------------------------------------------------------------------------------


def test_spec_is_declarative_json() -> None:
    data = MNIST_SPEC.model_dump(mode="json")
    assert data["layers"][0] == {"type": "conv", "filters": 32, "kernel": 3, "strides": 1, "padding": "same",
                                 "batch_norm": True, "activation": "relu"}
    assert cnn.CNNSpec.model_validate(data) == MNIST_SPEC
    assert {s["op"] for s in data["augmentation"]} >= {"shift", "rotation", "zoom", "thickness", "contrast"}


def test_spec_rejects_layers_without_a_flat_head_and_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="flatten"):
        cnn.CNNSpec(name="x", num_classes=2, layers=[cnn.Conv(filters=4)])
    with pytest.raises(ValidationError, match="after the feature map was flattened"):
        cnn.CNNSpec(name="x", num_classes=2, layers=[cnn.Flatten(), cnn.Conv(filters=4)])
    with pytest.raises(ValidationError, match="type"):
        cnn.CNNSpec.model_validate({"name": "x", "num_classes": 2, "layers": [{"type": "lstm"}, {"type": "flatten"}]})
    with pytest.raises(ValidationError):
        aug.Rotation(max_degrees=10, colour="red")


@pytest.mark.parametrize("spec", [MNIST_SPEC, FASHION_MNIST_SPEC], ids=lambda s: s.name)
def test_build_model_from_spec(spec: cnn.CNNSpec) -> None:
    model = cnn.build_model(spec)
    assert tuple(model.input_shape) == (None, 28, 28)
    assert tuple(model.output_shape) == (None, 10)
    assert model.count_params() < 1_500_000  # keeps model.keras well under 5 MB


def test_train_learns_a_toy_task_and_exports_without_optimizer(tmp_path: Path) -> None:
    import keras

    x, y = _stripes(240)
    result = cnn.train(TINY, x[:180], y[:180], x[180:], y[180:], seed=0, verbose=0)
    assert len(result.history["loss"]) == TINY.epochs == len(result.epoch_seconds)
    assert result.history["loss"][-1] < result.history["loss"][0]
    probs = cnn.predict_proba(result.model, x[180:], TINY, batch_size=7)  # several uneven chunks
    assert probs.shape == (60, 3)
    assert (probs.argmax(axis=1) == y[180:]).mean() > 0.8

    path = cnn.export(result.model, TINY, tmp_path)
    loaded = keras.models.load_model(path, compile=False)
    assert getattr(loaded, "optimizer", None) is None
    np.testing.assert_allclose(np.asarray(loaded.predict_on_batch(x[180:] / 255.0)), probs, atol=1e-5)


def test_ensemble_is_one_model_averaging_members_trained_from_successive_seeds(tmp_path: Path) -> None:
    import keras

    x, y = _stripes(240)
    spec = TINY.model_copy(update={"members": 2, "epochs": 3})
    result = cnn.train(spec, x[:180], y[:180], x[180:], y[180:], seed=3, verbose=0)
    alone = cnn.train(TINY.model_copy(update={"epochs": 3}), x[:180], y[:180], x[180:], y[180:], seed=4, verbose=0)
    assert len(result.history["loss"]) == 3 and len(result.epoch_seconds) == 6

    xv = x[180:] / 255.0
    members = [np.asarray(result.model.get_layer(f"tiny_member_{i}").predict_on_batch(xv)) for i in range(2)]
    ensemble = np.asarray(result.model.predict_on_batch(xv))
    np.testing.assert_allclose(ensemble, (members[0] + members[1]) / 2, atol=1e-6)
    np.testing.assert_allclose(members[1], np.asarray(alone.model.predict_on_batch(xv)), atol=1e-5)  # seed 3 + 1
    assert result.validation_accuracy == float((ensemble.argmax(axis=1) == y[180:]).mean())
    assert not np.allclose(members[0], members[1])

    loaded = keras.models.load_model(cnn.export(result.model, spec, tmp_path), compile=False)
    assert [type(layer).__name__ for layer in loaded.layers][-1] == "Average"
    np.testing.assert_allclose(np.asarray(loaded.predict_on_batch(xv)), ensemble, atol=1e-5)


def test_training_is_reproducible_from_the_seed() -> None:
    x, y = _stripes(96)
    spec = TINY.model_copy(update={"epochs": 2, "augmentation": [aug.Shift(max_fraction=0.1)]})
    a = cnn.train(spec, x, y, seed=5, verbose=0)
    b = cnn.train(spec, x, y, seed=5, verbose=0)
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-4)


def test_train_rejects_labels_outside_the_classes() -> None:
    x, y = _stripes(30)
    with pytest.raises(ValueError, match=r"labels must be 0\.\.2"):
        cnn.train(TINY, x, y + 1, seed=0, verbose=0)


# --- augmentation --------------------------------------------------------------------------------------


def _run(steps: list, images: np.ndarray, seed: tuple[int, int] = (0, 0)) -> np.ndarray:
    import tensorflow as tf

    return aug.augment(tf.constant(images), steps, tf.constant(seed, tf.int64)).numpy()


def test_augmentation_keeps_shape_and_range_and_is_seeded() -> None:
    x = _digits()
    steps = list(MNIST_SPEC.augmentation)
    out = _run(steps, x)
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, _run(steps, x))
    assert not np.allclose(out, _run(steps, x, seed=(0, 1)))
    assert not np.allclose(out, x)


def test_zero_strength_geometry_is_the_identity() -> None:
    x = _digits()
    steps = [aug.Shift(max_fraction=0.0), aug.Rotation(max_degrees=0.0), aug.Zoom(max_fraction=0.0),
             aug.Shear(max_degrees=0.0), aug.Flip(probability=0.0)]
    np.testing.assert_allclose(_run(steps, x), x, atol=1e-6)


def test_flip_mirrors_left_right() -> None:
    x = _digits()
    np.testing.assert_allclose(_run([aug.Flip(probability=1.0)], x), x[:, :, ::-1, :], atol=1e-6)


def test_thickness_dilates_and_erodes_ink() -> None:
    x = _digits()
    ink = x.sum(axis=(1, 2, 3))
    thicker = _run([aug.Thickness(max_dilate=1.0, max_erode=0.0)], x).sum(axis=(1, 2, 3))
    thinner = _run([aug.Thickness(max_dilate=0.0, max_erode=1.0)], x).sum(axis=(1, 2, 3))
    assert np.all(thicker >= ink - 1e-3) and np.any(thicker > ink * 1.2)
    assert np.all(thinner <= ink + 1e-3) and np.any(thinner < ink * 0.8)


def test_rotation_moves_ink_but_keeps_its_centre() -> None:
    x = _digits()
    out = _run([aug.Rotation(max_degrees=30.0)], x)
    assert not np.allclose(out, x, atol=0.05)

    def centre(a: np.ndarray) -> np.ndarray:
        ys, xs = np.indices(a.shape[1:3])
        w = a[..., 0]
        return np.stack([(ys * w).sum((1, 2)) / w.sum((1, 2)), (xs * w).sum((1, 2)) / w.sum((1, 2))], axis=1)

    np.testing.assert_allclose(centre(out), centre(x), atol=1.5)


def test_contrast_and_noise_stay_in_range() -> None:
    x = _digits()
    out = _run([aug.Contrast(min_peak=0.5, max_background=0.2)], x)
    assert np.all(out.max(axis=(1, 2, 3)) <= 1.0 + 1e-6) and np.all(out.max(axis=(1, 2, 3)) >= 0.5 - 1e-6)
    noisy = _run([aug.Noise(max_stddev=0.3)], x)
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0


def test_label_smoothing_trains_with_one_hot_targets() -> None:
    x, y = _stripes(240)
    spec = TINY.model_copy(update={"label_smoothing": 0.1})
    result = cnn.train(spec, x[:180], y[:180], x[180:], y[180:], seed=0, verbose=0)
    # smoothed targets keep the loss above the smoothing floor, but accuracy is on the true labels
    assert result.history["val_accuracy"][-1] > 0.8
    assert min(result.history["loss"]) > 0.1
