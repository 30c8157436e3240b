"""Request producers: tabular rows from a CSV, and the sending loop every producer shares.

``produce iris`` streams a saved test split (``models/iris/test.csv``, written by training) row by
row with a delay, or at full speed for a replay. The feature columns are whatever the CSV header
says; every column except ``label``/``label_name`` (and an optional ``id``) is a feature, in file
order. Test images are a development tool (``python -m devtools produce-images``,
:mod:`devtools.images`): their datasets and PNG encoder are not part of the bridge.

Every message is a CloudEvent in Kafka binary mode (``ce_*`` headers), with the request id as
record key, CloudEvent id and ``id`` field -- so any consumer can correlate it with its result.
Ids are ``<run>-<n>``; the run id defaults to a timestamp so repeated runs never collide.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streaming.cloudevents import CloudEvent, now, to_kafka_headers
from streaming.messenger import Messenger

REQUEST_TYPE = "org.kcp.inference.request"
LABEL_COLUMNS = ("label", "label_name", "id")
DEFAULT_IRIS_CSV = Path("models/iris/test.csv")

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
