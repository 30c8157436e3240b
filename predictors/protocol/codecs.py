"""V2 input tensors -> numpy, with every malformed case turned into a clear :class:`BadInput`.

A :class:`~predictors.protocol.v2.Tensor` carries JSON ``data`` (nested lists, checked element by
element), gRPC typed ``contents`` (already typed by protobuf; only ranges are checked) or raw
little-endian bytes (binary REST and ``raw_input_contents``, read with ``np.frombuffer``).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np

from predictors.protocol.errors import BadInput
from predictors.protocol.fetch import is_url
from predictors.protocol.v2 import Tensor
from predictors.protocol.vocabulary import NUMPY_DTYPES, decode_bytes_elements


def element_count(shape: list[int]) -> int:
    if any(d < 0 for d in shape):
        raise BadInput(f"shape {shape} has a negative dimension")
    return math.prod(shape)


def to_numpy(tensor: Tensor) -> np.ndarray:
    """Decode one input tensor, checking that its data matches its shape and datatype."""
    name, dtype_name, shape = tensor.name, tensor.datatype, tensor.shape
    dtype = NUMPY_DTYPES.get(dtype_name)
    if dtype is None:
        raise BadInput(f"input '{name}': unknown datatype '{dtype_name}'")
    count = element_count(shape)
    try:
        if tensor.raw is not None:
            array = _from_raw(tensor.raw, name, dtype_name, dtype, count, shape)
        elif isinstance(tensor.data, list):
            _check_outer_length(tensor.data, name, shape, count)
            array = _from_json(_flatten(tensor.data), name, dtype_name, dtype)
        elif tensor.data is not None:  # gRPC typed contents: protobuf has typed every element already
            if not isinstance(tensor.data, np.ndarray) and len(tensor.data) != count:  # known before converting
                raise BadInput(f"input '{name}': {len(tensor.data)} elements do not match shape {shape} "
                               f"({count} elements)")
            array = _from_typed(tensor.data, name, dtype_name, dtype)
        else:
            raise BadInput(f"input '{name}' has no data")
        if array.size != count:
            raise BadInput(f"input '{name}': {array.size} elements do not match shape {shape} ({count} elements)")
        return array.reshape(shape)
    except BadInput:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadInput(f"input '{name}': cannot decode as {dtype_name} {shape}: {exc}") from exc


def _check_outer_length(data: list, name: str, shape: list[int], count: int) -> None:
    """JSON ``data`` is flat (``count`` values) or nested along the shape (``shape[0]`` lists): any other
    length is refused before the values are walked one by one."""
    if shape and len(data) not in (count, shape[0]):
        raise BadInput(f"input '{name}': {len(data)} values or rows do not match shape {shape} ({count} elements)")


def _from_raw(raw: bytes, name: str, dtype_name: str, dtype: Any, count: int, shape: list[int]) -> np.ndarray:
    if dtype_name == "BYTES":
        return _object_array(decode_bytes_elements(raw, name, count))
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != count * itemsize:
        raise BadInput(f"input '{name}': {len(raw)} bytes of {dtype_name} do not fill shape {shape}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def _from_json(flat: list, name: str, dtype_name: str, dtype: Any) -> np.ndarray:
    if dtype_name == "BYTES":
        if not all(isinstance(v, (str, bytes)) for v in flat):
            raise BadInput(f"input '{name}': BYTES elements must be strings")
        return _object_array(flat)
    if dtype_name == "BOOL":  # true/false, or 0/1: 0.5 or 2 is not a boolean, whatever bool() makes of it
        if not all(v is True or v is False or (type(v) is int and v in (0, 1)) for v in flat):
            raise BadInput(f"input '{name}': BOOL elements must be true or false")
        return np.asarray(flat, dtype=np.bool_)
    if not all(isinstance(v, (int, float, bool)) for v in flat):
        raise BadInput(f"input '{name}': {dtype_name} elements must be numbers")
    if dtype_name != "BOOL" and any(isinstance(v, bool) for v in flat):
        raise BadInput(f"input '{name}': {dtype_name} elements must be numbers, not booleans")
    if dtype_name.startswith(("INT", "UINT")) and any(isinstance(v, float) for v in flat):
        raise BadInput(f"input '{name}': {dtype_name} elements must be integers")
    return _checked_cast(flat, name, dtype_name, dtype)


def _from_typed(values: Any, name: str, dtype_name: str, dtype: Any) -> np.ndarray:
    if dtype_name == "BYTES":
        return _object_array(list(values))
    return _checked_cast(values, name, dtype_name, dtype)


def _checked_cast(values: Any, name: str, dtype_name: str, dtype: Any) -> np.ndarray:
    """Numbers to ``dtype``; integers out of its range are refused rather than wrapped.

    Integers are converted straight to ``dtype``, which refuses any that do not fit: going through an
    inferred array first would pass a mix like ``[2**63, -1]`` through float64, where 2**63 compares
    equal to the INT64 maximum and then wraps to the minimum.
    """
    if dtype_name.startswith(("INT", "UINT")):
        try:
            return np.asarray(values, dtype=dtype)
        except OverflowError as exc:
            raise BadInput(f"input '{name}': values out of range for {dtype_name}") from exc
    with np.errstate(all="ignore"):
        array = np.asarray(values, dtype=np.float64 if dtype_name.startswith("FP") else None)
    return array.astype(dtype)


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _flatten(data: Any) -> list:
    """Row-major flattening of nested JSON lists (the V2 spec allows nested or flat)."""
    if isinstance(data, np.ndarray):
        return data.ravel().tolist()
    if not isinstance(data, list):
        return [data]
    out: list = []
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


def require_finite(array: np.ndarray, name: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadInput(f"input '{name}' contains NaN or infinity")


def bytes_element(value: bytes | str, name: str, index: int) -> bytes | str:
    """A BYTES element as raw bytes (gRPC, binary REST) or a URL string; JSON strings are base64."""
    if isinstance(value, bytes):
        return value.decode("latin-1") if is_url(value) else value
    if is_url(value):
        return value
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInput(f"input '{name}' element {index}: not base64 (JSON BYTES carry base64 or a URL)") from exc


def as_text(value: bytes | str, name: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"input '{name}' is not UTF-8 text") from exc


__all__ = ["as_text", "bytes_element", "element_count", "require_finite", "to_numpy"]
