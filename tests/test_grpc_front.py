"""The asyncio gRPC front end (the default, ``--grpc-front asyncio``) against grpcio and raw HTTP/2 clients, over
real sockets.

The servicer behind it is the one ``grpc.aio`` serves (the servicer's own tests run against both front ends
with ``KCP_GRPC_FRONT``); these tests cover what the front end itself owns: HTTP/2 framing and flow control,
message limits, unknown methods, deadlines, cancellation, the API key, and clients that do not speak gRPC.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from tests.fixtures.server import TRAINED_MODELS, start_model_server

KEY = "front-end-key"
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 4.4, 1.4], [6.3, 3.3, 6.0, 2.5]], dtype=np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("front-models")
    (models / "iris").symlink_to(TRAINED_MODELS / "iris", target_is_directory=True)
    tmp = tmp_path_factory.mktemp("front-server")
    with start_model_server(models, tmp, extra_args=["--grpc-front", "asyncio", "--grpc_max_receive_message_length",
                                                     str(64 * 1024)]) as server:
        yield server


def infer_request(rows: np.ndarray, **kwargs) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="input-0", datatype="FP32", shape=list(rows.shape),
                                                   contents=pb.InferTensorContents(fp32_contents=rows.ravel()))
    return pb.ModelInferRequest(model_name="iris", inputs=[tensor], **kwargs)


def labels(response: pb.ModelInferResponse) -> list[int]:
    return list(next(o for o in response.outputs if o.name == "label").contents.int64_contents)


def rest_labels(server, rows: np.ndarray) -> list[int]:
    body = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": list(rows.shape),
                        "data": rows.ravel().tolist()}]}
    with server.client() as client:
        answer = client.post("/v2/models/iris/infer", json=body).json()
    return next(o for o in answer["outputs"] if o["name"] == "label")["data"]


def test_answers_as_rest_does_and_reports_itself_in_the_log(served):
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        assert stub.ModelMetadata(pb.ModelMetadataRequest(name="iris"), timeout=10).versions
        response = stub.ModelInfer(infer_request(ROWS), timeout=10)
    assert labels(response) == rest_labels(served, ROWS)
    assert "asyncio front end" in served.log()


def test_many_concurrent_calls_on_one_connection_each_get_their_own_answer(served):
    rows = np.random.default_rng(0).uniform(0, 8, (200, 4)).astype(np.float32)
    expected = rest_labels(served, rows)
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with ThreadPoolExecutor(32) as pool:
            got = list(pool.map(lambda i: labels(stub.ModelInfer(infer_request(rows[i:i + 1]), timeout=30))[0],
                                range(len(rows))))
    assert got == expected


def test_an_answer_larger_than_the_clients_window_arrives_whole(served):
    """A client window of 1 KiB forces the answer (about 40 KiB for 256 rows) through flow control."""
    rows = np.random.default_rng(1).uniform(0, 8, (256, 4)).astype(np.float32)
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(served.grpc_target, options=options) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(rows), timeout=30)
    assert response.ByteSize() > 16 * 1024
    assert labels(response) == rest_labels(served, rows)


@pytest.mark.parametrize("method, code", [
    ("/inference.GRPCInferenceService/NoSuchMethod", grpc.StatusCode.UNIMPLEMENTED),
    ("/other.Service/ModelInfer", grpc.StatusCode.UNIMPLEMENTED),
])
def test_unknown_methods_are_unimplemented(served, method, code):
    with grpc.insecure_channel(served.grpc_target) as channel:
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
    assert refused.value.code() == code


def test_a_message_that_is_not_the_request_type_is_refused_and_the_server_goes_on(served):
    with grpc.insecure_channel(served.grpc_target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as refused:
            call(b"\xff\xff\xff\xff not a protobuf message", timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid ModelInfer request message" in refused.value.details()
        assert labels(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS), timeout=10))


def test_a_message_over_the_limit_is_resource_exhausted_and_the_server_goes_on(served):
    rows = np.zeros((300, 4), dtype=np.float32)
    huge = infer_request(rows, id="x" * (80 * 1024))
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(huge, timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert labels(stub.ModelInfer(infer_request(ROWS), timeout=10))


def test_a_cancelled_call_leaves_the_connection_serving(served):
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        futures = [stub.ModelInfer.future(infer_request(ROWS), timeout=10) for _ in range(20)]
        for future in futures[::2]:
            future.cancel()
        answered = [f.result() for f in futures[1::2]]
        assert all(labels(a) for a in answered)
        assert labels(stub.ModelInfer(infer_request(ROWS), timeout=10))


def raw_call(server, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """One unary call from a raw HTTP/2 client with exactly these extra headers and body: its grpc-status."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ResponseReceived, StreamEnded, TrailersReceived

    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
                          (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
                          (b"content-type", b"application/grpc"), (b"te", b"trailers"), *headers])
    conn.send_data(1, body, end_stream=True)
    status = b""
    with socket.create_connection(("127.0.0.1", server.grpc_port), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while True:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, (ResponseReceived, TrailersReceived)):
                    status = dict(event.headers).get(b"grpc-status", status)
                if isinstance(event, StreamEnded):
                    return status
            sock.sendall(conn.data_to_send())


def framed(message: bytes, compressed: bool = False) -> bytes:
    return (b"\x01" if compressed else b"\x00") + len(message).to_bytes(4, "big") + message


def code_of(status: grpc.StatusCode) -> bytes:
    return str(status.value[0]).encode()


