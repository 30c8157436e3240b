"""The KServe internals the server reaches into (predictors.protocol.kserve_adapter), checked against the
installed KServe: an upgrade that moves one of them fails here, by name, rather than somewhere in a server."""

from __future__ import annotations

import argparse
import tomllib
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from timing_asgi import TimingMiddleware

from predictors.__main__ import KSERVE_FLAGS_USED
from predictors.protocol import kserve_adapter
from predictors.protocol.errors import BadInput
from predictors.protocol.v2 import Output, RequestedOutput, V2Request, V2Response

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_kserve_is_the_one_the_adapter_was_written_for():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = {spec for specs in [pins["project"]["dependencies"], *pins["project"]["optional-dependencies"].values()]
              for spec in specs if spec.startswith("kserve==")}
    assert pinned == {f"kserve=={kserve_adapter.KSERVE_VERSION}"}, "pyproject pins the KServe the adapter knows"
    assert version("kserve") == kserve_adapter.KSERVE_VERSION


def test_module_globals_of_the_model_server():
    assert isinstance(kserve_adapter.fastapi_app(), FastAPI)
    flags = kserve_adapter.parsed_flags()
    assert isinstance(flags.grpc_max_send_message_length, int)
    assert isinstance(flags.grpc_max_receive_message_length, int)
    actions = kserve_adapter.flag_actions()
    assert all(isinstance(a, argparse.Action) and not isinstance(a, argparse._HelpAction) for a in actions)
    assert {a.dest for a in actions} >= KSERVE_FLAGS_USED, "every KServe flag the server honours still exists"


def test_timing_middleware_can_be_removed():
    app = FastAPI()
    app.add_middleware(TimingMiddleware, client=None)

    class Other:
        def __init__(self, app):
            self.app = app

    app.add_middleware(Other)
    kserve_adapter.remove_middleware(app, TimingMiddleware)
    assert [m.cls for m in app.user_middleware] == [Other]


def test_the_rest_server_holds_a_uvicorn_server():
    repository = ModelRepositoryExtension(model_registry=None)
    server = RESTServer("kserve.model_server:app", DataPlane(model_registry=None), repository, 0)
    inner = kserve_adapter.uvicorn_server(server)
    assert isinstance(inner, uvicorn.Server)
    assert inner.config is server.config and inner.should_exit is False


def test_kserve_logging_config_is_the_dict_configure_logging_applies():
    from kserve.logging import configure_logging

    config = kserve_adapter.logging_config()
    assert {"formatters", "handlers", "loggers"} <= config.keys()
    assert configure_logging.__globals__["KSERVE_LOG_CONFIG"] is config, "configure_logging reads this very dict"


def test_binary_input_data_round_trips_through_the_stock_adapter():
    tensor = InferInput("input-0", [2, 4], "FP32")
    features = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor.set_data_from_numpy(features, binary_data=True)
    assert kserve_adapter.raw_input_data(tensor) == features.tobytes()
    request = kserve_adapter.from_kserve(InferRequest("iris", [tensor], request_id="r-1"))
    assert request.id == "r-1"
    [parsed] = request.inputs
    assert (parsed.name, parsed.datatype, parsed.shape, parsed.raw) == ("input-0", "FP32", [2, 4], features.tobytes())


def test_json_input_data_has_no_raw_bytes():
    tensor = InferInput("input-0", [1, 2], "FP32", data=[1.0, 2.0])
    assert kserve_adapter.raw_input_data(tensor) is None


def test_the_stock_adapter_applies_the_model_paths_checks():
    tensor = InferInput("input-0", [1, 2], "FP32", data=[1.0, 2.0])
    with pytest.raises(BadInput, match="control characters"):
        kserve_adapter.from_kserve(InferRequest("iris", [tensor], request_id="bad\x00id"))


def test_answers_go_back_as_kserve_responses():
    request = V2Request("r-2", [], [RequestedOutput("label_name", False)], False)
    response = V2Response("r-2", "iris", "3", [Output("label_name", "BYTES", [2], ["setosa", "virginica"], False)])
    answer = kserve_adapter.to_kserve(response, request)
    assert isinstance(answer, InferResponse)
    assert (answer.id, answer.model_name, answer.model_version) == ("r-2", "iris", "3")
    [out] = answer.outputs
    assert (out.name, out.datatype, out.shape) == ("label_name", "BYTES", [2])
    assert [v.decode() if isinstance(v, bytes) else v for v in out.as_numpy().tolist()] == ["setosa", "virginica"]
