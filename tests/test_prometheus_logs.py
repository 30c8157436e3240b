"""JSON logs (``KCP_LOG_FORMAT=json``) of the server and the bridge, and the ``traceparent`` the bridge carries.

Log shippers parse one JSON object per line; a trace context on the Kafka message must reach the model-server
call (gRPC metadata or HTTP header) and the log lines written meanwhile. The formatters are unit-tested here;
the model-server call is checked against a gRPC server and an HTTP transport that record what they receive,
and end to end: a real bridge on the embedded broker calls a recording gRPC server. The live servers and bridge
of tests/test_prometheus_live.py run with JSON logs and their logs are parsed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import logging.config
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import pytest

from predictors.protocol import observability
from streaming import logs as bridge_logs
from streaming.messenger import Messenger
from streaming.settings import V2ClientSettings
from streaming.tensors import InferRequest, Tensor
from streaming.v2_grpc import pb2, pb2_grpc
from streaming.v2client import GrpcTransport, RestTransport
from tests.fixtures.broker import launch_bridge
from tests.fixtures.ports import wait_for

TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line parsed as a JSON object (fails on the first line that is not one)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON log line: {line!r}")
    return out


@contextlib.contextmanager
def captured(logger: logging.Logger, formatter: logging.Formatter) -> Any:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("module", [observability, bridge_logs], ids=["server", "bridge"])
def test_json_formatter_carries_fields_extras_exceptions_and_the_trace(module: Any) -> None:
    log = logging.getLogger(f"kcp-test-{module.__name__}")
    with captured(log, module.JsonFormatter()) as stream:
        log.info("plain %s", "text")
        token = module.TRACEPARENT.set(TRACE)
        try:
            log.warning("with extras", extra={"model": "iris", "rows": 3, "odd": object()})
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
        finally:
            module.TRACEPARENT.reset(token)
    plain, extras, failed = json_lines(stream.getvalue())
    assert plain["message"] == "plain text" and plain["level"] == "INFO" and "traceparent" not in plain
    assert plain["time"].endswith("Z") and plain["logger"] == log.name
    assert extras["traceparent"] == TRACE and extras["model"] == "iris" and extras["rows"] == 3
    assert isinstance(extras["odd"], str)
    assert failed["level"] == "ERROR" and "ValueError: boom" in failed["exception"]


def test_only_w3c_trace_contexts_are_taken() -> None:
    assert bridge_logs.traceparent(TRACE.encode()) == TRACE
    assert bridge_logs.traceparent(TRACE.upper()) == TRACE
    for bad in (None, b"", b"not-a-trace", TRACE + "\n{\"level\": \"ERROR\"}", TRACE[:-1]):
        assert bridge_logs.traceparent(bad) is None
    observability.set_traceparent("garbage\nline")
    assert observability.TRACEPARENT.get() is None
    observability.set_traceparent(TRACE.encode())
    assert observability.TRACEPARENT.get() == TRACE
    observability.TRACEPARENT.set(None)


def test_json_log_config_keeps_handlers_and_levels() -> None:
    """KServe's logging document with the JSON formatter: dictConfig accepts it and its loggers write JSON."""
    import kserve.logging

    config = observability.json_log_config(kserve.logging.KSERVE_LOG_CONFIG)
    assert config["handlers"] == kserve.logging.KSERVE_LOG_CONFIG["handlers"]
    assert config["loggers"] == kserve.logging.KSERVE_LOG_CONFIG["loggers"]
    assert set(config["formatters"]) == set(kserve.logging.KSERVE_LOG_CONFIG["formatters"])
    stream = io.StringIO()
    config = {**config, "handlers": {"only": {"class": "logging.StreamHandler", "formatter": "kserve",
                                              "stream": stream}},
              "loggers": {"kcp-test-dictconfig": {"handlers": ["only"], "level": "INFO", "propagate": False}}}
    logging.config.dictConfig(config)
    logging.getLogger("kcp-test-dictconfig").info("hello %d", 1)
    (line,) = json_lines(stream.getvalue())
    assert line["message"] == "hello 1"


def test_log_format_is_text_unless_json() -> None:
    assert not observability.use_json_logs("text") and not observability.use_json_logs("")
    assert not bridge_logs.use_json_logs("plain")


# --- traceparent on the model-server call ---------------------------------------------------------------


