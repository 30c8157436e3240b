"""Declarative, seeded image augmentation applied to whole batches in the ``tf.data`` pipeline.

Why not Keras preprocessing layers inside the model: augmentation belongs to training only, and
keeping it out of the exported graph means ``model.keras`` holds nothing but standard layers,
so the server loads it without custom objects. Why stateless ops: every batch draws its random
parameters from ``(seed, batch index)``, so a run is reproducible from its seed alone, and
parallel ``tf.data`` maps cannot change the result.

Consecutive geometric steps (shift, rotation, zoom, shear, flip) are composed into one affine
transform per image and resampled once, so stacking them costs one interpolation, not four.

Images are float32 ``(B, H, W, C)`` in [0, 1], light ink on a dark background (zero fill).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import tensorflow as tf
from pydantic import BaseModel, ConfigDict, Field


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Shift(_Step):
    """Translate by up to ``max_fraction`` of the image size in each direction."""

    op: Literal["shift"] = "shift"
    max_fraction: float = Field(default=0.1, ge=0.0, le=0.5)


class Rotation(_Step):
    """Rotate about the centre by up to ``max_degrees`` either way."""

    op: Literal["rotation"] = "rotation"
    max_degrees: float = Field(default=10.0, ge=0.0, le=180.0)


class Zoom(_Step):
    """Scale about the centre by a factor in ``[1 - max_fraction, 1 + max_fraction]``."""

    op: Literal["zoom"] = "zoom"
    max_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    independent_axes: bool = Field(default=False, description="draw x and y scales separately (aspect change)")


class Shear(_Step):
    """Horizontal shear by up to ``max_degrees`` (handwriting slant)."""

    op: Literal["shear"] = "shear"
    max_degrees: float = Field(default=10.0, ge=0.0, lt=60.0)


class Flip(_Step):
    """Mirror left-right with probability ``probability`` (for clothes, never for digits)."""

    op: Literal["flip"] = "flip"
    probability: float = Field(default=0.5, ge=0.0, le=1.0)


class Thickness(_Step):
    """Thicken or thin strokes: a fractional grey-scale dilation (3×3 max) or erosion (3×3 min).

    Each image draws ``t`` in ``[-max_erode, max_dilate]``; ``t = 1.5`` is one full dilation pass
    plus half of a second. This is what makes a model trained on pen strokes hold up on bold
    fonts and thin ball-point lines once the server has scaled them into a 20-pixel box.
    """

    op: Literal["thickness"] = "thickness"
    max_dilate: float = Field(default=1.0, ge=0.0, le=3.0)
    max_erode: float = Field(default=0.5, ge=0.0, le=3.0)


class Contrast(_Step):
    """Random levels: ink peak drawn in ``[min_peak, 1]``, background in ``[0, max_background]``."""

    op: Literal["contrast"] = "contrast"
    min_peak: float = Field(default=0.7, gt=0.0, le=1.0)
    max_background: float = Field(default=0.0, ge=0.0, lt=1.0)


class Noise(_Step):
    """Additive Gaussian noise with a per-image standard deviation in ``[0, max_stddev]``, then clip."""

    op: Literal["noise"] = "noise"
    max_stddev: float = Field(default=0.05, ge=0.0, le=1.0)


class Erase(_Step):
    """Random erasing: with ``probability``, zero one rectangle of up to ``max_fraction`` of each side."""

    op: Literal["erase"] = "erase"
    probability: float = Field(default=0.5, ge=0.0, le=1.0)
    max_fraction: float = Field(default=0.4, gt=0.0, le=1.0)


AugmentStep = Annotated[
    Shift | Rotation | Zoom | Shear | Flip | Thickness | Contrast | Noise | Erase,
    Field(discriminator="op"),
]
GEOMETRIC = (Shift, Rotation, Zoom, Shear, Flip)


# --- implementation -----------------------------------------------------------------------------


def _uniform(seed: tf.Tensor, n: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([n], seed=seed, minval=low, maxval=high)


def _geometric_matrix(step: _Step, seed: tf.Tensor, n: tf.Tensor, h: int, w: int) -> tf.Tensor:
    """A batch of 3×3 matrices mapping *output* pixel coordinates to *input* coordinates, about the centre.

    The random parameters are symmetric, so drawing the inverse transform directly is the same
    distribution as drawing the forward one and inverting it.
    """
    one, zero = tf.ones([n]), tf.zeros([n])
    if isinstance(step, Shift):
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        dx = _uniform(s1, n, -step.max_fraction, step.max_fraction) * w
        dy = _uniform(s2, n, -step.max_fraction, step.max_fraction) * h
        rows = [[one, zero, dx], [zero, one, dy]]
    elif isinstance(step, Rotation):
        a = _uniform(seed, n, -step.max_degrees, step.max_degrees) * (math.pi / 180.0)
        rows = [[tf.cos(a), -tf.sin(a), zero], [tf.sin(a), tf.cos(a), zero]]
    elif isinstance(step, Zoom):
        s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        sx = _uniform(s1, n, 1.0 - step.max_fraction, 1.0 + step.max_fraction)
        sy = _uniform(s2, n, 1.0 - step.max_fraction, 1.0 + step.max_fraction) if step.independent_axes else sx
        rows = [[sx, zero, zero], [zero, sy, zero]]
    elif isinstance(step, Shear):
        k = tf.tan(_uniform(seed, n, -step.max_degrees, step.max_degrees) * (math.pi / 180.0))
        rows = [[one, k, zero], [zero, one, zero]]
    elif isinstance(step, Flip):
        flip = tf.where(_uniform(seed, n, 0.0, 1.0) < step.probability, -one, one)
        rows = [[flip, zero, zero], [zero, one, zero]]
    else:  # pragma: no cover - guarded by GEOMETRIC
        raise TypeError(f"not a geometric step: {step!r}")
    m = tf.stack([tf.stack(r, axis=-1) for r in rows] + [tf.stack([zero, zero, one], axis=-1)], axis=1)
    # Conjugate with a move of the origin to the image centre: C · M · C⁻¹.
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    to_centre = tf.constant([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    from_centre = tf.constant([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    return to_centre @ m @ from_centre


def _warp(images: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    h, w = images.shape[1], images.shape[2]
    flat = tf.reshape(matrix, [-1, 9])[:, :8] / matrix[:, 2:3, 2]
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=flat, output_shape=tf.constant([h, w], tf.int32),
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


def _morph(images: tf.Tensor, dilate: bool) -> tf.Tensor:
    if dilate:
        return tf.nn.max_pool2d(images, ksize=3, strides=1, padding="SAME")
    return -tf.nn.max_pool2d(-images, ksize=3, strides=1, padding="SAME")


def _thickness(images: tf.Tensor, step: Thickness, seed: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    t = tf.reshape(_uniform(seed, n, -step.max_erode, step.max_dilate), [-1, 1, 1, 1])
    out = images
    for dilate, limit in ((True, step.max_dilate), (False, step.max_erode)):
        amount = tf.maximum(t, 0.0) if dilate else tf.maximum(-t, 0.0)
        prev = images
        for k in range(math.ceil(limit)):
            nxt = _morph(prev, dilate)
            frac = tf.clip_by_value(amount - k, 0.0, 1.0)  # how much of pass k this image takes
            out = out + frac * (nxt - prev)
            prev = nxt
    return tf.clip_by_value(out, 0.0, 1.0)


def _contrast(images: tf.Tensor, step: Contrast, seed: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    peak = tf.reshape(_uniform(s1, n, step.min_peak, 1.0), [-1, 1, 1, 1])
    background = tf.reshape(_uniform(s2, n, 0.0, step.max_background), [-1, 1, 1, 1])
    background = tf.minimum(background, peak)
    return background + (peak - background) * images


def _noise(images: tf.Tensor, step: Noise, seed: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    sd = tf.reshape(_uniform(s1, n, 0.0, step.max_stddev), [-1, 1, 1, 1])
    return tf.clip_by_value(images + sd * tf.random.stateless_normal(tf.shape(images), seed=s2), 0.0, 1.0)


def _erase(images: tf.Tensor, step: Erase, seed: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    h, w = images.shape[1], images.shape[2]
    s = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    eh = _uniform(s[0], n, 0.0, step.max_fraction) * h
    ew = _uniform(s[1], n, 0.0, step.max_fraction) * w
    y0 = _uniform(s[2], n, 0.0, 1.0) * (h - eh)
    x0 = _uniform(s[3], n, 0.0, 1.0) * (w - ew)
    apply = _uniform(s[4], n, 0.0, 1.0) < step.probability
    ys = tf.reshape(tf.range(h, dtype=tf.float32), [1, h, 1])
    xs = tf.reshape(tf.range(w, dtype=tf.float32), [1, 1, w])
    inside = ((ys >= tf.reshape(y0, [-1, 1, 1])) & (ys < tf.reshape(y0 + eh, [-1, 1, 1]))
              & (xs >= tf.reshape(x0, [-1, 1, 1])) & (xs < tf.reshape(x0 + ew, [-1, 1, 1]))
              & tf.reshape(apply, [-1, 1, 1]))
    return images * (1.0 - tf.cast(inside, images.dtype)[..., None])


def augment(images: tf.Tensor, steps: list[AugmentStep], seed: tf.Tensor) -> tf.Tensor:
    """Apply ``steps`` in order to a batch ``(B, H, W, C)``; ``seed`` is a shape-[2] int tensor."""
    if not steps:
        return images
    h, w = images.shape[1], images.shape[2]
    if h is None or w is None:
        raise ValueError("augment needs a static image height and width")
    n = tf.shape(images)[0]
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, len(steps)))
    pending: tf.Tensor | None = None  # composed geometric transform not yet applied
    for step, s in zip(steps, seeds, strict=True):
        if isinstance(step, GEOMETRIC):
            m = _geometric_matrix(step, s, n, h, w)
            pending = m if pending is None else pending @ m
            continue
        if pending is not None:
            images, pending = _warp(images, pending), None
        if isinstance(step, Thickness):
            images = _thickness(images, step, s, n)
        elif isinstance(step, Contrast):
            images = _contrast(images, step, s, n)
        elif isinstance(step, Noise):
            images = _noise(images, step, s, n)
        elif isinstance(step, Erase):
            images = _erase(images, step, s, n)
    if pending is not None:
        images = _warp(images, pending)
    return images
