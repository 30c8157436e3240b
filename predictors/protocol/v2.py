"""The direct V2 path: request bytes → tensors → the model's hooks → response bytes, REST and gRPC alike.

KServe's data plane turns every request into an ``InferRequest`` and every answer into an
``InferResponse``, then converts that to a dict (REST) or a protobuf (gRPC), copying each
tensor through Python lists on the way; for a model that answers in microseconds that is most of
the request. Here a request is parsed once into :class:`V2Request` (JSON with orjson, binary tensor data
and ``raw_input_contents`` kept as bytes for ``np.frombuffer``), the package model's
``preprocess`` / ``predict`` / ``postprocess`` run on it, and the :class:`V2Response` they
return (numpy outputs) is written straight to the response body or message.

Output encoding follows the V2 protocol and its binary tensor extension:

* REST: an output is binary (after the JSON, ``binary_data_size`` in its parameters) when the
  request's ``outputs`` entry for it says ``"binary_data": true``, or, without a per-output
  choice, when the request's ``binary_data_output`` parameter is true; otherwise it is JSON ``data``.
* gRPC: outputs go in ``raw_output_contents`` when the request sent ``raw_input_contents``
  (as KServe does), otherwise in typed ``contents``.

KServe's data plane still serves the stock path: the same model classes answer under
``kserve.ModelServer``, through the translations in :mod:`predictors.protocol.kserve_adapter`.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError

from predictors.protocol.errors import BadInput, PayloadTooLarge
from predictors.protocol.vocabulary import DATATYPES, GRPC_CONTENTS, describe_validation_errors, encode_bytes_elements
from predictors.settings import MAX_JSON_VALUES

BINARY_HEADER = "inference-header-content-length"
"""The binary tensor extension's header: the length of the JSON part of a body."""



_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_REQUESTED_OUTPUTS = 64
"""More ``outputs`` entries than any model produces; each one is a copy of an output in the answer."""
_JSON_LENGTH = re.compile(r"[0-9]{1,19}")


def check_id(value: str, what: str) -> str:
    """Refuse an id with control characters: it is logged, stored and echoed, and a NUL or newline there
    breaks the database row, the log line or the client that reads it back."""
    if _CONTROL.search(value):
        raise BadInput(f"{what} contains control characters")
    return value


def checked_outputs(outputs: list[RequestedOutput]) -> list[RequestedOutput] | None:
    """The requested outputs, refused when a name repeats or there are more than any model has: every
    entry is a full copy of an output in the answer, so a repeated name multiplies the response."""
    if len(outputs) > MAX_REQUESTED_OUTPUTS:
        raise BadInput(f"{len(outputs)} requested outputs; at most {MAX_REQUESTED_OUTPUTS}")
    seen: set[str] = set()
    for out in outputs:
        if out.name in seen:
            raise BadInput(f"output '{out.name}' is requested twice")
        seen.add(out.name)
    return outputs or None


def _tensor(name: str, datatype: str, shape: list[int], parameters: dict[str, Any] | None) -> Tensor:
    if datatype not in DATATYPES:
        raise BadInput(f"input '{name}': unknown datatype '{datatype}'")
    return Tensor(name, datatype, shape, parameters=parameters)

Parameter = StrictBool | StrictInt | StrictFloat | str


@dataclass(slots=True)
class Tensor:
    """One input tensor as sent: JSON/typed ``data`` or ``raw`` bytes (binary REST, ``raw_input_contents``)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    raw: bytes | None = None
    parameters: dict[str, Any] | None = None


@dataclass(slots=True)
class RequestedOutput:
    """An entry of the request's ``outputs``; ``binary`` is its ``binary_data`` parameter, if given."""

    name: str
    binary: bool | None = None


@dataclass(slots=True)
class V2Request:
    """A parsed inference request: what ``preprocess`` reads."""

    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None
    binary_outputs: bool = False
    parameters: dict[str, Any] | None = None

    def output_is_binary(self, requested: RequestedOutput | None) -> bool:
        if requested is not None and requested.binary is not None:
            return requested.binary
        return self.binary_outputs


