"""V2 tensors <-> numpy, with every malformed case turned into a clear :class:`BadInput`.

KServe's own REST parsing trusts its input (a missing key is a ``KeyError`` and a 500),
so REST bodies are parsed here: JSON, or JSON followed by binary tensor data (the
binary tensor extension, announced by the ``Inference-Header-Content-Length`` header).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
import orjson
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput, deserialize_bytes_tensor
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from predictors.errors import BadInput
from predictors.fetch import is_url

BINARY_HEADER = "inference-header-content-length"

NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}

Parameter = StrictBool | StrictInt | StrictFloat | str


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Parameter] | None = None
    data: list | None = None


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    parameters: dict[str, Parameter] | None = None


class _Request(BaseModel):
    """The V2 ``$inference_request`` object, strictly."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    model_name: str | None = None  # not in the spec's request object, but KServe's own client sends it
    model_version: str | None = None
    parameters: dict[str, Parameter] | None = None
    inputs: list[_Input] = Field(min_length=1)
    outputs: list[_Output] | None = None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"invalid inference request: {where}: {err['msg']}" if where else f"invalid inference request: {err['msg']}"


def element_count(shape: list[int]) -> int:
    if any(d < 0 for d in shape):
        raise BadInput(f"shape {shape} has a negative dimension")
    return math.prod(shape)


def parse_rest_request(body: bytes, headers: dict[str, str], model_name: str) -> InferRequest:
    """Parse a REST ``/infer`` body into KServe's ``InferRequest``."""
    json_length = headers.get(BINARY_HEADER)
    if json_length is not None:
        if not json_length.isdigit() or int(json_length) > len(body):
            raise BadInput(f"{BINARY_HEADER} header '{json_length}' is not a length within the body")
        json_part, binary = body[: int(json_length)], body[int(json_length):]
    else:
        json_part, binary = body, b""
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"request body is not valid JSON: {exc}") from exc
    try:
        request = _Request.model_validate(document)
    except ValidationError as exc:
        raise BadInput(_first_error(exc)) from exc
    if request.model_name is not None and request.model_name != model_name:
        raise BadInput(f"body names model '{request.model_name}' but the URL names '{model_name}'")

    inputs: list[InferInput] = []
    offset = 0
    for item in request.inputs:
        if item.datatype not in NUMPY_DTYPES:
            raise BadInput(f"input '{item.name}': unknown datatype '{item.datatype}'")
        params = dict(item.parameters or {})
        size = params.pop("binary_data_size", None)
        tensor = InferInput(name=item.name, shape=item.shape, datatype=item.datatype, parameters=params)
        if item.data is not None:
            if size is not None:
                raise BadInput(f"input '{item.name}' has both 'data' and 'binary_data_size'")
            if item.datatype == "FP16":
                raise BadInput(f"input '{item.name}': FP16 must be sent as binary data")
            tensor.data = item.data
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise BadInput(f"input '{item.name}': binary_data_size {size!r} exceeds the binary data sent")
            tensor._raw_data = binary[offset: offset + size]
            offset += size
        else:
            raise BadInput(f"input '{item.name}' has no 'data' (and no binary_data_size)")
        inputs.append(tensor)
    if offset != len(binary):
        raise BadInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = [RequestedOutput(name=o.name, parameters=o.parameters or {}) for o in request.outputs or []]
    return InferRequest(model_name=model_name, infer_inputs=inputs, request_id=request.id,
                        parameters=request.parameters, request_outputs=outputs or None)


def to_numpy(tensor: InferInput) -> np.ndarray:
    """Decode one input tensor, checking that its data matches its shape and datatype."""
    name, dtype_name, shape = tensor.name, tensor.datatype, list(tensor.shape)
    dtype = NUMPY_DTYPES.get(dtype_name)
    if dtype is None:
        raise BadInput(f"input '{name}': unknown datatype '{dtype_name}'")
    count = element_count(shape)
    raw = tensor._raw_data
    try:
        if raw is not None:
            if dtype_name == "BYTES":
                array = deserialize_bytes_tensor(raw)
            else:
                itemsize = np.dtype(dtype).itemsize
                if len(raw) != count * itemsize:
                    raise BadInput(f"input '{name}': {len(raw)} bytes of {dtype_name} do not fill shape {shape}")
                array = np.frombuffer(raw, dtype=dtype)
        else:
            data = tensor.data
            if dtype_name == "BYTES":
                flat = _flatten(data)
                if not all(isinstance(v, (str, bytes)) for v in flat):
                    raise BadInput(f"input '{name}': BYTES elements must be strings")
                array = np.empty(len(flat), dtype=object)
                array[:] = flat
            else:
                flat = _flatten(data)
                if not all(isinstance(v, (int, float, bool)) for v in flat):
                    raise BadInput(f"input '{name}': {dtype_name} elements must be numbers")
                if dtype_name != "BOOL" and any(isinstance(v, bool) for v in flat):
                    raise BadInput(f"input '{name}': {dtype_name} elements must be numbers, not booleans")
                if dtype_name.startswith(("INT", "UINT")) and any(isinstance(v, float) for v in flat):
                    raise BadInput(f"input '{name}': {dtype_name} elements must be integers")
                with np.errstate(all="ignore"):
                    array = np.asarray(flat, dtype=np.float64 if dtype_name.startswith("FP") else None)
                if dtype_name.startswith(("INT", "UINT")):
                    info = np.iinfo(dtype)
                    if array.size and (array.min() < info.min or array.max() > info.max):
                        raise BadInput(f"input '{name}': values out of range for {dtype_name}")
                array = array.astype(dtype)
        if array.size != count:
            raise BadInput(f"input '{name}': {array.size} elements do not match shape {shape} ({count} elements)")
        return array.reshape(shape)
    except BadInput:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadInput(f"input '{name}': cannot decode as {dtype_name} {shape}: {exc}") from exc


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


__all__ = ["InferenceRequest", "as_text", "bytes_element", "parse_rest_request", "require_finite", "to_numpy"]
