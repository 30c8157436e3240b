"""V2 gRPC against the real server, with raw stubs built from the shared proto and with KServe's client, through
both gRPC front ends (the default asyncio one, and grpcio's)."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferInput, InferRequest

from tests.fixtures.server import TRAINED_MODELS, start_model_server
from tests.support.v2 import png_bytes, raw_stub, split_bytes_tensor

SETOSA = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module", params=["asyncio", "grpcio"])
def served(request, model_server, tmp_path_factory):
    """The session's server (default front end), or one of its own on grpcio's."""
    if request.param == "asyncio":
        yield model_server
        return
    with start_model_server(TRAINED_MODELS, tmp_path_factory.mktemp("grpcio-front"),
                            extra_args=["--grpc-front", "grpcio"]) as handle:
        yield handle


@pytest.fixture(scope="module")
def stub(served):
    channel = grpc.insecure_channel(served.grpc_target)
    yield raw_stub(channel)
    channel.close()


def _request(stub, model: str = "iris", **fields):
    return stub.messages["ModelInferRequest"](model_name=model, **fields)


def _tensor(stub, name, datatype, shape, **contents):
    cls = stub.messages["ModelInferRequest"].InferInputTensor
    return cls(name=name, datatype=datatype, shape=shape, contents=stub.messages["InferTensorContents"](**contents))


def _outputs(response) -> dict[str, np.ndarray]:
    """Decode outputs whether they came as typed contents or raw_output_contents."""
    result = {}
    for i, out in enumerate(response.outputs):
        if response.raw_output_contents:
            raw = response.raw_output_contents[i]
            if out.datatype == "BYTES":
                result[out.name] = np.asarray(split_bytes_tensor(raw), dtype=object)
            else:
                dtype = {"INT64": np.int64, "FP32": np.float32}[out.datatype]
                result[out.name] = np.frombuffer(raw, dtype=dtype).reshape(list(out.shape))
        else:
            field = {"INT64": "int64_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}[out.datatype]
            result[out.name] = np.asarray(list(getattr(out.contents, field))).reshape(list(out.shape))
    return result


def test_health_and_metadata(stub):
    m = stub.messages
    assert stub.ServerLive(m["ServerLiveRequest"]()).live
    assert stub.ServerReady(m["ServerReadyRequest"]()).ready
    assert stub.ModelReady(m["ModelReadyRequest"](name="iris")).ready
    meta = stub.ServerMetadata(m["ServerMetadataRequest"]())
    assert "model_repository_extension" in meta.extensions
    model = stub.ModelMetadata(m["ModelMetadataRequest"](name="iris"))
    assert model.inputs[0].name == "input-0" and list(model.inputs[0].shape) == [-1, 4]
    assert {o.name for o in model.outputs} >= {"label", "label_name", "probabilities"}


def test_infer_with_typed_contents(stub):
    request = _request(stub, id="g-1", inputs=[_tensor(stub, "input-0", "FP64", [1, 4], fp64_contents=SETOSA)])
    response = stub.ModelInfer(request)
    assert response.id == "g-1" and response.model_name == "iris"
    outs = _outputs(response)
    assert outs["label"].tolist() == [0]
    assert outs["label_name"].tolist() == [b"setosa"]


def test_infer_with_raw_input_contents_and_generated_id(stub):
    features = np.asarray([SETOSA, [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    cls = stub.messages["ModelInferRequest"].InferInputTensor
    request = _request(stub, inputs=[cls(name="input-0", datatype="FP32", shape=[2, 4])],
                       raw_input_contents=[features.tobytes()])
    response = stub.ModelInfer(request)
    assert uuid.UUID(response.id).version == 7  # generated, time-ordered
    assert _outputs(response)["label"].tolist() == [0, 2]


def test_png_bytes_over_grpc_with_ids(stub, mnist_digits):
    images, labels = mnist_digits
    pngs = [png_bytes(img) for img in images[:8]]
    request = _request(stub, model="mnist", inputs=[
        _tensor(stub, "input-0", "BYTES", [8], bytes_contents=pngs),
        _tensor(stub, "ids", "BYTES", [8], bytes_contents=[f"img-{i}".encode() for i in range(8)]),
    ])
    outs = _outputs(stub.ModelInfer(request))
    assert outs["ids"].tolist() == [f"img-{i}".encode() for i in range(8)]
    assert (outs["label"] == labels[:8]).mean() >= 0.75


@pytest.mark.parametrize("model, tensor_args, code", [
    ("iris", ("input-0", "FP64", [1, 3], {"fp64_contents": SETOSA[:3]}), grpc.StatusCode.INVALID_ARGUMENT),
    ("iris", ("nope", "FP64", [1, 4], {"fp64_contents": SETOSA}), grpc.StatusCode.INVALID_ARGUMENT),
    ("iris", ("input-0", "FP64", [1, 4], {"fp64_contents": SETOSA[:2]}), grpc.StatusCode.INVALID_ARGUMENT),
    ("mnist", ("input-0", "BYTES", [1], {"bytes_contents": [b"not an image"]}), grpc.StatusCode.INVALID_ARGUMENT),
    ("missing", ("input-0", "FP64", [1, 4], {"fp64_contents": SETOSA}), grpc.StatusCode.NOT_FOUND),
])
def test_bad_requests_map_to_grpc_codes(stub, model, tensor_args, code):
    name, dtype, shape, contents = tensor_args
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_request(stub, model=model, inputs=[_tensor(stub, name, dtype, shape, **contents)]))
    assert err.value.code() == code
    assert err.value.details()


def test_kserve_grpc_client(served):
    async def run() -> list[int]:
        client = InferenceGRPCClient(served.grpc_target)
        try:
            tensor = InferInput("input-0", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.asarray([SETOSA], dtype=np.float32))
            response = await client.infer(InferRequest(model_name="iris", infer_inputs=[tensor], request_id="k-1"))
            assert response.id == "k-1"
            return response.get_output_by_name("label").as_numpy().tolist()
        finally:
            await client.close()

    assert asyncio.run(run()) == [0]