@pytest.mark.parametrize("headers, body, status", [
    ([], framed(infer_request(ROWS).SerializeToString()), grpc.StatusCode.OK),
    ([(b"grpc-timeout", b"1n")], framed(infer_request(ROWS).SerializeToString()), grpc.StatusCode.DEADLINE_EXCEEDED),
    ([(b"grpc-timeout", b"soon")], framed(infer_request(ROWS).SerializeToString()), grpc.StatusCode.INTERNAL),
    ([(b"grpc-encoding", b"gzip")], framed(b"\x1f\x8b", compressed=True), grpc.StatusCode.UNIMPLEMENTED),
    ([], framed(infer_request(ROWS).SerializeToString(), compressed=True), grpc.StatusCode.INTERNAL),
    ([], framed(infer_request(ROWS).SerializeToString())[:-3], grpc.StatusCode.INTERNAL),
    ([], framed(b"") * 2, grpc.StatusCode.INTERNAL),
    ([], b"\x00\x00", grpc.StatusCode.INTERNAL),
], ids=["plain", "deadline-passed", "malformed-timeout", "gzip", "compressed-flag-without-encoding", "short-message",
        "two-messages", "no-prefix"])
def test_what_the_front_end_reads_from_the_wire(served, headers, body, status):
    """Deadlines (counted from the request's headers), encodings and message framing, byte for byte; after each
    the connection pool still serves."""
    assert raw_call(served, headers, body) == code_of(status)
    with grpc.insecure_channel(served.grpc_target) as channel:
        assert labels(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS), timeout=10))


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 64,
                                     PREFACE + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" * 3])
def test_a_client_that_does_not_speak_http2_is_disconnected_and_others_are_served(served, garbage):
    with socket.create_connection(("127.0.0.1", served.grpc_port), timeout=10) as sock:
        sock.sendall(garbage)
        sock.settimeout(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    break
            except (ConnectionResetError, TimeoutError):
                break
        else:
            pytest.fail("the server kept the connection of a client that sent garbage")
    with grpc.insecure_channel(served.grpc_target) as channel:
        assert labels(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS), timeout=10))


@pytest.mark.parametrize("front", ["asyncio", "grpcio"])
def test_the_api_key_is_required_except_for_health(tmp_path: Path, front: str):
    models = tmp_path / "models"
    models.mkdir()
    (models / "iris").symlink_to(TRAINED_MODELS / "iris", target_is_directory=True)
    with start_model_server(models, tmp_path, api_key=KEY, extra_args=["--grpc-front", front]) as server, \
            grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(infer_request(ROWS), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for metadata in ((("authorization", f"Bearer {KEY}"),), (("x-api-key", KEY),)):
            assert labels(stub.ModelInfer(infer_request(ROWS), timeout=10, metadata=metadata))
        with pytest.raises(grpc.RpcError) as wrong:
            stub.ModelInfer(infer_request(ROWS), timeout=10, metadata=(("authorization", "Bearer nope"),))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_streams_that_never_finish_cannot_make_one_connection_buffer_without_bound(served):
    """A raw HTTP/2 client opens stream after stream, each with most of a message and never its end: once the
    connection holds four messages' worth, further streams are refused with RESOURCE_EXHAUSTED; the server serves
    everyone else meanwhile."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ResponseReceived, TrailersReceived

    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    statuses: dict[int, bytes] = {}
    exhausted = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]).encode()
    with socket.create_connection(("127.0.0.1", served.grpc_port), timeout=10) as sock:
        def pump() -> None:
            sock.sendall(conn.data_to_send())
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, (ResponseReceived, TrailersReceived)):
                    statuses.setdefault(event.stream_id, dict(event.headers).get(b"grpc-status", b""))
            sock.sendall(conn.data_to_send())

        body = b"\x00" + (60 * 1024).to_bytes(4, "big") + b"x" * (50 * 1024)
        streams = list(range(1, 2 * 12, 2))
        for stream_id in streams:
            conn.send_headers(stream_id, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
                                          (b":path", b"/inference.GRPCInferenceService/ModelInfer"),
                                          (b"content-type", b"application/grpc"), (b"te", b"trailers")])
            for start in range(0, len(body), 8 * 1024):
                piece = body[start:start + 8 * 1024]
                while conn.local_flow_control_window(stream_id) < len(piece) and stream_id not in statuses:
                    pump()
                if stream_id in statuses:
                    break
                conn.send_data(stream_id, piece)
            sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        fit = 4 * (64 * 1024 + 5) // len(body)  # streams whose bodies fit in the connection's budget
        while len(statuses) < len(streams) - fit and time.monotonic() < deadline:
            pump()
        with grpc.insecure_channel(served.grpc_target) as channel:
            assert labels(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS), timeout=10))
    assert statuses == dict.fromkeys(streams[fit:], exhausted)


def test_a_client_that_does_not_read_its_answers_is_not_buffered_for_without_bound(served):
    """PING after PING without reading one acknowledgement: once the server's unsent bytes pass the transport's
    high-water mark it stops reading that connection, so the client's sends stall instead of the server's memory
    growing; other clients are served meanwhile."""
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    chunk = ping * 4096  # 68 KiB
    sent = 0
    with socket.create_connection(("127.0.0.1", served.grpc_port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        sock.settimeout(3)
        try:
            while sent < 256 * 1024 * 1024:
                sock.sendall(chunk)
                sent += len(chunk)
        except TimeoutError:
            pass
        assert sent < 256 * 1024 * 1024, "the server read every PING while its answers piled up unsent"
        with grpc.insecure_channel(served.grpc_target) as channel:
            assert labels(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(ROWS), timeout=10))
