"""Request producers of the two reference designs: Iris rows and test images.

* ``produce iris`` streams the saved Iris test split (``models/iris/test.csv``, written by
  training) row by row with a delay, as the Iris design did, or at full speed for a replay. The
  feature columns are whatever the CSV header says; every column except ``label``/``label_name``
  (and an optional ``id``) is a feature, in file order.
* ``produce images`` sends random Fashion-MNIST (or MNIST) *test* images as base64 PNG with an
  image id, optionally with the true label so ``results --feedback`` can score them.

Every message is a CloudEvent in Kafka binary mode (``ce_*`` headers), with the request id as
record key, CloudEvent id and ``id`` field -- so any consumer can correlate it with its result.
Ids are ``<run>-<n>``; the run id defaults to a timestamp so repeated runs never collide.
"""

from __future__ import annotations

import base64
import csv
import io
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from streaming.cloudevents import CloudEvent, now, to_kafka_headers
from streaming.messenger import Messenger

REQUEST_TYPE = "org.kcp.inference.request"
LABEL_COLUMNS = ("label", "label_name", "id")
DEFAULT_IRIS_CSV = Path("models/iris/test.csv")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

RowForm = Literal["row", "features", "v2"]


@dataclass
class Outgoing:
    """A request ready to send: key (= request id), JSON-able value, headers."""

    key: str
    value: dict[str, Any]
    headers: list[tuple[str, bytes]] = field(default_factory=list)


def default_run_id() -> str:
    return time.strftime("%Y%m%d%H%M%S")


def cloudevent_headers(request_id: str, source: str, model: str, form: str) -> list[tuple[str, bytes]]:
    """Binary-mode CloudEvent headers for a request, plus the ``kcp-model`` routing header."""
    event = CloudEvent(id=request_id, source=source, type=f"{REQUEST_TYPE}.{form}", subject=model, time=now(),
                       datacontenttype="application/json")
    return [*to_kafka_headers(event), ("kcp-model", model.encode())]


# --- Iris ------------------------------------------------------------------------------------


def read_rows(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header-driven CSV read: the feature columns and all rows (as strings)."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{csv_path} has no header row")
        features = [c for c in reader.fieldnames if c.strip().lower() not in LABEL_COLUMNS]
        return features, list(reader)


def iris_messages(csv_path: Path = DEFAULT_IRIS_CSV, *, form: RowForm = "row", model: str = "iris",
                  run_id: str | None = None) -> list[Outgoing]:
    """One message per test row, in file order."""
    features, rows = read_rows(csv_path)
    run_id = run_id or default_run_id()
    out = []
    for i, row in enumerate(rows):
        rid = f"{run_id}-iris-{i}"
        values = [float(row[c]) for c in features]
        labels: dict[str, Any] = {}
        if row.get("label") not in (None, ""):
            labels["label"] = int(float(row["label"]))
        if row.get("label_name"):
            labels["label_name"] = row["label_name"]
        if form == "row":
            value: dict[str, Any] = {"id": rid, **dict(zip(features, values, strict=True)), **labels, "model": model}
        elif form == "features":
            value = {"id": rid, "features": values, **labels, "model": model}
        else:
            value = {"id": rid, "model_name": model,
                     "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, len(values)], "data": values}],
                     **({"true_label": labels["label"]} if "label" in labels else {})}
        out.append(Outgoing(rid, value, cloudevent_headers(rid, "/kcp/streaming/producer/iris", model, form)))
    return out


# --- images ----------------------------------------------------------------------------------


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


# --- sending ---------------------------------------------------------------------------------


def produce(messenger: Messenger, messages: Iterable[Outgoing], *, delay_s: float = 0.0,
            on_sent: Any = None) -> int:
    """Send each message (waiting ``delay_s`` between them); at full speed acks are awaited at the end."""
    pending = []
    sent = 0
    for i, m in enumerate(messages):
        if delay_s > 0 and i:
            time.sleep(delay_s)
        future = messenger.send_async(m.value, key=m.key, headers=m.headers)
        if delay_s > 0:
            future.result(timeout=60)
            if on_sent:
                on_sent(m)
        else:
            pending.append((m, future))
        sent += 1
    for m, future in pending:
        future.result(timeout=60)
        if on_sent:
            on_sent(m)
    return sent


def repeat(messages: list[Outgoing], times: int) -> Iterator[Outgoing]:
    """The same requests ``times`` over, each pass with fresh ids (``-r<k>`` suffix)."""
    for k in range(times):
        for m in messages:
            if k == 0:
                yield m
                continue
            rid = f"{m.key}-r{k}"
            value = {**m.value, "id": rid}
            headers = [(h, rid.encode() if h == "ce_id" else v) for h, v in m.headers]
            yield Outgoing(rid, value, headers)