@dataclass(slots=True)
class Output:
    """One output tensor: a numeric array, or a list of ``str`` for BYTES."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[str]
    binary: bool = False


@dataclass(slots=True)
class V2Response:
    """What ``postprocess`` returns on the direct path."""

    id: str
    model_name: str
    model_version: str | None
    outputs: list[Output]


# -- REST ------------------------------------------------------------------------------------------


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Parameter] | None = None
    data: Any = None  # checked to be a list in parse_rest: validating it as one would copy every element


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


def _binary_flag(parameters: dict[str, Any] | None, key: str, where: str) -> bool | None:
    value = (parameters or {}).get(key)
    if value is not None and not isinstance(value, bool):
        raise BadInput(f"{where}: parameter '{key}' must be true or false")
    return value


_COUNT_SLICE = 1024 * 1024


def json_value_bound(json_part: bytes) -> int:
    """At most how many values a JSON text holds: every value after the first follows a comma or opens a
    container. Counted without parsing (strings with commas only make the bound looser), a slice at a time
    so that a thread counting a large body lets the event loop's thread in between slices."""
    count = 1
    for start in range(0, len(json_part), _COUNT_SLICE):
        end = start + _COUNT_SLICE
        count += sum(json_part.count(mark, start, end) for mark in (b",", b"[", b"{"))
    return count


