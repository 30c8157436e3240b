"""Every place this server depends on KServe beyond its public classes and functions, in one module.

The server is a ``kserve.ModelServer`` and uses KServe's data plane, servicer, REST server and ``Model`` base
class through their public interfaces. A few things it needs have no public seam in KServe, and are reached
here only:

* the FastAPI app, the command-line parser and the parsed flags are module globals of ``kserve.model_server``
  (``app``, ``parser``, ``args``);
* the REST server's uvicorn server is the private ``RESTServer._server`` (serving on given sockets, and
  stopping it);
* KServe's timing middleware can only be removed by editing ``app.user_middleware`` before the app starts;
* KServe's logging configuration is the module-level dict ``kserve.logging.KSERVE_LOG_CONFIG``;
* binary input data of an ``InferInput`` is kept only in its private ``_raw_data``.

It also holds the stock adapter, :func:`from_kserve` and :func:`to_kserve`: the model path speaks
:mod:`predictors.protocol.v2`, and these translate at the edge when a model runs under KServe's own data plane
(stock ``kserve.ModelServer``, tested by ``tests/test_server_stock_kserve.py``).

``tests/test_kserve_adapter.py`` pins the KServe version this module was written against and exercises each
function, so a KServe upgrade that moves one of these fails there, and only this module changes.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import numpy as np
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.infer_type import RequestedOutput as KServeRequestedOutput

from predictors.protocol.v2 import RequestedOutput, Tensor, V2Request, V2Response, check_id, checked_outputs

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI
    from kserve.protocol.infer_type import InferInput
    from kserve.protocol.rest.server import RESTServer

KSERVE_VERSION = "0.21.0"
"""The KServe release this module reaches into (pyproject.toml pins the same)."""


def fastapi_app() -> FastAPI:
    """KServe's FastAPI app: the routes and handlers ``kserve.ModelServer`` serves REST with."""
    from kserve import model_server

    return model_server.app


def parsed_flags() -> argparse.Namespace:
    """The flags KServe parsed from ``sys.argv`` at import (the gRPC message limits have no other home)."""
    from kserve import model_server

    return model_server.args


def flag_actions() -> list[argparse.Action]:
    """KServe's command-line flags, as the actions of its module-level parser (help text, defaults, types)."""
    from kserve import model_server

    return [action for action in model_server.parser._actions if not isinstance(action, argparse._HelpAction)]


def remove_middleware(app: FastAPI, middleware: type) -> None:
    """Take ``middleware`` out of ``app`` before it starts (FastAPI has no remove; the list is read at start)."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not middleware]


def uvicorn_server(rest_server: RESTServer) -> uvicorn.Server:
    """The uvicorn server inside KServe's REST server."""
    return rest_server._server


def logging_config() -> dict[str, Any]:
    """KServe's logging configuration, which ``kserve.logging.configure_logging`` applies; edited in place."""
    import kserve.logging

    return kserve.logging.KSERVE_LOG_CONFIG


def raw_input_data(tensor: InferInput) -> bytes | None:
    """The binary data of a tensor sent in the binary tensor format (None for JSON data)."""
    return tensor._raw_data


def from_kserve(request: InferRequest) -> V2Request:
    """KServe's ``InferRequest`` (the stock data plane's) as the model path's :class:`V2Request`."""
    inputs = [Tensor(t.name, t.datatype, list(t.shape), data=t.data, raw=raw_input_data(t),
                     parameters=dict(t.parameters) if t.parameters else None) for t in request.inputs]
    outputs = checked_outputs([RequestedOutput(o.name, o.binary_data) for o in request.request_outputs or []])
    if request.id:
        check_id(request.id, "request id")
    return V2Request(request.id, inputs, outputs, bool(request.use_binary_outputs))


def to_kserve(response: V2Response, request: V2Request) -> InferResponse:
    """The model path's answer as KServe's ``InferResponse`` (which KServe encodes for REST or gRPC)."""
    outputs = []
    for out in response.outputs:
        output = InferOutput(name=out.name, shape=out.shape, datatype=out.datatype)
        data = out.data if isinstance(out.data, np.ndarray) else np.array([v.encode() for v in out.data], dtype=object)
        output.set_data_from_numpy(data, binary_data=False)  # KServe re-encodes binary per request
        outputs.append(output)
    requested = [KServeRequestedOutput(o.name, None if o.binary is None else {"binary_data": o.binary})
                 for o in request.outputs or []]
    return InferResponse(response_id=response.id, model_name=response.model_name,
                         model_version=response.model_version, infer_outputs=outputs,
                         use_binary_outputs=request.binary_outputs, requested_outputs=requested or None)
