"""Image preprocessing steps a package's ``config.json`` can list, each a small pure function.

The MNIST steps reproduce how the data set was built (LeCun et al.): the digit is
size-normalised into a 20×20 box keeping its aspect ratio, then centred by its centre
of mass in a 28×28 field. Applying the same steps to an ordinary photo or screenshot
(dark ink on light paper, any size, off-centre) is what makes an MNIST model work on it.

Arrays between steps are float32 in [0, 255], light ink on a dark background once
``auto_invert`` has run.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

from predictors.package import (
    AutoInvertStep,
    CenterOfMassStep,
    CropToInkStep,
    DecodeStep,
    FitStep,
    GrayscaleStep,
    PreprocessStep,
    ResizeStep,
    RGBStep,
    ScaleStep,
)
from predictors.protocol.errors import InvalidImage, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")


class DecodeBudget:
    """What one request's images may still cost: pixels (all images together, and each one) and time.

    Pixels are read from the image header before anything is decoded; the deadline is checked before each
    image and between steps (a step runs to its end, and a step's work is bounded by the pixel limits).
    """

    def __init__(self, max_pixels: int, max_total_pixels: int, deadline_s: float) -> None:
        self.max_pixels = max_pixels
        self.max_total_pixels = max_total_pixels
        self.pixels_left = max_total_pixels
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s

    def take_pixels(self, width: int, height: int, step_limit: int) -> None:
        pixels = width * height
        limit = min(step_limit, self.max_pixels)
        if pixels > limit:
            raise InvalidImage(f"image is {width}x{height} = {pixels} pixels; the limit is {limit}")
        self.pixels_left -= pixels
        if self.pixels_left < 0:
            raise PayloadTooLarge(f"the images of this request have more than {self.max_total_pixels} pixels "
                                  "together")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise PayloadTooLarge(f"decoding the images of this request took longer than the "
                                  f"{self.deadline_s:g}s limit")


def decode(data: bytes, step: DecodeStep, budget: DecodeBudget | None = None) -> Image.Image:
    """Decode encoded image bytes, refusing oversized files, decompression bombs and truncated data."""
    if len(data) == 0:
        raise InvalidImage("image is empty (0 bytes)")
    if len(data) > step.max_bytes:
        raise InvalidImage(f"image is {len(data)} bytes; the limit is {step.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if budget is not None:
                budget.take_pixels(width, height, step.max_pixels)
            elif width * height > step.max_pixels:
                raise InvalidImage(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {step.max_pixels}")
            image.load()  # forces full decode: truncated files fail here
    except (InvalidImage, PayloadTooLarge):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImage(f"image refused as a decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidImage(f"bytes are not a valid {'/'.join(ALLOWED_FORMATS)} image (format not recognised)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"bytes are not a valid {'/'.join(ALLOWED_FORMATS)} image: {exc}") from exc
    return image


def grayscale(image: Image.Image | np.ndarray, _: GrayscaleStep | None = None) -> np.ndarray:
    """One luminance channel as float32; transparent pixels are composited on white (paper)."""
    if isinstance(image, np.ndarray):
        return image.astype(np.float32)
    return np.asarray(ImageOps.grayscale(_on_white(image)), dtype=np.float32)


def rgb(image: Image.Image | np.ndarray, _: RGBStep | None = None) -> np.ndarray:
    """Three channels ``[H, W, 3]`` as float32; transparent pixels are composited on white."""
    if isinstance(image, np.ndarray):
        return np.repeat(image[..., None], 3, axis=-1).astype(np.float32) if image.ndim == 2 else image
    return np.asarray(_on_white(image), dtype=np.float32)


def _on_white(image: Image.Image) -> Image.Image:
    """The image in RGB, transparency composited on white paper."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Pasting through the alpha mask gives what Image.alpha_composite gives on opaque paper, pixel for
        # pixel, without holding the GIL for the whole image (the event loop shares the process).
        rgba = image.convert("RGBA")
        paper = Image.new("RGB", rgba.size, (255, 255, 255))
        paper.paste(rgba, mask=rgba.getchannel("A"))
        return paper
    return image.convert("RGB")


def auto_invert(pixels: np.ndarray, step: AutoInvertStep) -> np.ndarray:
    """Invert when the border is mostly light, i.e. dark ink on light paper, to get MNIST's light-on-dark."""
    border = np.concatenate([pixels[0, :], pixels[-1, :], pixels[:, 0], pixels[:, -1]])
    if border.size and float(np.median(border)) > step.threshold * 255.0:
        return 255.0 - pixels
    return pixels


PAPER_FIT_SAMPLES = 1_000  # grid pixels the paper surface is fitted on: lighting is smooth, 1,000 is plenty


def paper_level(pixels: np.ndarray) -> np.ndarray:
    """The background under every pixel: a smooth quadratic surface fitted to the pixels that are not ink.

    A photo lit from one side has paper that darkens across the frame; one constant level would
    call the dark side ink (or miss faint ink on the bright side). The fit starts on the darker
    half of the pixels (ink is light after ``auto_invert``) and drops outliers twice, so strokes
    do not pull the surface up. The fit uses at most ``PAPER_FIT_SAMPLES`` pixels on a grid.
    """
    h, w = pixels.shape
    stride = max(1, int(np.sqrt(h * w / PAPER_FIT_SAMPLES)))
    y, x = np.linspace(-1.0, 1.0, h), np.linspace(-1.0, 1.0, w)
    ys, xs = (g.ravel() for g in np.meshgrid(y[::stride], x[::stride], indexing="ij"))
    design = np.stack([np.ones_like(ys), xs, ys, xs * xs, xs * ys, ys * ys], axis=1)
    values = pixels[::stride, ::stride].astype(np.float64).ravel()
    keep = values <= np.median(values)
    coef = np.zeros(design.shape[1])
    for _ in range(3):
        if keep.sum() < design.shape[1]:
            break
        used = design[keep]
        coef = np.linalg.solve(used.T @ used + 1e-9 * np.eye(design.shape[1]), used.T @ values[keep])
        residual = values - design @ coef
        spread = 1.4826 * float(np.median(np.abs(residual[keep]))) + 1.0
        keep = residual < 3.0 * spread
    c = coef.astype(np.float32)
    y32, x32 = y.astype(np.float32), x.astype(np.float32)
    rows = (c[0] + c[2] * y32 + c[5] * y32 * y32)[:, None]
    cols = (c[1] * x32 + c[3] * x32 * x32)[None, :]
    return rows + cols + c[4] * np.outer(y32, x32)


def crop_to_ink(pixels: np.ndarray, step: CropToInkStep) -> np.ndarray:
    """Crop to the bounding box of ink above the paper; an image with no ink is returned unchanged.

    The paper level (see :func:`paper_level`) is subtracted first, so grey or unevenly lit paper and
    JPEG noise do not count as ink, and the crop is stretched so the strongest ink is 255.
    """
    if not pixels.size or float(pixels.max()) <= 0:
        return pixels
    flat = pixels - paper_level(pixels)
    peak = float(flat.max())
    if peak <= 0:
        return pixels
    ink = flat > step.threshold * peak
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    cropped = flat[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    return np.clip(cropped, 0.0, 255.0) * (255.0 / max(peak, 1.0))


def fit(pixels: np.ndarray, step: FitStep) -> np.ndarray:
    """Resize so the longer side is ``size`` keeping the aspect ratio (antialiased, like MNIST)."""
    h, w = pixels.shape
    scale = step.size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.float32), mode="F")
    return np.asarray(image.resize((new_w, new_h), Image.Resampling.LANCZOS), dtype=np.float32).clip(0, 255)


