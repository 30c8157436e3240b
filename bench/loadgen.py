"""The load generator: a separate process that sends pre-encoded V2 requests as fast as it is answered.

Why a separate process: the server under test and the client share two cores; in one
process the client's Python would compete for the server's GIL and the numbers would
measure neither. Why pre-encoded bodies and unparsed responses: on two cores every
microsecond the client spends is taken from the server, so the client only sends bytes,
checks the status, and times the round trip.

Closed loop: ``concurrency`` workers each send a request, wait for its answer, send the next,
until ``requests`` answers have been timed (after ``warmup`` untimed ones on the same
connections). Output: one JSON object on stdout.

    python -m bench.loadgen SPEC.json     # spec: see :class:`LoadSpec`
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Protocol = Literal["rest", "grpc"]
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


@dataclass
class LoadSpec:
    """What to send, where, how often and how many at once."""

    protocol: Protocol
    target: str  # REST: http://host:port/v2/models/NAME/infer; gRPC: host:port
    body_b64: str  # REST: the JSON body; gRPC: a serialized ModelInferRequest
    concurrency: int
    requests: int
    warmup: int = 200
    timeout_s: float = 60.0

    @property
    def body(self) -> bytes:
        return base64.b64decode(self.body_b64)


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    first_error: str | None = None
    server_cpu_ms: float | None = None  # filled in by the caller, who can see the server process
    latencies_ms: list[float] | None = None  # every timed request, for percentiles pooled over runs
    steal_pct: float | None = None  # the machine's CPU steal over the run (filled in by the caller)


async def _closed_loop(spec: LoadSpec, send: Callable[[], Awaitable[str | None]]) -> LoadResult:
    """Run warm-up then the timed phase with ``spec.concurrency`` workers sharing a request counter."""
    latencies = np.zeros(spec.requests, dtype=np.float64)
    errors: list[str] = []
    counter = {"next": 0}

    async def worker(total: int, timed: bool) -> None:
        while True:
            i = counter["next"]
            if i >= total:
                return
            counter["next"] = i + 1
            start = time.perf_counter()
            error = await send()
            if timed:
                latencies[i] = time.perf_counter() - start
                if error is not None:
                    errors.append(error)

    counter["next"] = 0
    await asyncio.gather(*(worker(spec.warmup, False) for _ in range(spec.concurrency)))
    counter["next"] = 0
    started = time.perf_counter()
    await asyncio.gather(*(worker(spec.requests, True) for _ in range(spec.concurrency)))
    seconds = time.perf_counter() - started
    ms = latencies * 1000.0
    return LoadResult(
        requests=spec.requests, errors=len(errors), seconds=seconds, throughput=spec.requests / seconds,
        p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)), mean_ms=float(ms.mean()), max_ms=float(ms.max()),
        first_error=errors[0] if errors else None, latencies_ms=[round(x, 4) for x in ms.tolist()])


async def run_rest(spec: LoadSpec) -> LoadResult:
    import aiohttp

    body = spec.body
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=spec.concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send() -> str | None:
            try:
                async with session.post(spec.target, data=body, headers=headers) as response:
                    payload = await response.read()
                    if response.status != 200:
                        return f"HTTP {response.status}: {payload[:200]!r}"
            except Exception as exc:  # counted, and the first one reported
                return f"{type(exc).__name__}: {exc}"
            return None

        return await _closed_loop(spec, send)


async def run_grpc(spec: LoadSpec) -> LoadResult:
    import grpc

    body = spec.body
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(spec.target, options=options) as channel:
        # No serializers: the request is already bytes and the response is not parsed.
        infer = channel.unary_unary(GRPC_INFER)

        async def send() -> str | None:
            try:
                await infer(body, timeout=spec.timeout_s)
            except grpc.aio.AioRpcError as exc:
                return f"gRPC {exc.code().name}: {exc.details()}"
            return None

        return await _closed_loop(spec, send)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0], encoding="utf-8") as f:
        spec = LoadSpec(**json.load(f))
    if spec.protocol == "rest":
        import uvloop  # the fastest client loop available; gRPC keeps asyncio's own (grpc.aio's supported loop)

        result = uvloop.run(run_rest(spec))
    else:
        result = asyncio.run(run_grpc(spec))
    json.dump(asdict(result), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
