"""What grpc's own servers cost per call: a null ``ModelInfer`` next to our server (with each of its gRPC front
ends) and stock KServe.

``python -m bench.grpc_floor [--rounds 3] [--requests 3000]``. The null servers answer every ``ModelInfer`` with
one fixed, pre-serialized response (a generic handler on raw bytes: no protobuf parsing, no model), from
``grpc.aio`` and from grpc's thread-pool server, so their server CPU per request is the floor a Python server on
grpc's C core pays on this machine; our server's and stock KServe's figures above it are their own work. All run
at once and are driven in turn (:func:`bench.common.interleave`). Prints the table; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
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
        ours = stack.enter_context(our_server("grpc-floor-ours", models, extra_args=DEFAULTS))
        ours_grpcio = stack.enter_context(our_server("grpc-floor-ours-grpcio", models,
                                                     extra_args=[*DEFAULTS, "--grpc-front", "grpcio"]))
        stock = stack.enter_context(kserve_stock("grpc-floor-kserve", package.path / "model.joblib"))
        contenders = [Contender(label, svc, body, lambda _p, s=svc: s.grpc_target)
                      for label, svc in [("null grpc.aio handler", null),
                                         ("null grpc.server (threads)", null_sync),
                                         ("ours", ours), ("ours, --grpc-front grpcio", ours_grpcio),
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
    else:
        main()
