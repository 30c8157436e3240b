"""Photographed-style digits: held-out MNIST digits as a phone or a scanner would deliver them.

The clean test split measures the model on MNIST's own normalisation; users send photos. This
module turns each held-out digit into several encoded images the way paper and cameras do —
dark ink on light paper (sometimes light on dark), from a third of the MNIST size to four times it,
anywhere in a larger frame, thicker or thinner strokes, mild blur, uneven lighting, sensor noise, JPEG at quality
30–90 or PNG, grey, RGB or RGBA (transparent or opaque) — and scores a model on them through the
package's own preprocessing, the function the server runs on every encoded image.

Everything is drawn from one seed, so the set is the same on every machine and run. Only test
rows are ever rendered: nothing here sees a training digit.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from predictors.models.preprocessing import run_image_pipeline
from predictors.package import PreprocessStep

MIN_SCALE, MAX_SCALE = 0.3, 4.0
JPEG_QUALITY = (30, 90)
MODES = ("L", "RGB", "RGBA")


@dataclass(frozen=True)
class PhotoSet:
    """Encoded images, their true labels, and how each was made (for reading the failures)."""

    images: list[bytes]
    labels: np.ndarray
    params: list[dict[str, Any]]


def _thickness(ink: np.ndarray, amount: float) -> np.ndarray:
    """Fractional grey dilation (amount > 0) or erosion (< 0) by 3×3 passes on a float [0, 1] image."""
    image = Image.fromarray(ink.astype(np.float32), mode="F")
    out, prev = ink, ink
    for k in range(int(np.ceil(abs(amount)))):
        nxt_image = image.filter(ImageFilter.MaxFilter(3) if amount > 0 else ImageFilter.MinFilter(3))
        nxt = np.asarray(nxt_image, dtype=np.float32)
        out = out + min(abs(amount) - k, 1.0) * (nxt - prev)
        prev, image = nxt, nxt_image
    return out


def _lighting(h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """Paper brightness 0..255: a base level with a linear fall-off in a random direction."""
    base = rng.uniform(180.0, 250.0)
    drop = rng.uniform(0.0, 60.0)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    along = (xs / max(w - 1, 1)) * np.cos(angle) + (ys / max(h - 1, 1)) * np.sin(angle)
    along = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
    return base - drop * along, {"paper": round(base, 1), "shadow": round(drop, 1)}


def photograph(digit: np.ndarray, rng: np.random.Generator) -> tuple[bytes, dict[str, Any]]:
    """One 28×28 light-on-dark MNIST digit → encoded image bytes as a user might send it, and its recipe."""
    ink = np.asarray(Image.fromarray(digit).resize((56, 56), Image.Resampling.BICUBIC), np.float32) / 255.0
    stroke = float(rng.uniform(-1.0, 2.0))  # 3×3 passes at twice the MNIST resolution
    ink = np.clip(_thickness(np.clip(ink, 0.0, 1.0), stroke), 0.0, 1.0)

    scale = float(np.exp(rng.uniform(np.log(MIN_SCALE), np.log(MAX_SCALE))))
    side = max(8, round(28 * scale))
    ink_image = Image.fromarray(np.rint(ink * 255.0).astype(np.uint8)).resize((side, side), Image.Resampling.LANCZOS)
    blur = float(rng.uniform(0.0, 0.5)) * scale  # mild: at most half an MNIST pixel
    if blur > 0.2:
        ink_image = ink_image.filter(ImageFilter.GaussianBlur(blur))
    alpha = np.asarray(ink_image, dtype=np.float32) / 255.0

    w = round(side * rng.uniform(1.2, 3.5)) + 4
    h = round(side * rng.uniform(1.2, 3.5)) + 4
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    coverage = np.zeros((h, w), dtype=np.float32)
    coverage[top: top + side, left: left + side] = alpha

    paper, light = _lighting(h, w, rng)
    tint = rng.uniform(-8.0, 8.0, size=3)
    ink_level = rng.uniform(0.0, 70.0)  # at least 50 levels darker than the darkest paper
    ink_tint = rng.uniform(-20.0, 20.0, size=3)
    rgb = np.stack([paper + tint[c] for c in range(3)], axis=-1)
    ink_rgb = np.clip(ink_level + ink_tint, 0.0, 255.0)
    rgb = rgb * (1.0 - coverage[..., None]) + ink_rgb * coverage[..., None]
    noise = float(rng.uniform(0.0, 6.0))
    rgb = rgb + rng.normal(0.0, noise, size=rgb.shape)
    inverted = bool(rng.random() < 0.15)  # chalk, or a screenshot of a dark theme
    if inverted:
        rgb = 255.0 - rgb
    pixels = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    mode = str(rng.choice(MODES))
    transparent = mode == "RGBA" and not inverted and bool(rng.random() < 0.5)
    if mode == "L":
        image = Image.fromarray(pixels).convert("L")
    elif mode == "RGB":
        image = Image.fromarray(pixels)
    else:
        a = np.rint(coverage * 255.0).astype(np.uint8) if transparent else np.full((h, w), 255, np.uint8)
        image = Image.fromarray(np.dstack([pixels, a]))
    jpeg = mode != "RGBA" and bool(rng.random() < 0.6)
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)) if jpeg else None
    buffer = io.BytesIO()
    if jpeg:
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    recipe = {"scale": round(scale, 2), "stroke": round(stroke, 2), "blur": round(blur, 2), **light,
              "ink": round(ink_level, 1), "noise": round(noise, 1), "inverted": inverted, "mode": mode,
              "transparent": transparent, "format": "JPEG" if jpeg else "PNG", "quality": quality,
              "size": [w, h]}
    return buffer.getvalue(), recipe


def photo_set(x_test: np.ndarray, y_test: np.ndarray, per_digit: int = 3, seed: int = 0,
              rows: Sequence[int] | None = None) -> PhotoSet:
    """``per_digit`` photographs of each held-out digit (of ``rows`` only, if given).

    Photograph ``k`` of row ``i`` is drawn from its own generator seeded by ``(seed, i, k)``, so a
    subset of rows reproduces exactly those images of the full set (the fast pinned test relies on it).
    """
    chosen = range(len(x_test)) if rows is None else [int(r) for r in rows]
    images: list[bytes] = []
    params: list[dict[str, Any]] = []
    labels: list[int] = []
    for i in chosen:
        for k in range(per_digit):
            data, recipe = photograph(x_test[i], np.random.default_rng([seed, i, k]))
            images.append(data)
            params.append({"row": i, **recipe})
            labels.append(int(y_test[i]))
    return PhotoSet(images, np.asarray(labels, dtype=np.int64), params)


def preprocess(photos: PhotoSet, steps: Sequence[PreprocessStep]) -> np.ndarray:
    """The model inputs the server would build from these images: ``run_image_pipeline`` on each."""
    return np.stack([run_image_pipeline(data, steps) for data in photos.images])


def predict(model: Any, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Predicted class ids for already-preprocessed inputs, by ``predict_on_batch`` over chunks."""
    return np.concatenate([np.asarray(model.predict_on_batch(x[i:i + batch_size])).argmax(axis=1)
                           for i in range(0, len(x), batch_size)])
