"""A declarative builder for small tf.keras image classifiers: a new image model is a spec, not code.

:class:`CNNSpec` (pydantic) describes the layers, input, classes, optimiser and schedule, epochs,
batch size and augmentation; :func:`build_model`, :func:`train`, :func:`predict_proba` and
:func:`export` do the rest the same way for every model, so the Fashion-MNIST and MNIST pipelines
differ only in their specs and data.

Design choices:

* Input is ``(H, W)`` grey-scale in [0, 1] (what the server's ``scale(255)`` step produces), and a
  ``Reshape`` inside the model adds the channel, so the exported input shape equals the package's
  ``[-1, H, W]`` exactly.
* Augmentation runs in the ``tf.data`` pipeline (see :mod:`training.augment`), never inside the
  model, so ``model.keras`` contains only stock Keras layers.
* Exported models are rebuilt from the spec without an optimiser before saving: the optimiser's
  slots would triple the file size and the server never trains.
* Evaluation runs ``predict_on_batch`` over large chunks; Keras ``predict`` costs tens of
  milliseconds of overhead per call.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from predictors.package import ONNX_FILE
from training.augment import AugmentStep, augment

logger = logging.getLogger(__name__)

ARTIFACT = "model.keras"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- layers ---------------------------------------------------------------------------------------


class Conv(_Spec):
    """2-D convolution, optionally followed by batch normalisation, then the activation."""

    type: Literal["conv"] = "conv"
    filters: int = Field(gt=0)
    kernel: int = Field(default=3, gt=0)
    strides: int = Field(default=1, gt=0)
    padding: Literal["same", "valid"] = "same"
    batch_norm: bool = True
    activation: str = "relu"


class MaxPool(_Spec):
    type: Literal["max_pool"] = "max_pool"
    size: int = Field(default=2, gt=0)


class AvgPool(_Spec):
    type: Literal["avg_pool"] = "avg_pool"
    size: int = Field(default=2, gt=0)


class GlobalAvgPool(_Spec):
    type: Literal["global_avg_pool"] = "global_avg_pool"


class Flatten(_Spec):
    type: Literal["flatten"] = "flatten"


class Dense(_Spec):
    """Fully connected hidden layer (the classifier head is added by the builder)."""

    type: Literal["dense"] = "dense"
    units: int = Field(gt=0)
    batch_norm: bool = False
    activation: str = "relu"


class Dropout(_Spec):
    type: Literal["dropout"] = "dropout"
    rate: float = Field(ge=0.0, lt=1.0)


LayerSpec = Annotated[Conv | MaxPool | AvgPool | GlobalAvgPool | Flatten | Dense | Dropout, Field(discriminator="type")]


# --- optimiser and whole spec -----------------------------------------------------------------------


class OptimizerSpec(_Spec):
    """Optimiser and learning-rate schedule. ``cosine`` warms up linearly, then decays to ``min_lr_fraction``."""

    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(default=1e-3, gt=0.0)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    min_lr_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    weight_decay: float | None = Field(default=None, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="sgd only")


class CNNSpec(_Spec):
    """Everything that defines an image classifier and how it is trained."""

    name: str = Field(min_length=1)
    input_shape: tuple[int, int] = (28, 28)
    channels: int = Field(default=1, ge=1)
    num_classes: int = Field(ge=2)
    layers: list[LayerSpec] = Field(min_length=1)
    augmentation: list[AugmentStep] = Field(default_factory=list)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=128, ge=1)
    pixel_divisor: float = Field(default=255.0, gt=0.0, description="raw pixels / divisor = model input")
    members: int = Field(default=1, ge=1, le=8,
                         description="copies trained from different seeds, their probabilities averaged in one model")

    @model_validator(mode="after")
    def _ends_flat(self) -> CNNSpec:
        flat = False
        for layer in self.layers:
            if isinstance(layer, Flatten | GlobalAvgPool):
                flat = True
            elif isinstance(layer, Conv | MaxPool | AvgPool) and flat:
                raise ValueError(f"layer '{layer.type}' comes after the feature map was flattened")
        if not flat:
            raise ValueError("layers must contain a 'flatten' or 'global_avg_pool' before the classifier head")
        return self


# --- building -------------------------------------------------------------------------------------------


def configure_threads(intra_op: int = 0, inter_op: int = 0) -> bool:
    """Set TensorFlow's thread pools (0 = TensorFlow's default: one per core).

    Must run before TensorFlow executes anything; returns False (and changes nothing) if the
    runtime is already initialised, e.g. when a test session trained a model earlier.
    """
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        return False
    return True


def _keras_layers(layer: LayerSpec) -> list[Any]:
    from keras import layers as kl

    if isinstance(layer, Conv):
        out: list[Any] = [kl.Conv2D(layer.filters, layer.kernel, strides=layer.strides, padding=layer.padding,
                                    use_bias=not layer.batch_norm)]
        if layer.batch_norm:
            out.append(kl.BatchNormalization())
        return [*out, kl.Activation(layer.activation)]
    if isinstance(layer, MaxPool):
        return [kl.MaxPooling2D(layer.size)]
    if isinstance(layer, AvgPool):
        return [kl.AveragePooling2D(layer.size)]
    if isinstance(layer, GlobalAvgPool):
        return [kl.GlobalAveragePooling2D()]
    if isinstance(layer, Flatten):
        return [kl.Flatten()]
    if isinstance(layer, Dense):
        dense: list[Any] = [kl.Dense(layer.units, use_bias=not layer.batch_norm)]
        if layer.batch_norm:
            dense.append(kl.BatchNormalization())
        return [*dense, kl.Activation(layer.activation)]
    if isinstance(layer, Dropout):
        return [kl.Dropout(layer.rate)]
    raise TypeError(f"unknown layer spec {layer!r}")  # pragma: no cover - the union is closed


def _member(spec: CNNSpec, name: str) -> Any:
    """One classifier of ``spec``'s layers: input ``(H, W)`` → softmax over ``num_classes``."""
    import keras
    from keras import layers as kl

    h, w = spec.input_shape
    if spec.channels == 1:
        inputs = keras.Input(shape=(h, w), name="input-0")
        x = kl.Reshape((h, w, 1))(inputs)
    else:
        inputs = keras.Input(shape=(h, w, spec.channels), name="input-0")
        x = inputs
    for layer in spec.layers:
        for k in _keras_layers(layer):
            x = k(x)
    outputs = kl.Dense(spec.num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def build_model(spec: CNNSpec) -> Any:
    """The uncompiled ``keras.Model`` for ``spec``: input ``(H, W)`` → softmax over ``num_classes``.

    With ``members > 1`` it is one model holding the members side by side and averaging their
    probabilities (a stock ``Average`` layer), so the server runs an ensemble as one call.
    """
    import keras
    from keras import layers as kl

    name = spec.name.replace("-", "_")
    if spec.members == 1:
        return _member(spec, name)
    members = [_member(spec, f"{name}_member_{i}") for i in range(spec.members)]
    inputs = keras.Input(shape=members[0].input_shape[1:], name="input-0")
    outputs = kl.Average(name="probabilities")([m(inputs) for m in members])
    return keras.Model(inputs, outputs, name=name)


def steps_per_epoch(spec: CNNSpec, n_train: int) -> int:
    """How many batches make one epoch (the last partial batch is dropped)."""
    return max(math.floor(n_train / min(spec.batch_size, n_train)), 1)


def _optimizer(spec: CNNSpec, epoch_steps: int) -> Any:
    import keras

    opt = spec.optimizer
    total = spec.epochs * epoch_steps
    lr: Any = opt.learning_rate
    if opt.schedule == "cosine":
        warmup = min(round(opt.warmup_epochs * epoch_steps), total - 1)
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=opt.learning_rate * (0.1 if warmup else 1.0),
            decay_steps=max(total - warmup, 1), alpha=opt.min_lr_fraction,
            warmup_target=opt.learning_rate if warmup else None, warmup_steps=warmup)
    if opt.name == "adam":
        return keras.optimizers.Adam(lr)
    if opt.name == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=opt.weight_decay or 0.0)
    if opt.name == "rmsprop":
        return keras.optimizers.RMSprop(lr)
    return keras.optimizers.SGD(lr, momentum=opt.momentum, nesterov=True)


