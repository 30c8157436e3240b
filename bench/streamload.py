"""Load for the Kafka bridge benchmark: produce Iris requests, wait for every result, time each one.

Runs as its own process (``python -m bench.streamload SPEC.json``) so its Kafka clients do not
share an interpreter with anything measured. Two modes:

* ``burst``: produce ``count`` requests as fast as the producer goes, then wait until a result
  for every request id has arrived; results/s = count / (last result - first send).
* ``steady``: produce at ``rate`` messages/s for ``count`` messages (paced on a clock, not
  on acknowledgements) and report end-to-end latency percentiles at that rate.

Per-message latency = result received - request handed to the producer. It is also split at the
result's Kafka timestamp (set when the bridge hands the result to its producer, same clock): before
it, the request's broker hop and the bridge's work; after it, the result's broker hop to this
process, which any consumer of the results pays. Requests use the
streaming package's own producer API (:func:`streaming.producers.iris_messages`, the
``features`` form); results are read with the backend's reply listener, which starts at the end of
the results topic (a tail from the beginning would first read every earlier run's results, and
that catch-up used to land in the latencies of a run's first requests), matched by request id.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

BURST_CHUNK = 100  # requests handed to the producer per call in a burst


@dataclass
class StreamSpec:
    mode: Literal["burst", "steady"]
    bootstrap: str
    request_topic: str
    result_topic: str
    csv: str
    count: int
    run_id: str
    rate: float = 1000.0
    timeout_s: float = 600.0


@dataclass
class StreamResult:
    mode: str
    count: int
    received: int
    seconds: float
    results_per_s: float
    produce_seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    offered_rate: float | None = None
    cpu_s: float | None = None  # this load process's own CPU over the run (user + system, all threads)
    # p50 / p99 of the two legs, split at the result record's timestamp (ms; None without timestamps)
    to_result_ms: tuple[float, float] | None = None
    result_hop_ms: tuple[float, float] | None = None


def run(spec: StreamSpec) -> StreamResult:
    from streaming.messenger import Messenger, Record, encode_headers, encode_key, encode_value, make_backend
    from streaming.producers import iris_messages, repeat
    from streaming.settings import KafkaSettings, MessengerSettings

    settings = MessengerSettings(kafka=KafkaSettings(bootstrap_servers=spec.bootstrap))
    base = iris_messages(Path(spec.csv), form="features", run_id=spec.run_id)
    times = -(-spec.count // len(base))
    messages = list(repeat(base, times))[:spec.count]
    sent_at: dict[str, float] = {}
    received_at: dict[str, float] = {}
    stamped: dict[str, tuple[int, float]] = {}  # request id -> (result record's timestamp ms, wall clock on receipt)
    sent_wall: dict[str, float] = {}
    done = threading.Event()

    backend = make_backend(settings)
    positioned = threading.Event()

    def collect() -> None:
        tail = backend.reply_listener(spec.result_topic)  # positioned at the end before any request goes out
        positioned.set()
        try:
            deadline = time.monotonic() + spec.timeout_s
            while len(received_at) < spec.count and time.monotonic() < deadline:
                for m in tail.poll(0.2):
                    key = m.key_str
                    if key is not None and key.startswith(spec.run_id) and key not in received_at:
                        received_at[key] = time.perf_counter()
                        if m.timestamp_ms:
                            stamped[key] = (m.timestamp_ms, time.time())
        finally:
            tail.close()
            done.set()

    # The load generator's own full GC collections (tens of ms over its imports) would land in the latencies.
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])  # as the bridge does: young collections every 700 allocations
    consumer = threading.Thread(target=collect, daemon=True)
    consumer.start()
    positioned.wait(60)
    time.sleep(0.5)  # the listener's first fetch is on its way
    # Encoded before the clock starts (JSON values, header lists): making the requests is not what is measured,
    # and this process shares the cores with the bridge, the broker and the server.
    records: list[Record] = [(encode_value(m.value), encode_key(m.key), encode_headers(m.headers)) for m in messages]
    keys = [m.key for m in messages]
    outcome: list[list[BaseException | None]] = []
    acked = threading.Event()

    def sent(errors: list[BaseException | None]) -> None:
        outcome.append(errors)
        if len(outcome) == len(chunks):
            acked.set()

    with Messenger(spec.request_topic, settings=settings) as producer:
        # Handed over in chunks, each reported once (a future per record cost this process more CPU than
        # kafka-python's own send): a burst's chunks go back to back, steady ones on the clock one record each.
        size = BURST_CHUNK if spec.mode == "burst" else 1
        chunks = [records[i:i + size] for i in range(0, len(records), size)]
        cpu_start = time.process_time()
        start = time.perf_counter()
        for n, chunk in enumerate(chunks):
            first = n * size
            if spec.mode == "steady":
                pause = start + first / spec.rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            handed, wall = time.perf_counter(), time.time()  # a latency counts from when its chunk was handed over
            for key in keys[first:first + size]:
                sent_at[key] = handed
                sent_wall[key] = wall
            producer.send_batch(chunk, sent)
        producer.flush(timeout_s=120)
        if not acked.wait(120):
            raise RuntimeError(f"only {len(outcome)} of {len(chunks)} sends were acknowledged")
        failed = [e for errors in outcome for e in errors if e is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} request(s) were not produced: {failed[0]!r}")
        produce_seconds = time.perf_counter() - start
    done.wait(spec.timeout_s)
    backend.close()
    end = max(received_at.values()) if received_at else time.perf_counter()
    latencies = np.asarray([1000.0 * (received_at[k] - sent_at[k]) for k in received_at if k in sent_at])
    if not len(latencies):
        latencies = np.asarray([float("nan")])
    legs = [(ts - 1000 * sent_wall[k], 1000 * got - ts) for k, (ts, got) in stamped.items() if k in sent_wall]
    to_result = result_hop = None
    if legs:
        split = np.percentile(np.asarray(legs), [50, 99], axis=0)
        to_result, result_hop = (tuple(round(float(v), 1) for v in split[:, i]) for i in (0, 1))
    return StreamResult(
        mode=spec.mode, count=spec.count, received=len(received_at), seconds=end - start,
        results_per_s=len(received_at) / (end - start), produce_seconds=produce_seconds,
        p50_ms=float(np.percentile(latencies, 50)), p90_ms=float(np.percentile(latencies, 90)),
        p99_ms=float(np.percentile(latencies, 99)), max_ms=float(np.max(latencies)),
        offered_rate=spec.rate if spec.mode == "steady" else None, cpu_s=time.process_time() - cpu_start,
        to_result_ms=to_result, result_hop_ms=result_hop)


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = StreamSpec(**json.load(f))
    print(json.dumps(asdict(run(spec))))


if __name__ == "__main__":
    main()
