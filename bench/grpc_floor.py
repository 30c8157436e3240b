"""What ``grpc.aio`` itself costs per call: a null ``ModelInfer`` next to our server and stock KServe.

``python -m bench.grpc_floor [--rounds 3] [--requests 3000]``. The null server answers every
``ModelInfer`` with one fixed, pre-serialized response (a generic handler on raw bytes: no
protobuf parsing, no model), so its server CPU per request is the floor any Python ``grpc.aio``
server pays on this machine; our server's and stock KServe's figures above it are their own
work. The same null answer from grpc's thread-pool server, and from a bare asyncio HTTP/2 front end
(:class:`H2Front`, on the ``h2`` library) show what other front ends would cost; the last one also
serves our model path (parse, the model's hooks, encode: no metrics, no prediction log) on the Iris
package, as a measure of what a gRPC front end of that kind would leave of our server's cost.
All run at once and are driven in turn (:func:`bench.common.interleave`). Prints the table; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from contextlib import ExitStack

from bench.common import PYTHON, WORK, Contender, free_port, interleave, our_server, service, table
from bench.iris import DEFAULTS, body
from bench.kserve_stock import kserve_stock
from bench.packages import iris

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _null_answer() -> bytes:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    return pb.ModelInferResponse(
        model_name="iris", outputs=[pb.ModelInferResponse.InferOutputTensor(name="label", datatype="INT64", shape=[1])],
        raw_output_contents=[bytes(8)]).SerializeToString()


def _null_handlers(infer: object) -> object:
    import grpc

    class Handlers(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
            return grpc.unary_unary_rpc_method_handler(infer) if details.method == METHOD else None

    return Handlers()


def serve_null_sync(port: int) -> None:
    """The same null answer from grpc's thread-pool server (no event loop)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    answer = _null_answer()

    def infer(request: bytes, context: object) -> bytes:
        return answer

    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers([_null_handlers(infer)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_null(port: int) -> None:
    from grpc import aio

    answer = _null_answer()

    async def infer(request: bytes, context: object) -> bytes:
        return answer

    async def main() -> None:
        server = aio.server()
        server.add_generic_rpc_handlers([_null_handlers(infer)])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


class H2Front(asyncio.Protocol):
    """Unary gRPC over HTTP/2 on one asyncio connection: each finished request stream is answered by
    ``answer(message) -> bytes`` (a measuring tool: no deadlines, metadata, flow-control waits or errors)."""

    HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    TRAILERS = [(b"grpc-status", b"0")]

    def __init__(self, answer: Callable[[bytes], Awaitable[bytes]]) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        self._answer = answer
        self._conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self._bodies: dict[int, bytearray] = {}
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._conn.initiate_connection()
        transport.write(self._conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded

        conn = self._conn
        for event in conn.receive_data(data):
            if isinstance(event, RequestReceived):
                self._bodies[event.stream_id] = bytearray()
            elif isinstance(event, DataReceived):
                self._bodies[event.stream_id] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded):
                body = bytes(self._bodies.pop(event.stream_id))
                asyncio.get_running_loop().create_task(self._reply(event.stream_id, body[5:]))
            elif isinstance(event, ConnectionTerminated):
                assert self._transport is not None
                self._transport.close()
        self._flush()

    async def _reply(self, stream_id: int, message: bytes) -> None:
        answer = await self._answer(message)
        self._conn.send_headers(stream_id, self.HEADERS)
        self._conn.send_data(stream_id, b"\x00" + len(answer).to_bytes(4, "big") + answer)
        self._conn.send_headers(stream_id, self.TRAILERS, end_stream=True)
        self._flush()

    def _flush(self) -> None:
        out = self._conn.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)


def serve_h2(port: int, model_dir: str | None) -> None:
    """The null answer over :class:`H2Front`, or with ``model_dir`` our model path on that package."""
    answer = _null_answer()

    async def null(message: bytes) -> bytes:
        return answer

    handler = null
    if model_dir is not None:
        from pathlib import Path

        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

        from predictors.models import ServingContext
        from predictors.protocol.v2 import encode_grpc, parse_grpc
        from predictors.runtime.repository import PackageRepository

        model = PackageRepository(Path(model_dir), ServingContext()).load_all()[0]

        async def ours(message: bytes) -> bytes:
            request = pb.ModelInferRequest.FromString(message)
            return encode_grpc(await model.infer(parse_grpc(request))).SerializeToString()

        handler = ours

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: H2Front(handler), "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_floor", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args(argv)
    models = WORK / "iris-models"
    package = iris(models)
    grpc_cases = [("grpc", 1), ("grpc", 16)]
    with ExitStack() as stack:
        port = free_port()
        null = stack.enter_context(service("grpc-null", [PYTHON, "-m", "bench.grpc_floor", "--serve-null", str(port)],
                                           grpc_port=port, ready=lambda: _listening(port)))
        sync_port = free_port()
        null_sync = stack.enter_context(service(
            "grpc-null-sync", [PYTHON, "-m", "bench.grpc_floor", "--serve-null-sync", str(sync_port)],
            grpc_port=sync_port, ready=lambda: _listening(sync_port)))
        h2_port = free_port()
        null_h2 = stack.enter_context(service(
            "grpc-null-h2", [PYTHON, "-m", "bench.grpc_floor", "--serve-h2", str(h2_port)],
            grpc_port=h2_port, ready=lambda: _listening(h2_port)))
        h2_ours_port = free_port()
        h2_ours = stack.enter_context(service(
            "grpc-h2-ours", [PYTHON, "-m", "bench.grpc_floor", "--serve-h2", str(h2_ours_port), str(package.path)],
            grpc_port=h2_ours_port, ready=lambda: _listening(h2_ours_port)))
        ours = stack.enter_context(our_server("grpc-floor-ours", models, extra_args=DEFAULTS))
        stock = stack.enter_context(kserve_stock("grpc-floor-kserve", package.path / "model.joblib"))
        contenders = [Contender(label, svc, body, lambda _p, s=svc: s.grpc_target)
                      for label, svc in [("null grpc.aio handler", null),
                                         ("null grpc.server (threads)", null_sync),
                                         ("null asyncio + h2 front end", null_h2),
                                         ("our model path, asyncio + h2 front end", h2_ours), ("ours", ours),
                                         ("KServe 0.21 (stock)", stock)]]
        rows = interleave(contenders, grpc_cases, args.requests, args.rounds)
    print(table(f"gRPC floor — median of {args.rounds} interleaved rounds × {args.requests} requests",
                ["server", "conc.", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "load avg"],
                [[r["server"], r["concurrency"], r["throughput"], r["p50_ms"], r["p99_ms"], r["server_cpu_ms"],
                  r["loadavg"]] for r in rows]))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve-null":
        serve_null(int(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--serve-null-sync":
        serve_null_sync(int(sys.argv[2]))
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "--serve-h2":
        serve_h2(int(sys.argv[2]), sys.argv[3] if len(sys.argv) == 4 else None)
    else:
        main()
