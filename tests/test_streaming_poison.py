"""No message can stall a partition: poison between good messages, then a second bridge must replay nothing.

Real tansu broker, real model server, real bridge subprocesses. Each test puts messages that once
wedged the bridge for good (a merged call over the server's size limit, a result too large to
publish, a call that keeps exceeding its deadline, a failure while dead-lettering) between good
ones, checks that every good request got exactly one result and every poison exactly one dead
letter, stops the bridge with SIGTERM and starts a second one in the same group: it must consume
only the one fresh message sent after it started.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from streaming.bridge import Bridge
from streaming.messenger import Message, Messenger, PermanentSendError
from streaming.pubsub_backend import PubSubBackend
from streaming.settings import BridgeSettings, V2ClientSettings
from streaming.tensors import InferRequest, Tensor
from tests.fixtures.broker import REPO, KafkaBroker, collect, ids_of
from tests.fixtures.ports import free_port, wait_for
from tests.fixtures.server import TRAINED_MODELS, start_model_server

SETOSA = [5.1, 3.5, 1.4, 0.2]
# On tansu a second bridge joins its group after about session_timeout/2 (the fixtures use 6 s).


def row(rid: str) -> tuple[str, bytes, dict[str, str]]:
    return rid, json.dumps({"id": rid, "features": SETOSA, "true_label": 0}).encode(), {}


def noise_png(side: int, seed: int) -> bytes:
    """Incompressible grayscale noise: a PNG about side² bytes, which the image models still accept."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def send(broker: KafkaBroker, topic: str, items: list[tuple[str, bytes, dict[str, str]]]) -> None:
    with Messenger(topic, settings=broker.messenger_settings(max_request_size=4 * 1024 * 1024)) as m:
        for f in [m.send_async(value, key=key, headers=headers) for key, value, headers in items]:
            f.result(timeout=60)


def model_dir(tmp_path: Path, *models: str) -> Path:
    """A directory serving only ``models`` (links to the trained packages): quicker to load than all of them."""
    target = tmp_path / "-".join(models)
    target.mkdir()
    for name in models:
        (target / name).symlink_to(TRAINED_MODELS / name, target_is_directory=True)
    return target


def dead_letter_key(key: str) -> str:
    """The key a dead letter carries: the original, or its SHA-256 when over 256 bytes."""
    raw = key.encode()
    return key if len(raw) <= 256 else "sha256:" + hashlib.sha256(raw).hexdigest()


def poison_run(broker: KafkaBroker, bridges: Any, topics: dict[str, str], good: list[tuple[str, bytes, dict]],
               poison: dict[str, tuple[bytes, dict[str, str]]], *, env: dict[str, str] | None = None,
               fresh: Callable[[str], tuple[str, bytes, dict[str, str]]] = row,
               **bridge_args: Any) -> dict[str, Message]:
    """Good and poison messages interleaved; returns the dead letters by key after the replay check."""
    group = f"poison-{uuid.uuid4().hex[:6]}"
    first = bridges(topics, group=group, env=env, **bridge_args)
    items: list[tuple[str, bytes, dict[str, str]]] = []
    poisons = list(poison.items())
    for i, g in enumerate(good):
        items.append(g)
        if i < len(poisons):
            key, (value, headers) = poisons[i]
            items.append((key, value, headers))
    send(broker, topics["requests"], items)
    good_ids = {key for key, _, _ in good}
    results = collect(broker, topics["results"], until=lambda got: good_ids <= set(ids_of(got)), timeout=120)
    expected_dead = {dead_letter_key(k) for k in poison}
    dead = collect(broker, topics["dlq"], until=lambda got: expected_dead <= {m.key_str for m in got}, timeout=120)
    assert set(ids_of(results)) == good_ids, f"missing results: {sorted(good_ids - set(ids_of(results)))}"
    assert sorted(ids_of(results)) == sorted(good_ids), "every good request is answered once"
    dead_by_key = {m.key_str: m for m in dead}
    assert expected_dead <= set(dead_by_key), f"not dead-lettered: {sorted(expected_dead - set(dead_by_key))}"
    assert first.stop(signal.SIGTERM) == 0, first.log()[-3000:]

    second = bridges(topics, group=group, env=env, **bridge_args)
    last = f"fresh-{uuid.uuid4().hex[:6]}"
    send(broker, topics["requests"], [fresh(last)])
    assert last in ids_of(collect(broker, topics["results"], until=lambda got: last in ids_of(got), timeout=60))
    assert second.metric("kcp_bridge_consumed_total") == 1, "the second bridge replayed committed messages"
    answered = good_ids | {last}
    everything = collect(broker, topics["results"], until=lambda got: answered <= set(ids_of(got)), settle_s=1.0)
    assert sorted(ids_of(everything)) == sorted(answered), "no duplicates"
    dead_again = collect(broker, topics["dlq"], until=lambda got: len(got) >= len(poison), settle_s=1.0)
    assert len(dead_again) == len(poison), "one dead letter per poison message"
    return dead_by_key