# --- data -----------------------------------------------------------------------------------------------


def _to_input(x: Any, spec: CNNSpec) -> Any:
    import tensorflow as tf

    return tf.cast(x, tf.float32) / spec.pixel_divisor


def make_dataset(spec: CNNSpec, x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    """An endless, reshuffled, augmented ``tf.data`` stream of ``(images, labels)`` batches.

    Each batch's augmentation is seeded by ``(seed, batch index)``, and shuffling by ``seed``.
    """
    import tensorflow as tf

    h, w = spec.input_shape
    c = spec.channels
    steps = list(spec.augmentation)
    num_classes = spec.num_classes
    one_hot = spec.label_smoothing > 0

    def prepare(i: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        xb, yb = batch
        images = tf.reshape(_to_input(xb, spec), [-1, h, w, c])
        images = augment(images, steps, tf.stack([tf.constant(seed, tf.int64), i]))
        if c == 1:
            images = tf.reshape(images, [-1, h, w])
        if one_hot:  # the loss applies the label smoothing
            yb = tf.one_hot(yb, num_classes)
        return images, yb

    batch = min(spec.batch_size, len(x))
    ds = tf.data.Dataset.from_tensor_slices((x, y.astype(np.int64)))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.batch(batch, drop_remainder=True).enumerate()
    return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# --- training -------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """A trained model with its per-epoch history and how long training took (wall and CPU seconds)."""

    model: Any
    history: dict[str, list[float]]
    seconds: float
    cpu_seconds: float
    epochs: int
    epoch_seconds: list[float] = field(default_factory=list)
    validation_accuracy: float | None = None


def _verbosity(verbose: int | Literal["auto"]) -> int:
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return verbose


def train(
    spec: CNNSpec,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    *,
    seed: int = 0,
    verbose: int | Literal["auto"] = "auto",
) -> TrainResult:
    """Build and fit ``spec`` on raw pixel arrays ``(N, H, W)`` (0..``pixel_divisor``) and labels ``0..K-1``.

    Keras prints one progress line per epoch (a live bar on a terminal). Seeds are fixed with
    ``keras.utils.set_random_seed`` so weights, shuffling and augmentation repeat run to run.

    With ``members > 1`` member ``i`` is fitted alone from seed ``seed + i``, then all are copied
    into the averaging model: the history is the members' histories averaged epoch by epoch,
    ``epoch_seconds`` lists every member's epochs, and ``validation_accuracy`` is the ensemble's own.
    """
    if len(x_train) != len(y_train):
        raise ValueError(f"{len(x_train)} training images but {len(y_train)} labels")
    if y_train.min() < 0 or y_train.max() >= spec.num_classes:
        raise ValueError(f"labels must be 0..{spec.num_classes - 1}")
    single = spec.model_copy(update={"members": 1})
    results = [_fit(single, x_train, y_train, x_val, y_val, seed + i, verbose) for i in range(spec.members)]
    if spec.members == 1:
        return results[0]
    model = build_model(spec)
    for i, result in enumerate(results):
        model.get_layer(f"{spec.name.replace('-', '_')}_member_{i}").set_weights(result.model.get_weights())
    history = {k: [float(v) for v in np.mean([r.history[k] for r in results], axis=0)] for k in results[0].history}
    val_acc = None
    if x_val is not None and y_val is not None and len(x_val):
        val_acc = float((predict_proba(model, x_val, spec).argmax(axis=1) == y_val).mean())
    return TrainResult(model, history, sum(r.seconds for r in results), sum(r.cpu_seconds for r in results),
                       spec.epochs, [s for r in results for s in r.epoch_seconds], val_acc)


def _fit(spec: CNNSpec, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None,
         y_val: np.ndarray | None, seed: int, verbose: int | Literal["auto"]) -> TrainResult:
    """One model of ``spec`` (a single member) fitted from ``seed``."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    model = build_model(spec)
    steps = steps_per_epoch(spec, len(x_train))
    loss: Any
    if spec.label_smoothing:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=spec.label_smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
    model.compile(optimizer=_optimizer(spec, steps), loss=loss, metrics=["accuracy"], jit_compile=False)

    validation = None
    if x_val is not None and y_val is not None and len(x_val):
        y_v = tf.one_hot(y_val, spec.num_classes).numpy() if spec.label_smoothing else y_val
        validation = (_to_input(x_val, spec).numpy(), y_v)

    epoch_seconds: list[float] = []

    class _EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            epoch_seconds.append(time.perf_counter() - self._t)

    wall, cpu = time.perf_counter(), time.process_time()
    history = model.fit(
        make_dataset(spec, x_train, y_train, seed), steps_per_epoch=steps, epochs=spec.epochs,
        validation_data=validation, validation_batch_size=1024, callbacks=[_EpochTimer()], shuffle=False,
        verbose=_verbosity(verbose))
    seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items() if k != "learning_rate"}
    return TrainResult(model, hist, seconds, cpu_seconds, spec.epochs, epoch_seconds,
                       hist.get("val_accuracy", [None])[-1])


def predict_proba(model: Any, x: np.ndarray, spec: CNNSpec, batch_size: int = 1024) -> np.ndarray:
    """Class probabilities for raw pixel arrays, ``predict_on_batch`` over chunks of ``batch_size``."""
    if len(x) == 0:
        return np.zeros((0, spec.num_classes), dtype=np.float32)
    chunks = []
    for start in range(0, len(x), batch_size):
        xb = np.asarray(x[start:start + batch_size], dtype=np.float32) / spec.pixel_divisor
        chunks.append(np.asarray(model.predict_on_batch(xb)))
    return np.concatenate(chunks)


def export(model: Any, spec: CNNSpec, directory: str | Path) -> Path:
    """Save ``model`` as ``<directory>/model.keras`` without optimiser state (weights copied into a fresh build)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean = build_model(spec)
    clean.set_weights(model.get_weights())
    path = directory / ARTIFACT
    clean.save(path)
    export_onnx(clean, spec, directory)
    return path


def export_onnx(model: Any, spec: CNNSpec, directory: Path) -> Path | None:
    """Also write the model as ``model.onnx``, so the server need not convert it at every start; the server
    still checks it against ``model.keras`` before serving it, and converts afresh if it disagrees."""
    import warnings

    path = directory / ONNX_FILE
    model(np.zeros((1, *spec.input_shape), dtype=np.float32))  # Keras exports only a model that has run
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(str(path), format="onnx", verbose=False)
    except Exception:  # an exporter without a converter for some op: the server serves with TensorFlow
        logger.warning("could not export %s to ONNX; the server will serve it with TensorFlow", directory)
        path.unlink(missing_ok=True)
        return None
    return path


