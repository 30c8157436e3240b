"""The Open Inference Protocol's vocabulary, defined once for the server: its datatypes (with the numpy type
and the gRPC ``InferTensorContents`` field of each), the binary BYTES element format, and the wording of
validation errors in answers.

:mod:`predictors.protocol.v2` (the wire) and :mod:`predictors.protocol.codecs` (tensors to numpy) build on it;
``streaming/tensors.py`` is the bridge's twin, since the bridge never imports the server.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from predictors.protocol.errors import BadInput

_DATATYPES: dict[str, tuple[Any, str | None]] = {
    "BOOL": (np.bool_, "bool_contents"),
    "UINT8": (np.uint8, "uint_contents"), "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"), "UINT64": (np.uint64, "uint64_contents"),
    "INT8": (np.int8, "int_contents"), "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"), "INT64": (np.int64, "int64_contents"),
    "FP16": (np.float16, None), "FP32": (np.float32, "fp32_contents"), "FP64": (np.float64, "fp64_contents"),
    "BYTES": (np.object_, "bytes_contents"),
}
DATATYPES = frozenset(_DATATYPES)
NUMPY_DTYPES: dict[str, Any] = {name: numpy_type for name, (numpy_type, _) in _DATATYPES.items()}
GRPC_CONTENTS: dict[str, str] = {name: field for name, (_, field) in _DATATYPES.items() if field is not None}
"""The typed ``InferTensorContents`` field that carries each datatype (FP16 has none: raw only)."""

_LENGTH = struct.Struct("<I")


def encode_bytes_elements(values: Iterable[bytes]) -> bytes:
    """BYTES elements in the binary tensor format: each a 4-byte little-endian length, then its bytes."""
    return b"".join([_LENGTH.pack(len(v)) + v for v in values])


def decode_bytes_elements(raw: bytes, name: str, count: int) -> list[bytes]:
    """The elements of a binary BYTES tensor of ``count`` elements, every length checked against what is left:
    a truncated tensor is the client's error, not a ``struct.error``."""
    values: list[bytes] = []
    view = memoryview(raw)
    offset, end = 0, len(raw)
    while offset < end:
        if len(values) == count:
            raise BadInput(f"input '{name}': more than the {count} BYTES elements its shape holds")
        if offset + 4 > end:
            raise BadInput(f"input '{name}': BYTES data ends inside the length of element {len(values)}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise BadInput(f"input '{name}': BYTES element {len(values)} claims {length} bytes, "
                           f"{end - offset} are left")
        values.append(bytes(view[offset: offset + length]))
        offset += length
    return values


def describe_validation_errors(errors: Sequence[Mapping[str, Any]], *, limit: int = 1) -> str:
    """pydantic's (or FastAPI's) validation errors as one sentence for a 400 answer, the first ``limit`` of
    them: ``items[3].true_label: Input should be a valid integer (got "x")``."""
    if not errors:
        return "invalid value"
    parts = []
    for err in errors[:limit]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ())).lstrip(".")
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") in ("int_type", "string_type") and "input" in err:
            msg += f" (got {json.dumps(err['input'], default=str)[:60]})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(errors) - limit
    return "; ".join(parts) + (f" (and {more} more error{'s' if more > 1 else ''})" if more > 0 else "")
