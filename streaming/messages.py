"""Decoding request messages into V2 inference requests, and naming what is wrong with bad ones.

Accepted forms (the record value, optionally wrapped as a CloudEvent in binary or structured mode):

* **V2 request** -- a V2 inference request JSON (``{"inputs": [...], "id"?, "outputs"?, "parameters"?}``).
  The model is named by the ``kcp-model`` header (or ``ce_model``), or the ``model_name``/``model``
  field; the version by ``kcp-model-version`` or ``model_version``.
* **row** -- one tabular row (the Iris design): ``{"sepal_length": 5.1, ..., "label": 0}`` with the
  feature columns named as in the training CSV (``"sepal length (cm)"`` works too), or
  ``{"features": [5.1, 3.5, 1.4, 0.2]}``, or a bare JSON list. Model defaults to ``iris``. A model that
  takes one tensor per column (a data frame) gets ``{"model": "churn", "features": {"age": 52, "city":
  "paris"}}`` (or a list of such objects): one tensor per column, numbers FP64 and strings BYTES.
* **image** -- ``{"image_id": "...", "image_b64": "<base64 PNG/JPEG>", "true_label"?: 3}`` (the image
  design), or raw PNG/JPEG bytes with an ``image/*`` content type. Model defaults to ``fashion-mnist``.

The request id -- the result's key and correlation -- is, in order: the body's ``id`` (or
``image_id``), the CloudEvent ``id``, the record key, else the record's position
(``topic/partition/offset``). Every choice is stable across redelivery, so a duplicate result
carries the same id as the first and consumers can drop it. Ids (and a ``kcp-correlation-id`` header)
longer than ``max_id_chars`` (256, the bound the server's ids have too) or holding lone surrogates are
refused as ``invalid-request``: the id is copied into the key, a header, the CloudEvent and the body,
so an unbounded one could make a result too large to publish.

A message that cannot become a request raises :class:`BadMessage` with a ``kind`` the dead-letter
record carries: ``undecodable`` (not UTF-8 and not an image), ``invalid-json``,
``invalid-cloudevent`` or ``invalid-request`` (JSON, but not any accepted form).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from streaming.cloudevents import CloudEvent, CloudEventError, from_kafka
from streaming.messenger import CORRELATION_HEADER, Message
from streaming.tensors import InferRequest, Tensor, flatten

MODEL_HEADERS = ("kcp-model", "ce_model")
VERSION_HEADERS = ("kcp-model-version", "ce_modelversion")
IMAGE_FIELDS = ("image_b64", "image", "b64")
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_NUMBERS = (int, float)


class BadMessage(ValueError):
    """A message that can never become a valid request; it goes to the dead-letter topic."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class DecodeOptions:
    """Defaults for the simple forms (mirrors the ``KCP_BRIDGE_*`` settings)."""

    default_row_model: str = "iris"
    default_image_model: str = "fashion-mnist"
    input_name: str = "input-0"
    ids_input: str | None = "ids"
    row_features: tuple[str, ...] = ("sepal_length", "sepal_width", "petal_length", "petal_width")
    max_id_chars: int = 256


@dataclass
class DecodedRequest:
    """A request ready for the model server, plus what the result must carry back."""

    request: InferRequest
    request_id: str
    correlation_id: str
    form: str
    true_label: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    cloudevent: CloudEvent | None = None