def test_oversized_merged_call_is_split_and_a_request_too_big_alone_is_dead_lettered(
        kafka_broker, kafka_topics, bridges, tmp_path) -> None:
    """Sixteen images merge into a call over the server's gRPC limit (here 512 KiB); one image exceeds it alone."""
    t = kafka_topics(requests=1, results=1, dlq=1)
    limit = 512 * 1024
    headers = {"kcp-model": "mnist", "content-type": "image/png"}
    good = [(f"img-{i}", noise_png(250, i), headers) for i in range(16)]  # ~63 KB each, ~1 MB merged
    poison = {"img-huge": (noise_png(800, 99), headers)}  # ~640 KB on its own
    with start_model_server(model_dir(tmp_path, "mnist"), tmp_path,
                            extra_args=["--grpc_max_receive_message_length", str(limit)]) as server:
        dead = poison_run(kafka_broker, bridges, t, good, poison, grpc_target=server.grpc_target,
                          fresh=lambda key: (key, noise_png(250, 100), headers),
                          extra_args=["--max-batch-size", "16", "--max-batch-delay-ms", "200"])
    record = dead["img-huge"]
    assert record.header_str("kcp-dlq-kind") == "too-large" and record.header_str("kcp-dlq-status") == "413"
    assert record.value == poison["img-huge"][0], "a dead letter that fits keeps the payload byte for byte"


def test_results_and_dead_letters_too_large_to_publish_and_failures_while_finishing(
        kafka_broker, kafka_topics, bridges, model_server) -> None:
    """With a 4 KiB producer limit: a 150-row result, a 5,000-character id, lone surrogates in an id and in
    an input name (whose error text once crashed the dead-letter task)."""
    t = kafka_topics(requests=2, results=1, dlq=1)
    long_id = "x" * 5000
    many_rows = {"id": "many-rows", "model_name": "iris",
                 "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [150, 4], "data": SETOSA * 150}]}
    poison = {
        "many-rows": (json.dumps(many_rows).encode(), {}),
        long_id: (json.dumps({"id": long_id, "features": SETOSA}).encode(), {}),
        "surrogate-id": (b'{"id": "\\udc80", "features": [5.1, 3.5, 1.4, 0.2]}', {}),
        "surrogate-name": (b'{"id": "sn", "model_name": "iris", "inputs": [{"name": "\\ud800", "datatype": "FP32", '
                           b'"shape": "x", "data": [1]}]}', {}),
    }
    good = [row(f"good-{i}") for i in range(12)]
    dead = poison_run(kafka_broker, bridges, t, good, poison, env={"KCP_KAFKA_MAX_REQUEST_SIZE": "4096"},
                      grpc_target=model_server.grpc_target)
    big = dead["many-rows"]
    assert big.header_str("kcp-dlq-kind") == "unpublishable-result"
    assert "refused" in (big.header_str("kcp-dlq-reason") or "")
    cut = dead[dead_letter_key(long_id)]
    assert cut.header_str("kcp-dlq-kind") == "invalid-request"
    assert "5000 characters" in (cut.header_str("kcp-dlq-reason") or "")
    assert (cut.header_str("kcp-dlq-truncated") or "").startswith("value=")
    assert 0 < len(cut.value) < len(poison[long_id][0]) and poison[long_id][0].startswith(cut.value)
    assert dead["surrogate-id"].header_str("kcp-dlq-kind") == "invalid-request"
    assert dead["surrogate-name"].header_str("kcp-dlq-kind") == "invalid-request"


class _SlowImages(BaseHTTPRequestHandler):
    """Answers every GET after ``delay_s``: an image URL on a host slower than the bridge's deadline."""

    delay_s = 4.0

    def do_GET(self) -> None:
        time.sleep(self.delay_s)
        body = noise_png(28, 0)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def slow_site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowImages)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_call_that_keeps_exceeding_its_deadline_is_dead_lettered_alone(kafka_broker, kafka_topics, bridges,
                                                                       tmp_path, slow_site) -> None:
    t = kafka_topics(requests=1, results=1, dlq=1)
    slow = {"id": "slow", "model_name": "mnist",
            "inputs": [{"name": "input-0", "datatype": "BYTES", "shape": [1], "data": [f"{slow_site}/digit.png"]}]}
    with start_model_server(model_dir(tmp_path, "iris", "mnist"), tmp_path,
                            env={"KCP_URL_ALLOWED_NETWORKS": "127.0.0.1/32"}) as server:
        dead = poison_run(kafka_broker, bridges, t, [row(f"good-{i}") for i in range(6)],
                          {"slow": (json.dumps(slow).encode(), {})}, grpc_target=server.grpc_target,
                          env={"KCP_V2_TIMEOUT_S": "1", "KCP_V2_MAX_TIMEOUT_RETRIES": "1"})
    record = dead["slow"]
    assert record.header_str("kcp-dlq-kind") == "timeout" and record.header_str("kcp-dlq-status") == "504"
    assert "DEADLINE_EXCEEDED" in (record.header_str("kcp-dlq-reason") or "")


