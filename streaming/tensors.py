"""V2 (Open Inference Protocol) requests and responses as plain data, and micro-batch merge/split.

The bridge speaks V2 over gRPC or REST; this module is the protocol-neutral middle both sides
convert to and from (see :mod:`streaming.v2client`). Tensors keep their data flat and row-major.
BYTES elements are ``bytes`` (binary payloads, e.g. a PNG) or ``str`` (text from a JSON request,
which REST passes through unchanged and gRPC sends as UTF-8).

This module is the bridge's one V2 vocabulary: the datatype table, the BYTES codec (the raw
length-prefixed encoding gRPC and REST's binary extension share, and the JSON form) and the
tensor types; the transports in :mod:`streaming.v2client` only map them onto the wire.

Merging requests into one call is what makes per-model micro-batching possible: requests with
the same model, input names, datatypes and trailing dimensions are concatenated along the first
(batch) dimension, and the outputs are cut back into per-request slices by row count.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import os
import struct
import uuid
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The V2 datatypes: the numpy element type of each numeric one (little-endian, the raw wire order) and the gRPC
# typed-contents field a server may answer in (FP16 has none). Every other table here derives from this one.
_DATATYPES: dict[str, tuple[Any, str | None]] = {
    "BOOL": (np.bool_, "bool_contents"), "UINT8": (np.uint8, "uint_contents"), "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"), "UINT64": (np.uint64, "uint64_contents"),
    "INT8": (np.int8, "int_contents"), "INT16": (np.int16, "int_contents"), "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"), "FP16": (np.float16, None), "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"), "BYTES": (None, "bytes_contents"),
}
DATATYPES = frozenset(_DATATYPES)
NUMPY: dict[str, np.dtype] = {k: np.dtype(t).newbyteorder("<") for k, (t, _) in _DATATYPES.items() if t is not None}
CONTENTS_FIELD = {k: f for k, (_, f) in _DATATYPES.items() if f is not None}
ELEMENT_BYTES = {k: d.itemsize for k, d in NUMPY.items()}
TENSOR_OVERHEAD = 64  # name, datatype, shape and framing of one tensor in a call, generously


# Merged calls need an id of their own; a counter is unique within this process and costs nothing.
_BATCH_PREFIX = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
_batch_numbers = itertools.count()


class BatchSplitError(ValueError):
    """A batched response cannot be cut back into per-request parts (outputs not batch-major)."""


def bytes_elements(data: list[Any]) -> list[bytes]:
    """BYTES elements as bytes (text as UTF-8); TypeError for anything else."""
    out = []
    for v in data:
        if isinstance(v, bytes):
            out.append(v)
        elif isinstance(v, str):
            out.append(v.encode("utf-8"))
        else:
            raise TypeError(f"BYTES element of type {type(v).__name__} (expected text or bytes)")
    return out


def serialize_bytes(elements: list[bytes]) -> bytes:
    """The V2 raw encoding of a BYTES tensor: each element prefixed by its uint32 little-endian length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """The elements of a raw BYTES tensor; ValueError when it is truncated."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ValueError("truncated BYTES tensor")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ValueError("truncated BYTES tensor")
        out.append(raw[i + 4: i + 4 + n])
        i += 4 + n
    return out


@dataclass(slots=True)
class Tensor:
    """One named tensor with flat row-major ``data``."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int | None:
        return self.shape[0] if self.shape else None

    def consistent(self) -> bool:
        """Shape and element count agree (only such tensors are safe to batch)."""
        shape = self.shape
        return (not shape or min(shape) >= 0) and math.prod(shape) == len(self.data)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready view for immediate encoding (it shares this tensor's lists: do not mutate it); BYTES that
        are not UTF-8 text become base64 (flagged in parameters)."""
        out: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": self.shape, "data": self.data}
        params = self.parameters
        if self.datatype == "BYTES":
            data: list[Any] = []
            for v in self.data:
                if isinstance(v, bytes):
                    try:
                        data.append(v.decode("utf-8"))
                    except UnicodeDecodeError:
                        data.append(base64.b64encode(v).decode("ascii"))
                        params = {**params, "content_type": "base64"}
                else:
                    data.append(v)
            out["data"] = data
        if params:
            out["parameters"] = params
        return out


@dataclass
class InferRequest:
    """A V2 inference request addressed to one model."""

    model_name: str
    inputs: list[Tensor]
    id: str = ""
    model_version: str | None = None
    outputs: list[str] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def batch_key(self) -> Hashable | None:
        """Requests with equal keys can be merged into one call; None means "send alone"."""
        rows = {t.rows for t in self.inputs}
        if not self.inputs or len(rows) != 1 or None in rows or any(not t.consistent() or t.parameters
                                                                     for t in self.inputs):
            return None
        signature = tuple((t.name, t.datatype, tuple(t.shape[1:])) for t in self.inputs)
        # parameters may hold anything JSON does: compared as canonical text, and only when there are any
        params = json.dumps(self.parameters, sort_keys=True, default=str) if self.parameters else None
        return (self.model_name, self.model_version, signature,
                tuple(self.outputs) if self.outputs is not None else None, params)

    @property
    def rows(self) -> int:
        return (self.inputs[0].rows or 0) if self.inputs else 0

    def payload_bytes(self) -> int:
        """About how many bytes this request adds to a V2 call (raw encoding), to keep merged calls under a cap."""
        total = len(self.id) + len(self.model_name)
        for t in self.inputs:
            total += TENSOR_OVERHEAD + len(t.name)
            if t.datatype == "BYTES":
                total += sum(4 + len(v) for v in t.data)  # len(str) undercounts non-ASCII; the cap keeps a margin
            else:
                total += len(t.data) * ELEMENT_BYTES.get(t.datatype, 8)  # an unknown type is refused later
        return total


@dataclass(slots=True)
class InferResponse:
    """A V2 inference response."""

    model_name: str
    outputs: list[Tensor]
    id: str = ""
    model_version: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def output(self, name: str) -> Tensor | None:
        return next((t for t in self.outputs if t.name == name), None)


def merge(requests: list[InferRequest]) -> InferRequest:
    """Concatenate batchable requests (equal :meth:`InferRequest.batch_key`) along dimension 0."""
    if len(requests) == 1:
        return requests[0]
    first = requests[0]
    inputs = []
    for i, t in enumerate(first.inputs):
        data: list[Any] = []
        for r in requests:
            data.extend(r.inputs[i].data)
        inputs.append(Tensor(t.name, t.datatype, [sum(r.inputs[i].shape[0] for r in requests), *t.shape[1:]], data))
    return InferRequest(first.model_name, inputs, id=f"batch-{_BATCH_PREFIX}-{next(_batch_numbers)}",
                        model_version=first.model_version, outputs=first.outputs, parameters=dict(first.parameters))


def split(response: InferResponse, requests: list[InferRequest]) -> list[InferResponse]:
    """Cut a merged response back into one response per request, in order."""
    if len(requests) == 1:
        return [response]
    counts = [r.rows for r in requests]
    total = sum(counts)
    widths = []
    for t in response.outputs:
        if not t.shape or t.shape[0] != total or not t.consistent():
            raise BatchSplitError(f"output {t.name!r} has shape {t.shape}, not batch-major over {total} rows")
        widths.append(len(t.data) // total if total else 0)
    parts = []
    start = 0
    outputs = list(zip(response.outputs, widths, strict=True))
    for r, n in zip(requests, counts, strict=True):
        stop = start + n
        # the parts share the parameter dicts: results only read them
        parts.append(InferResponse(response.model_name,
                                   [Tensor(t.name, t.datatype, [n, *t.shape[1:]], t.data[start * w: stop * w],
                                           t.parameters) for t, w in outputs],
                                   id=r.id, model_version=response.model_version, parameters=response.parameters))
        start = stop
    return parts


def flatten(data: Any) -> list[Any]:
    """Row-major flattening of nested JSON lists (V2 allows nested or flat ``data``)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out