def normalise_name(name: str) -> str:
    """``"Sepal Length (cm)"`` -> ``"sepal_length"``: CSV headers and JSON keys compare equal."""
    name = re.sub(r"\(.*?\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def _parse_json(text: str) -> Any:
    """orjson (several times faster), else the standard library, which also accepts what orjson refuses
    (NaN, integers over 64 bits, lone surrogates) and words the error a dead letter carries."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _header_str(headers: Mapping[str, bytes], name: str) -> str | None:
    value = headers.get(name)
    return value.decode("utf-8", errors="replace") if value is not None else None


def decode(message: Message, options: DecodeOptions | None = None) -> DecodedRequest:
    """Turn one record into a :class:`DecodedRequest`, or raise :class:`BadMessage`."""
    options = options or DecodeOptions()
    # header names compare case-insensitively and the last one wins: one lower-cased map per message
    headers = {k.lower(): v for k, v in message.headers}
    try:
        event = from_kafka(message.headers, message.value)
    except CloudEventError as exc:
        raise BadMessage("invalid-cloudevent", str(exc)) from exc
    body = (event.data or b"") if event is not None else message.value
    content_type = (event.datacontenttype if event else _header_str(headers, "content-type")) or ""

    if content_type.lower().startswith("image/") or body.startswith(IMAGE_MAGIC):
        return _image(message, headers, event, options, body, {}, explicit_id=None)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadMessage("undecodable", f"value is neither UTF-8 JSON nor a PNG/JPEG image ({exc.reason} at byte "
                                        f"{exc.start})") from exc
    try:
        doc = _parse_json(text)
    except ValueError as exc:
        raise BadMessage("invalid-json", f"value is not valid JSON: {exc}") from exc

    if isinstance(doc, dict) and "inputs" in doc:
        return _v2(message, headers, event, options, doc)
    if isinstance(doc, dict) and any(isinstance(doc.get(f), str) for f in IMAGE_FIELDS):
        raw = next(doc[f] for f in IMAGE_FIELDS if isinstance(doc.get(f), str))
        return _image(message, headers, event, options, _b64(raw), doc,
                      explicit_id=doc.get("id", doc.get("image_id")))
    if isinstance(doc, list) or (isinstance(doc, dict) and ("features" in doc or _named_features(doc, options))):
        return _row(message, headers, event, options, doc)
    shown = sorted(doc)[:8] if isinstance(doc, dict) else type(doc).__name__
    raise BadMessage("invalid-request", f"not a V2 request, tabular row or image message (got {shown})")


# --- ids and model ---------------------------------------------------------------------------


def _request_id(message: Message, event: CloudEvent | None, explicit: Any) -> str:
    if explicit not in (None, ""):
        return str(explicit)
    if event is not None:
        return event.id
    if message.key:
        return message.key_str or ""
    return message.position or f"{message.topic}/{message.partition}/{message.offset}"


def _first_header(headers: Mapping[str, bytes], names: tuple[str, ...]) -> str | None:
    """The first of ``names`` present with a non-empty value, decoded."""
    for name in names:
        raw = headers.get(name)
        if raw:
            return raw.decode("utf-8", errors="replace")
    return None


def _model(headers: Mapping[str, bytes], doc: dict[str, Any], default: str | None) -> tuple[str, str | None]:
    model = _first_header(headers, MODEL_HEADERS) or doc.get("model_name") or doc.get("model") or default
    if not model or not isinstance(model, str):
        raise BadMessage("invalid-request", "no model named (kcp-model header or model_name field)")
    version = _first_header(headers, VERSION_HEADERS) or doc.get("model_version")
    return model, str(version) if version not in (None, "") else None


def _finish(message: Message, headers: Mapping[str, bytes], event: CloudEvent | None, options: DecodeOptions,
            request: InferRequest, form: str, doc: dict[str, Any], explicit_id: Any,
            extra: dict[str, Any] | None = None) -> DecodedRequest:
    rid = _checked_id("request id", _request_id(message, event, explicit_id), options)
    request.id = rid
    true_label = doc["true_label"] if "true_label" in doc else doc.get("label")  # true_label first, then label
    extra = dict(extra) if extra else {}
    if "label_name" in doc:
        extra["true_label_name"] = doc["label_name"]
    header = headers.get(CORRELATION_HEADER)
    correlation = _checked_id("correlation id", header.decode("utf-8", errors="replace"), options) if header else rid
    return DecodedRequest(request, rid, correlation, form, true_label, extra, event)


def _checked_id(what: str, value: str, options: DecodeOptions) -> str:
    """An id goes into the key, the CloudEvent id, a header and the body: bound it, and it must be text."""
    if len(value) > options.max_id_chars:
        raise BadMessage("invalid-request", f"{what} is {len(value)} characters; the limit is {options.max_id_chars}")
    if not value.isascii():  # ASCII always encodes; anything else may hold a lone surrogate
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadMessage("invalid-request", f"{what} is not valid Unicode ({exc.reason})") from exc
    return value


# --- the three forms ---------------------------------------------------------------------------


def _v2(message: Message, headers: Mapping[str, bytes], event: CloudEvent | None, options: DecodeOptions,
        doc: dict[str, Any]) -> DecodedRequest:
    model, version = _model(headers, doc, None)
    raw_inputs = doc["inputs"]
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadMessage("invalid-request", "'inputs' must be a non-empty list")
    inputs = []
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict):
            raise BadMessage("invalid-request", f"inputs[{i}] is not an object")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise BadMessage("invalid-request", f"inputs[{i}] needs string 'name' and 'datatype'")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise BadMessage("invalid-request", f"inputs[{i}] ('{name}') needs an integer list 'shape'")
        if "data" not in t:
            raise BadMessage("invalid-request", f"inputs[{i}] ('{name}') has no 'data'")
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadMessage("invalid-request", f"inputs[{i}] ('{name}') 'parameters' must be an object")
        inputs.append(Tensor(name, datatype.upper(), list(shape), flatten(t["data"]), dict(params)))
    outputs = doc.get("outputs")
    names = None
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise BadMessage("invalid-request", "'outputs' must be a list of {\"name\": ...} objects")
        names = [o["name"] for o in outputs]
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadMessage("invalid-request", "'parameters' must be an object")
    request = InferRequest(model, inputs, model_version=version, outputs=names, parameters=dict(params))
    return _finish(message, headers, event, options, request, "v2", doc, doc.get("id"))


def _named_features(doc: dict[str, Any], options: DecodeOptions) -> list[float] | None:
    by_name = {normalise_name(k): v for k, v in doc.items()}
    wanted = [normalise_name(f) for f in options.row_features]
    if not all(f in by_name for f in wanted):
        return None
    return [by_name[f] for f in wanted]


def _columns(features: Any) -> list[Tensor] | None:
    """``{"column": value, ...}`` (one row) or a list of such objects (rows) as one V2 tensor per column:
    numbers as FP64, strings as BYTES; None when ``features`` is not in this form."""
    rows = [features] if isinstance(features, dict) else features
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return None
    names = list(rows[0])
    if not names or any(list(r) != names for r in rows):
        raise BadMessage("invalid-request", "every row of 'features' must name the same columns in the same order")
    tensors = []
    for name in names:
        values = [r[name] for r in rows]
        if all(isinstance(v, str) for v in values):
            tensors.append(Tensor(name, "BYTES", [len(rows)], [v.encode("utf-8") for v in values]))
        elif all(type(v) in (int, float) for v in values):
            tensors.append(Tensor(name, "FP64", [len(rows)], [float(v) for v in values]))
        else:
            raise BadMessage("invalid-request", f"column '{name}' must hold only numbers or only strings")
    return tensors


def _row(message: Message, headers: Mapping[str, bytes], event: CloudEvent | None, options: DecodeOptions,
         doc: Any) -> DecodedRequest:
    meta: dict[str, Any] = doc if isinstance(doc, dict) else {}
    columns = _columns(meta.get("features"))
    if columns is not None:
        model, version = _model(headers, meta, options.default_row_model)
        decoded = _finish(message, headers, event, options, InferRequest(model, columns, model_version=version),
                          "row", meta, meta.get("id"))
        _add_ids(columns, options, decoded.request_id, columns[0].shape[0])
        return decoded
    values = doc if isinstance(doc, list) else (doc["features"] if "features" in doc
                                                else _named_features(doc, options))
    if not isinstance(values, list) or not values:
        raise BadMessage("invalid-request", "row features must be a non-empty list of numbers")
    if isinstance(values[0], list):
        rows = len(values)
        width = len(values[0])
        if any(not isinstance(r, list) or len(r) != width for r in values):
            raise BadMessage("invalid-request", "rows must all have the same number of features")
        flat = [v for r in values for v in r]
    else:
        rows, width, flat = 1, len(values), values
    floats = True
    for v in flat:  # exact types: JSON gives int and float, and bool is no number
        if type(v) is not float:
            if type(v) is not int:
                raise BadMessage("invalid-request", "row features must be numbers")
            floats = False
    model, version = _model(headers, meta, options.default_row_model)
    # the parsed document is ours alone: an all-float row becomes the tensor's data without a copy
    data = flat if floats else [float(v) for v in flat]
    inputs = [Tensor(options.input_name, "FP32", [rows, width], data)]
    decoded = _finish(message, headers, event, options, InferRequest(model, inputs, model_version=version), "row",
                      meta, meta.get("id"))
    _add_ids(inputs, options, decoded.request_id, rows)
    return decoded


def _add_ids(inputs: list[Tensor], options: DecodeOptions, rid: str, rows: int) -> None:
    if options.ids_input:
        ids = [rid.encode("utf-8")] if rows == 1 else [f"{rid}/{i}".encode() for i in range(rows)]
        inputs.append(Tensor(options.ids_input, "BYTES", [rows], ids))


def _b64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # data URI
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadMessage("invalid-request", f"image is not valid base64: {exc}") from exc


def _image(message: Message, headers: Mapping[str, bytes], event: CloudEvent | None, options: DecodeOptions,
           image: bytes, doc: dict[str, Any], explicit_id: Any) -> DecodedRequest:
    if not image:
        raise BadMessage("invalid-request", "image is empty")
    model, version = _model(headers, doc, options.default_image_model)
    rid = _request_id(message, event, explicit_id)
    image_id = _checked_id("image id", str(doc.get("image_id") or rid), options)
    inputs = [Tensor(options.input_name, "BYTES", [1], [image])]
    if options.ids_input:
        inputs.append(Tensor(options.ids_input, "BYTES", [1], [image_id.encode("utf-8")]))
    request = InferRequest(model, inputs, model_version=version)
    return _finish(message, headers, event, options, request, "image", doc, rid, {"image_id": image_id})