def center_of_mass(pixels: np.ndarray, step: CenterOfMassStep) -> np.ndarray:
    """Place ``pixels`` in a ``size``×``size`` field so its centre of mass is at the centre."""
    size = step.size
    h, w = pixels.shape
    if h > size or w > size:
        pixels = fit(pixels, FitStep(size=size))
        h, w = pixels.shape
    canvas = np.zeros((size, size), dtype=np.float32)
    total = float(pixels.sum())
    if total <= 0:
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    else:
        ys, xs = np.indices(pixels.shape, dtype=np.float64)
        cy, cx = float((ys * pixels).sum() / total), float((xs * pixels).sum() / total)
    top = round((size - 1) / 2.0 - cy)
    left = round((size - 1) / 2.0 - cx)
    top, left = min(max(top, 0), size - h), min(max(left, 0), size - w)
    canvas[top: top + h, left: left + w] = pixels
    return canvas


def resize(pixels: np.ndarray, step: ResizeStep) -> np.ndarray:
    """Plain resize to the step's height × width, channel by channel (for data sets not centred by mass,
    like Fashion-MNIST, and colour photos)."""
    height, width = step.shape
    if pixels.ndim == 3:
        return np.stack([resize(pixels[..., c], step) for c in range(pixels.shape[2])], axis=-1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32).clip(0, 255)


def scale(pixels: np.ndarray, step: ScaleStep) -> np.ndarray:
    return (pixels / step.divisor).astype(np.float32)


_ARRAY_STEPS: dict[str, Callable[[np.ndarray, object], np.ndarray]] = {
    "auto_invert": auto_invert,
    "crop_to_ink": crop_to_ink,
    "fit": fit,
    "center_of_mass": center_of_mass,
    "resize": resize,
    "scale": scale,
}


def run_image_pipeline(data: bytes, steps: Sequence[PreprocessStep],
                       budget: DecodeBudget | None = None) -> np.ndarray:
    """Encoded image bytes → the model's float32 input (``[H, W]``, or ``[H, W, 3]`` after ``rgb``), by the
    package's steps in order, within
    ``budget`` when given (the request's pixels and deadline)."""
    value: Image.Image | np.ndarray = data  # type: ignore[assignment]
    started = False
    for step in steps:
        if budget is not None:
            budget.check_time()
        if step.op == "decode":
            value = decode(data, step, budget)
            started = True
        elif step.op == "grayscale":
            value = grayscale(value)
        elif step.op == "rgb":
            value = rgb(value)
        else:
            if not started:
                raise InvalidImage("package pipeline must decode before array steps")
            if not isinstance(value, np.ndarray):
                value = grayscale(value)
            value = _ARRAY_STEPS[step.op](value, step)
    if not isinstance(value, np.ndarray):
        raise InvalidImage("package pipeline produced no pixel array")
    return value


def default_decode_step(steps: Sequence[PreprocessStep]) -> DecodeStep:
    """The package's decode step (for its limits), or the defaults."""
    return next((s for s in steps if isinstance(s, DecodeStep)), DecodeStep())


def pixel_divisor(steps: Sequence[PreprocessStep]) -> float:
    """The divisor the package's scale step uses (255 by default): raw UINT8 tensors are scaled by it."""
    return next((s.divisor for s in steps if isinstance(s, ScaleStep)), 255.0)


__all__ = [
    "DecodeBudget",
    "auto_invert",
    "center_of_mass",
    "crop_to_ink",
    "decode",
    "default_decode_step",
    "fit",
    "grayscale",
    "pixel_divisor",
    "resize",
    "rgb",
    "run_image_pipeline",
    "scale",
]