def test_pending_bytes_bound_what_the_bridge_holds_and_acks_1_warns(kafka_broker, kafka_topics, bridges) -> None:
    """Server down: requests wait in the bridge, but no more than ``--max-pending-bytes`` (+ one message)."""
    t = kafka_topics(requests=1, results=1, dlq=1)
    pad = "p" * 50_000
    items = [(f"pad-{i}", json.dumps({"id": f"pad-{i}", "features": SETOSA, "pad": pad}).encode(), {})
             for i in range(12)]
    bridge = bridges(t, group=f"bytes-{uuid.uuid4().hex[:6]}", grpc_target=f"127.0.0.1:{free_port()}",
                     extra_args=["--max-pending-bytes", "120000"], env={"KCP_KAFKA_ACKS": "1"})
    send(kafka_broker, t["requests"], items)
    wait_for(lambda: bridge.health()["pending"] >= 2, timeout=60, what="requests waiting for the server")
    time.sleep(2.0)  # several more polls: none may take more while the budget is spent
    health = bridge.health()
    assert health["pending"] == 3 and health["pending_bytes"] <= 120_000 + len(items[0][1]), health
    assert bridge.metric("kcp_bridge_consumed_total") == 3
    assert "KCP_KAFKA_ACKS=1" in bridge.log()


def test_acks_0_is_refused_at_start_up(kafka_broker) -> None:
    done = subprocess.run([sys.executable, "-m", "streaming", "bridge", "--health-port", "0"], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**kafka_broker.env(), "KCP_KAFKA_ACKS": "0", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and "KCP_KAFKA_ACKS=0" in done.stderr, done.stderr[-2000:]


def test_pubsub_attribute_limits_are_permanent_errors(pubsub_emulator) -> None:
    backend = PubSubBackend(pubsub_emulator.settings())
    topic = f"limits-{uuid.uuid4().hex[:6]}"
    try:
        backend.send(topic, b"{}", b"k", [("fine", b"v")]).result(timeout=30)  # the same path works within limits
        for headers in ([("long", b"v" * 1025)], [(f"h{i}", b"v") for i in range(100)], [("bin", b"\xff")]):
            with pytest.raises(PermanentSendError):
                backend.send(topic, b"{}", b"k", headers).result(timeout=30)
    finally:
        backend.close()


def test_merged_calls_stay_under_the_byte_cap() -> None:
    bridge = Bridge(BridgeSettings(v2=V2ClientSettings(max_call_bytes=10_000)))
    requests = [InferRequest("m", [Tensor("x", "BYTES", [1], [b"a" * size])]) for size in (4000, 4000, 4000, 12_000,
                                                                                            100, 100)]
    chunks = bridge._chunks(requests)
    assert [len(c) for c in chunks] == [2, 1, 1, 2]
    assert all(sum(r.payload_bytes() for r in c) <= 10_000 for c in chunks if len(c) > 1)
    assert [r for c in chunks for r in c] == requests, "order is kept"
