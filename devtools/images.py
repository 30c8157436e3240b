"""Test-image requests: random Fashion-MNIST or MNIST *test* images as base64 PNG messages.

Development only: the images come from the datasets the training code reads (``training.datasets``) and
are encoded with Pillow, neither of which the bridge image holds. Each message has an image id and,
optionally, the true label, so ``python -m streaming results --feedback`` can score the predictions.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import numpy as np

from streaming.producers import Outgoing, cloudevent_headers, default_run_id

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_test_images(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Test images ``(N, 28, 28) uint8`` and labels: Fashion-MNIST t10k, or the MNIST 5k test split."""
    from training import datasets  # the project's offline loaders; nothing is downloaded

    if dataset == "fashion-mnist":
        images = datasets.read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
        labels = datasets.read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
        return images, labels
    if dataset == "mnist":
        x, y = datasets.read_mnist_5k()
        _, test = datasets.split_per_class(y)
        return x[test], y[test]
    raise ValueError(f"unknown dataset {dataset!r} (fashion-mnist or mnist)")


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def image_messages(dataset: str = "fashion-mnist", *, count: int = 20, seed: int | None = None,
                   with_labels: bool = False, model: str | None = None, run_id: str | None = None,
                   images: tuple[np.ndarray, np.ndarray] | None = None) -> list[Outgoing]:
    """``count`` random test images as ``{"image_id", "image_b64", "model", "true_label"?}`` messages."""
    x, y = images if images is not None else load_test_images(dataset)
    model = model or dataset
    run_id = run_id or default_run_id()
    rng = np.random.default_rng(seed)
    out = []
    for n, idx in enumerate(rng.integers(0, len(x), size=count)):
        rid = f"{run_id}-{dataset}-{n}"
        value: dict[str, Any] = {"id": rid, "image_id": f"{dataset}-test-{int(idx)}", "model": model,
                                 "image_b64": base64.b64encode(png_bytes(x[idx])).decode("ascii")}
        if with_labels:
            value["true_label"] = int(y[idx])
        out.append(Outgoing(rid, value, cloudevent_headers(rid, f"/kcp/streaming/producer/{dataset}", model,
                                                           "image")))
    return out
