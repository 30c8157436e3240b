"""V2 (Open Inference Protocol) requests and responses as plain data, and micro-batch merge/split.

The bridge speaks V2 over gRPC or REST; this module is the protocol-neutral middle both sides
convert to and from (see :mod:`streaming.v2client`). Tensors keep their data flat and row-major.
BYTES elements are ``bytes`` (binary payloads, e.g. a PNG) or ``str`` (text from a JSON request,
which REST passes through unchanged and gRPC sends as UTF-8).

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
import uuid
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

BINARY_DATATYPES = frozenset({"BYTES"})
DATATYPES = frozenset({"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                       "FP16", "FP32", "FP64", "BYTES"})
ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "UINT32": 4, "INT32": 4,
                 "FP32": 4}  # everything else numeric is 8 bytes wide
TENSOR_OVERHEAD = 64  # name, datatype, shape and framing of one tensor in a call, generously


# Merged calls need an id of their own; a counter is unique within this process and costs nothing.
_BATCH_PREFIX = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
_batch_numbers = itertools.count()


class BatchSplitError(ValueError):
    """A batched response cannot be cut back into per-request parts (outputs not batch-major)."""


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
                total += len(t.data) * ELEMENT_BYTES.get(t.datatype, 8)
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