def request() -> InferRequest:
    return InferRequest("iris", [Tensor("input-0", "FP32", [1, 4], [5.1, 3.5, 1.4, 0.2])], id="r1")


class Recorder(pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def ModelInfer(self, req: pb2.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        out = pb2.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1])
        out.contents.int64_contents.append(0)
        return pb2.ModelInferResponse(model_name=req.model_name, id=req.id, outputs=[out])


async def grpc_calls() -> list[dict[str, str]]:
    recorder = Recorder()
    server = grpc.aio.server()
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    transport = GrpcTransport(V2ClientSettings(grpc_target=f"127.0.0.1:{port}", api_key="k"))
    try:
        token = bridge_logs.TRACEPARENT.set(TRACE)
        await transport.infer(request())
        bridge_logs.TRACEPARENT.reset(token)
        await transport.infer(request())
    finally:
        with contextlib.suppress(Exception):
            await transport.close()
        await server.stop(None)
    return recorder.metadata


def test_grpc_call_carries_the_trace_context_beside_the_key() -> None:
    traced, plain = asyncio.run(grpc_calls())
    assert traced["traceparent"] == TRACE and traced["authorization"] == "Bearer k"
    assert "traceparent" not in plain and plain["authorization"] == "Bearer k"


async def rest_calls() -> list[httpx.Headers]:
    seen: list[httpx.Headers] = []

    def answer(req: httpx.Request) -> httpx.Response:
        seen.append(req.headers)
        return httpx.Response(200, json={"model_name": "iris", "id": "r1", "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [1], "data": [0]}]})

    transport = RestTransport(V2ClientSettings(protocol="rest", rest_url="http://model"))
    transport._client = httpx.AsyncClient(base_url="http://model", transport=httpx.MockTransport(answer))
    token = bridge_logs.TRACEPARENT.set(TRACE)
    await transport.infer(request())
    bridge_logs.TRACEPARENT.reset(token)
    await transport.infer(request())
    await transport._client.aclose()
    return seen


def test_rest_call_carries_the_trace_context() -> None:
    traced, plain = asyncio.run(rest_calls())
    assert traced["traceparent"] == TRACE
    assert "traceparent" not in plain


# --- through the real bridge ----------------------------------------------------------------------------


class SyncRecorder(pb2_grpc.GRPCInferenceServiceServicer):
    """A model server that answers label 0 and keeps the metadata of every ModelInfer call."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def ModelInfer(self, req: pb2.ModelInferRequest, context: grpc.ServicerContext) -> Any:
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        rows = req.inputs[0].shape[0] if req.inputs and req.inputs[0].shape else 1
        out = pb2.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[rows])
        out.contents.int64_contents.extend([0] * rows)
        return pb2.ModelInferResponse(model_name=req.model_name, id=req.id, outputs=[out])


def test_the_bridge_carries_a_messages_traceparent_to_the_model_server(kafka_broker, tmp_path) -> None:
    recorder = SyncRecorder()
    server = grpc.server(ThreadPoolExecutor(2))
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    suffix = uuid.uuid4().hex[:6]
    topics = {"requests": f"trace-req-{suffix}", "results": f"trace-res-{suffix}", "dlq": f"trace-dlq-{suffix}"}
    kafka_broker.create_topics({topics["requests"]: 1, topics["results"]: 1, topics["dlq"]: 1})
    bridge = launch_bridge(kafka_broker.env(), topics, tmp_path, group=f"trace-{suffix}",
                           grpc_target=f"127.0.0.1:{port}", env={"KCP_LOG_FORMAT": "json"})
    try:
        with Messenger(topics["requests"], settings=kafka_broker.messenger_settings()) as sender:
            sender.send({"id": "traced", "features": [5.1, 3.5, 1.4, 0.2]}, key="traced",
                        headers={"traceparent": TRACE})
            sender.flush()
            wait_for(lambda: bool(recorder.metadata), timeout=60, what="the model call")
            sender.send({"id": "plain", "features": [5.1, 3.5, 1.4, 0.2]}, key="plain")
            sender.flush()
            wait_for(lambda: len(recorder.metadata) >= 2, timeout=60, what="the second model call")
    finally:
        bridge.stop()
        server.stop(None)
    traced, plain = recorder.metadata[:2]
    assert traced.get("traceparent") == TRACE
    assert "traceparent" not in plain, "a trace context stays with its own message"
    assert json_lines(bridge.log())
