"""The Open Inference Protocol, for checking real responses against it.

The REST schemas come from the spec among the reference files (``$KCP_SHARED_DIR``, default ``../shared``; absent:
the test skips with the one reason of :mod:`tests.fixtures.shared`). The gRPC messages come from the project's own
proto in ``streaming/v2_grpc/``, so the gRPC tests run on any clone.
"""

from __future__ import annotations

import base64
import functools
import io
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import yaml
from PIL import Image

from tests.fixtures.shared import shared_path

PROTO = Path(__file__).resolve().parents[2] / "streaming" / "v2_grpc" / "open_inference_grpc.proto"


@functools.cache
def _spec() -> dict[str, Any]:
    return yaml.safe_load(shared_path("specs", "open_inference_rest.yaml").read_text())


def assert_conforms(document: Any, schema_name: str) -> None:
    """Validate a response body against a schema of the REST OpenAPI spec (components/schemas)."""
    spec = _spec()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
    jsonschema.validate(document, schema)


def tensor(name: str, array: np.ndarray | list, datatype: str) -> dict[str, Any]:
    array = np.asarray(array)
    data = array.ravel().tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def bytes_tensor(name: str, items: list[bytes]) -> dict[str, Any]:
    return {"name": name, "shape": [len(items)], "datatype": "BYTES",
            "data": [base64.b64encode(b).decode() for b in items]}


def png_bytes(pixels: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def output(response: dict[str, Any], name: str) -> np.ndarray:
    for out in response["outputs"]:
        if out["name"] == name:
            return np.asarray(out["data"]).reshape(out["shape"])
    raise KeyError(f"no output {name} in {[o['name'] for o in response['outputs']]}")


def split_bytes_tensor(chunk: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in the binary format (4-byte little-endian length, then the bytes)."""
    values, offset = [], 0
    while offset < len(chunk):
        n = int.from_bytes(chunk[offset: offset + 4], "little")
        values.append(chunk[offset + 4: offset + 4 + n])
        offset += 4 + n
    return values


class RawV2Stub:
    """gRPC stub built from the project's ``open_inference_grpc.proto`` at test time.

    The proto is compiled with grpcio-tools into a descriptor set and loaded into a
    private descriptor pool, so it does not clash with KServe's copy of the same
    ``inference`` package in the default pool. ``stub.ModelInfer(request)`` etc. call the
    real service; ``stub.messages["ModelInferRequest"]`` are the message classes.
    """

    def __init__(self, channel: Any, pool: Any, service: Any) -> None:
        from google.protobuf import message_factory

        self.messages = {m.name: message_factory.GetMessageClass(m)
                         for m in pool.FindFileByName("open_inference_grpc.proto").message_types_by_name.values()}
        for method in service.methods:
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            call = channel.unary_unary(f"/{service.full_name}/{method.name}",
                                       request_serializer=request_cls.SerializeToString,
                                       response_deserializer=response_cls.FromString)
            setattr(self, method.name, call)


@functools.cache
def _descriptor_pool() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool

    out = Path(tempfile.mkdtemp(prefix="v2-proto-")) / "v2-proto.pb"
    # protoc runs in its own process: grpc_tools' in-process protoc can crash a process that has
    # already loaded other protobuf descriptors.
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", "--include_imports",
                    f"--descriptor_set_out={out}", str(PROTO)], check=True)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return pool


def raw_stub(channel: Any) -> RawV2Stub:
    pool = _descriptor_pool()
    return RawV2Stub(channel, pool, pool.FindServiceByName("inference.GRPCInferenceService"))