def _loads(json_part: bytes) -> Any:
    """``orjson.loads`` with the cyclic garbage collector paused: a body of many small arrays or objects
    creates as many containers, and each allocation threshold crossed on the way would start a collection
    that walks all of them again, costing far more than the parse itself. Plain JSON cannot form cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(json_part)
    finally:
        if enabled:
            gc.enable()


def parse_rest(body: bytes, json_length: str | None, model_name: str,
               max_values: int = MAX_JSON_VALUES) -> V2Request:
    """A REST ``/infer`` body (JSON, or JSON then binary tensor data when ``json_length`` is given).

    A JSON part that could hold more than ``max_values`` values is refused (413) before it is parsed: the
    Python objects are what cost memory and time, and they exist only after parsing.
    """
    if json_length is not None:
        # ASCII digits only: str.isdigit also takes '²' and other digits int() then refuses with a ValueError
        if not _JSON_LENGTH.fullmatch(json_length) or int(json_length) > len(body):
            raise BadInput(f"{BINARY_HEADER} header '{json_length}' is not a length within the body")
        json_part, binary = body[: int(json_length)], body[int(json_length):]
    else:
        json_part, binary = body, b""
    if json_value_bound(json_part) > max_values:
        raise PayloadTooLarge(f"request JSON holds more than {max_values} values; send large tensors as binary data")
    try:
        document = _loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"request body is not valid JSON: {exc}") from exc
    try:
        request = _Request.model_validate(document)
    except ValidationError as exc:
        raise BadInput(f"invalid inference request: {describe_validation_errors(exc.errors())}") from exc
    if request.model_name is not None and request.model_name != model_name:
        raise BadInput(f"body names model '{request.model_name}' but the URL names '{model_name}'")
    if request.id is not None:
        check_id(request.id, "request id")

    inputs: list[Tensor] = []
    offset = 0
    for item in request.inputs:
        params = dict(item.parameters or {})
        size = params.pop("binary_data_size", None)
        tensor = _tensor(item.name, item.datatype, item.shape, params or None)
        if item.data is not None:
            if size is not None:
                raise BadInput(f"input '{item.name}' has both 'data' and 'binary_data_size'")
            if item.datatype == "FP16":
                raise BadInput(f"input '{item.name}': FP16 must be sent as binary data")
            if not isinstance(item.data, list):
                raise BadInput(f"invalid inference request: inputs.{item.name}.data: must be an array")
            tensor.data = item.data
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise BadInput(f"input '{item.name}': binary_data_size {size!r} exceeds the binary data sent")
            tensor.raw = binary[offset: offset + size]
            offset += size
        else:
            raise BadInput(f"input '{item.name}' has no 'data' (and no binary_data_size)")
        inputs.append(tensor)
    if offset != len(binary):
        raise BadInput(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    outputs = checked_outputs([RequestedOutput(o.name, _binary_flag(o.parameters, "binary_data", f"output '{o.name}'"))
                                for o in request.outputs or []])
    return V2Request(request.id, inputs, outputs,
                     bool(_binary_flag(request.parameters, "binary_data_output", "request")), request.parameters)


def encode_rest(response: V2Response) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary outputs follow it."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "shape": out.shape, "datatype": out.datatype}
        if out.binary:
            blob = raw_bytes(out)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.data.ravel() if isinstance(out.data, np.ndarray) else out.data
        outputs.append(entry)
    document = orjson.dumps({"id": response.id, "model_name": response.model_name,
                             "model_version": response.model_version, "outputs": outputs},
                            option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return document, None
    return b"".join([document, *blobs]), len(document)


# -- gRPC ------------------------------------------------------------------------------------------


def _grpc_parameters(parameters: Any) -> dict[str, Any] | None:
    if not parameters:
        return None
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in parameters.items()
            if value.WhichOneof("parameter_choice") is not None}


def parse_grpc(request: pb.ModelInferRequest) -> V2Request:
    """A ``ModelInferRequest``: typed ``contents`` per input, or ``raw_input_contents`` for all of them."""
    if request.id:
        check_id(request.id, "request id")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadInput(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    inputs: list[Tensor] = []
    for i, item in enumerate(request.inputs):
        tensor = _tensor(item.name, item.datatype, list(item.shape), _grpc_parameters(item.parameters))
        if raw:
            if item.HasField("contents"):
                raise BadInput(f"input '{item.name}' has contents although raw_input_contents are sent")
            tensor.raw = raw[i]
        else:
            field = GRPC_CONTENTS.get(item.datatype)
            if field is None:
                raise BadInput(f"input '{item.name}': datatype '{item.datatype}' has no typed contents; "
                               "send it in raw_input_contents")
            tensor.data = getattr(item.contents, field)
        inputs.append(tensor)
    outputs = checked_outputs([RequestedOutput(o.name) for o in request.outputs])
    return V2Request(request.id or None, inputs, outputs, bool(raw), _grpc_parameters(request.parameters))


def encode_grpc(response: V2Response) -> pb.ModelInferResponse:
    """The ``ModelInferResponse``: all outputs raw when the request was raw, else typed contents."""
    outputs = response.outputs
    if any(out.binary for out in outputs):  # one constructor call: a third cheaper than adding field by field
        return pb.ModelInferResponse(
            model_name=response.model_name, model_version=response.model_version or "", id=response.id,
            outputs=[_OutputTensor(name=out.name, datatype=out.datatype, shape=out.shape) for out in outputs],
            raw_output_contents=[raw_bytes(out) for out in outputs])
    message = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version or "",
                                    id=response.id)
    for out in outputs:
        tensor = message.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        if out.datatype == "BYTES":
            tensor.contents.bytes_contents.extend([v.encode() for v in out.data])
        else:
            assert isinstance(out.data, np.ndarray)
            getattr(tensor.contents, GRPC_CONTENTS[out.datatype]).extend(out.data.ravel().tolist())
    return message


_OutputTensor = pb.ModelInferResponse.InferOutputTensor


# -- both ------------------------------------------------------------------------------------------


def raw_bytes(out: Output) -> bytes:
    """An output in the binary tensor format: little-endian row-major, BYTES as 4-byte length + bytes."""
    if out.datatype == "BYTES":
        return encode_bytes_elements(text.encode() for text in out.data)
    data = out.data
    assert isinstance(data, np.ndarray)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return data.tobytes()  # row-major whatever the array's strides


__all__ = ["BINARY_HEADER", "MAX_JSON_VALUES", "MAX_REQUESTED_OUTPUTS", "Output", "RequestedOutput", "Tensor",
           "V2Request", "V2Response", "check_id", "checked_outputs", "encode_grpc", "encode_rest", "json_value_bound",
           "parse_grpc", "parse_rest", "raw_bytes"]
