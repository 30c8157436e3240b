"""Hostile input against the bridge: one cheap message must never wedge, bloat or silently lose anything.

Real tansu broker, real model server, real bridge subprocesses. Each row of ``CASES`` is a message
(or a burst) that once made the bridge retry for ever or grow without bound; each run asserts the
outcome the bridge owes it -- a dead letter of the right kind within a bounded time, or a result --
then that the service continues (a following good message gets its result) and that nothing is
left behind (every consumed message finished, none pending). The two tests after the table cover
what does not fit its shape: a dead-letter topic that refuses everything (the message must stay
unacknowledged, readiness must drop) and the byte budget counted on decoded size.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition

from devtools.broker import EmbeddedBroker, tansu_binary
from devtools.broker import free_port as broker_port
from streaming.bridge import Bridge
from streaming.messenger import Message, Messenger
from streaming.settings import BridgeSettings, KafkaSettings, MessengerSettings, V2ClientSettings
from streaming.tensors import InferRequest, Tensor
from streaming.v2client import PerModelTransport, V2Error, make_transport, published_limit
from tests.fixtures.broker import KafkaBroker, collect, ids_of, launch_bridge
from tests.fixtures.ports import free_port, wait_for
from tests.fixtures.server import TRAINED_MODELS, ServerHandle, start_model_server

SETOSA = [5.1, 3.5, 1.4, 0.2]
Item = tuple[str, bytes, dict[str, str]]


def v2(rid: str, rows: int, model: str = "iris") -> Item:
    doc = {"id": rid, "model_name": model,
           "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [rows, 4], "data": SETOSA * rows}]}
    return rid, json.dumps(doc).encode(), {}


def row(rid: str, model: str = "iris") -> Item:
    return rid, json.dumps({"id": rid, "features": SETOSA}).encode(), {"kcp-model": model}


def send(broker_settings: MessengerSettings, topic: str, items: list[Item]) -> None:
    with Messenger(topic, settings=broker_settings) as m:
        for f in [m.send_async(value, key=key, headers=headers) for key, value, headers in items]:
            f.result(timeout=60)


class _SlowImages(BaseHTTPRequestHandler):
    """Answers nothing for far longer than any deadline the tests set: an image URL on a stuck host."""

    def do_GET(self) -> None:
        time.sleep(30)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """``iris``, ``mnist`` (image URLs from loopback allowed) and ``localhost``: iris again under a name that
    resolves, so per-model routing (``{model}:port``) reaches this server for it and for nothing else."""
    tmp = tmp_path_factory.mktemp("hostile-server")
    models = tmp / "models"
    models.mkdir()
    for name in ("iris", "mnist"):
        (models / name).symlink_to(TRAINED_MODELS / name, target_is_directory=True)
    shutil.copytree(TRAINED_MODELS / "iris", models / "localhost")
    config = json.loads((models / "localhost" / "config.json").read_text())
    config["name"] = "localhost"
    (models / "localhost" / "config.json").write_text(json.dumps(config))
    # the server's own fetch limits far above the bridge's deadline in the deadline case, so that deadline decides
    env = {"KCP_URL_ALLOWED_NETWORKS": "127.0.0.1/32", "KCP_URL_TIMEOUT_S": "25", "KCP_URL_DEADLINE_S": "25"}
    with start_model_server(models, tmp, env=env) as handle:
        yield handle


@dataclass
class Case:
    """Hostile messages, the dead letters they must become within ``bound_s``, then good messages."""

    name: str
    hostile: Callable[[str], list[Item]]
    dead: dict[str, tuple[str, str]]  # key -> (kcp-dlq-kind, kcp-dlq-status)
    good: list[Item] = field(default_factory=lambda: [row("after-1"), row("after-2")])
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    per_model: bool = False
    protocol: str = "grpc"
    bound_s: float = 20.0
    check: Callable[[dict[str, float], list[Message], str], None] | None = None


def _merged_never_past_the_limit(metrics: dict[str, float], results: list[Message], log: str) -> None:
    assert {m.key_str for m in results} >= {f"small-{i}" for i in range(64)}
    merged = metrics.get('kcp_bridge_batch_size_count', 0) - metrics.get('kcp_bridge_batch_size_bucket{le="1.0"}', 0)
    assert merged >= 2, f"the burst was merged (into calls of at most 256 rows): {metrics}"
    assert "retrying one by one" not in log, "no merged call went past the limit and was refused"


def _labels_bounded(metrics: dict[str, float], results: list[Message], log: str) -> None:
    labels = {k.split('model="', 1)[1].split('"', 1)[0] for k in metrics
              if k.startswith("kcp_bridge_v2_call_seconds_count{")}
    assert labels <= {"iris", "other"} and "other" in labels, labels
    assert all(len(k) < 200 for k in metrics), "no label carries a message's model string"


CASES = [
    Case("one message over the model's batch limit",
         lambda site: [v2("rows-300", 300)], {"rows-300": ("too-large", "413")}),
    Case("64 small messages merged past the batch limit",
         lambda site: [v2(f"small-{i}", 5) for i in range(64)], {},
         good=[row("after-1")], args=["--max-batch-delay-ms", "300"], check=_merged_never_past_the_limit),
    Case("unroutable model under per-model routing",
         lambda site: [row("nowhere", model="no-such-model-kcp")], {"nowhere": ("rejected", "404")},
         good=[row("after-1", model="localhost")], per_model=True),
    Case("unroutable model under per-model routing over REST",
         lambda site: [row("nowhere", model="no-such-model-kcp")], {"nowhere": ("rejected", "404")},
         good=[row("after-1", model="localhost")], per_model=True, protocol="rest"),
    Case("overall message deadline",
         lambda site: [("stuck", json.dumps({"id": "stuck", "model_name": "mnist", "inputs": [
             {"name": "input-0", "datatype": "BYTES", "shape": [1], "data": [f"{site}/digit.png"]}]}).encode(), {})],
         {"stuck": ("deadline", "504")}, args=["--message-deadline", "3"]),
    Case("arbitrary model strings as metric labels",
         lambda site: [row(f"label-{n}", model=f"m-{uuid.uuid4().hex}-" + "x" * n) for n in (10, 300, 3000)],
         {f"label-{n}": ("rejected", "404") for n in (10, 300, 3000)}, check=_labels_bounded),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace(" ", "-") for c in CASES])
def test_hostile_message_is_dead_lettered_in_bounded_time_and_service_continues(
        case: Case, kafka_broker: KafkaBroker, kafka_topics: Callable[..., dict[str, str]], bridges: Any,
        server: ServerHandle, slow_site: str) -> None:
    t = kafka_topics(requests=1, results=1, dlq=1)
    if case.protocol == "rest":
        address = {"rest_url": f"http://{{model}}:{server.http_port}" if case.per_model else server.http_url}
    else:
        address = {"grpc_target": f"{{model}}:{server.grpc_port}" if case.per_model else server.grpc_target}
    bridge = bridges(t, group=f"hostile-{uuid.uuid4().hex[:6]}", protocol=case.protocol, env=case.env,
                     extra_args=case.args, **address)
    settings = kafka_broker.messenger_settings(max_request_size=4 * 1024 * 1024)
    hostile = case.hostile(slow_site)
    started = time.monotonic()
    send(settings, t["requests"], hostile)
    dead = collect(kafka_broker, t["dlq"], until=lambda got: set(case.dead) <= set(ids_of(got)), timeout=case.bound_s)
    elapsed = time.monotonic() - started
    by_key = {m.key_str: m for m in dead}
    assert set(case.dead) <= set(by_key), f"not dead-lettered within {case.bound_s}s: {set(case.dead) - set(by_key)}"
    for key, (kind, status) in case.dead.items():
        record = by_key[key]
        assert (record.header_str("kcp-dlq-kind"), record.header_str("kcp-dlq-status")) == (kind, status), \
            record.header_str("kcp-dlq-reason")
    assert elapsed < case.bound_s

    send(settings, t["requests"], case.good)
    expected = {k for k, _, _ in hostile if k not in case.dead} | {k for k, _, _ in case.good}
    results = collect(kafka_broker, t["results"], until=lambda got: expected <= set(ids_of(got)), timeout=30)
    assert sorted(ids_of(results)) == sorted(expected), "every other message answered exactly once"
    total = len(hostile) + len(case.good)
    wait_for(lambda: bridge.health()["pending"] == 0, timeout=10, what="nothing left pending")
    metrics = bridge.metrics()
    assert metrics["kcp_bridge_consumed_total"] == total
    assert httpx.get(f"{bridge.url}/readyz", timeout=2).status_code == 200
    if case.check is not None:
        case.check(metrics, results, bridge.log())
    assert bridge.stop(signal.SIGTERM) == 0, bridge.log()[-3000:]


# --- a dead-letter topic that refuses every record -------------------------------------------------


@pytest.fixture
def refusing_broker(tmp_path: Path) -> Iterator[tuple[KafkaBroker, dict[str, str], Path]]:
    """A tansu broker whose schema registry makes the dead-letter topic refuse every record (as a broker
    denying the bridge's writes to it would): requests and results go through, dead letters never."""
    suffix = uuid.uuid4().hex[:6]
    topics = {"requests": f"refuse-req-{suffix}", "results": f"refuse-res-{suffix}", "dlq": f"refuse-dlq-{suffix}"}
    registry = tmp_path / "schemas"
    registry.mkdir()
    (registry / f"{topics['dlq']}.json").write_text(json.dumps(
        {"type": "object", "properties": {"value": {"type": "object", "required": ["never-present"]}}}))
    port = broker_port()
    url = f"tcp://127.0.0.1:{port}"
    with open(tmp_path / "tansu.log", "wb") as log:
        process = subprocess.Popen([tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                    "--storage-engine", "memory://tansu/", "--schema-registry", "file://./schemas"],
                                   cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        broker = EmbeddedBroker(port=port)
        broker.process = process
        wait_for(lambda: _answers(f"127.0.0.1:{port}"), timeout=30, what="tansu with a schema registry")
        handle = KafkaBroker(broker)
        handle.create_topics({topics["requests"]: 1, topics["results"]: 1, topics["dlq"]: 1})
        yield handle, topics, registry
    finally:
        process.terminate()
        process.wait(timeout=10)


def _answers(bootstrap: str) -> bool:
    try:
        with Messenger("probe", settings=MessengerSettings(kafka=KafkaSettings(bootstrap_servers=bootstrap,
                                                                               max_block_ms=2000))) as m:
            m.send(b"{}", key="probe")
        return True
    except Exception:
        return False


def committed(broker: KafkaBroker, group: str, topic: str) -> int | None:
    """The group's committed offset of partition 0 (read without joining the group)."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=group, enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic, 0))
    finally:
        consumer.close()


def test_a_refused_dead_letter_leaves_the_message_unacknowledged_and_the_bridge_not_ready(
        refusing_broker: tuple[KafkaBroker, dict[str, str], Path], server: ServerHandle, tmp_path: Path) -> None:
    broker, t, registry = refusing_broker
    group = f"refused-{uuid.uuid4().hex[:6]}"
    env = {**broker.env(), "KCP_BRIDGE_DEAD_LETTER_TIMEOUT_S": "2"}
    bridge = launch_bridge(env, t, tmp_path, group=group, grpc_target=server.grpc_target)
    try:
        settings = broker.messenger_settings()
        send(settings, t["requests"], [("bad", b"{not json", {})])
        started = time.monotonic()
        wait_for(lambda: bridge.health()["stranded"] == 1, timeout=30, what="the message stranded")
        assert time.monotonic() - started < 30
        assert bridge.health()["status"] == "failing"
        assert httpx.get(f"{bridge.url}/readyz", timeout=2).status_code == 503
        assert bridge.metric("kcp_bridge_stranded") == 1 and bridge.metric("kcp_bridge_dead_lettered_total") == 0
        assert "left unacknowledged" in bridge.log()

        send(settings, t["requests"], [row("after-1")])
        results = collect(broker, t["results"], until=lambda got: "after-1" in ids_of(got), timeout=30)
        assert "after-1" in ids_of(results), "the service continues beside the stranded message"
        time.sleep(1.0)  # several commit intervals
        assert committed(broker, group, t["requests"]) in (None, 0), "nothing at or after the stranded one committed"

        # The broker changes its mind (here: the schema that refused everything is gone): the stranded dead
        # letter is taken on a later try, the message acknowledged, and the bridge ready again.
        (registry / f"{t['dlq']}.json").unlink()
        wait_for(lambda: bridge.health()["stranded"] == 0, timeout=60, what="the stranded dead letter taken")
        assert httpx.get(f"{bridge.url}/readyz", timeout=2).status_code == 200
        wait_for(lambda: committed(broker, group, t["requests"]) == 2, timeout=30, what="both offsets committed")
        dead = collect(broker, t["dlq"], until=lambda got: "bad" in ids_of(got), timeout=30)
        assert [m.header_str("kcp-dlq-kind") for m in dead] == ["internal"]
        assert bridge.stop(signal.SIGTERM) == 0, bridge.log()[-3000:]
    finally:
        bridge.stop(signal.SIGKILL)


# --- the byte budget counts what a decoded message keeps alive -------------------------------------


def test_the_pending_byte_budget_counts_decoded_size(kafka_broker: KafkaBroker,
                                                     kafka_topics: Callable[..., dict[str, str]], bridges: Any) -> None:
    """Server down, messages of JSON numbers (a few bytes each raw, tens of bytes each decoded): the bridge holds
    no more than its budget of decoded size, where counting raw bytes would let it hold several times that."""
    t = kafka_topics(requests=1, results=1, dlq=1)
    budget = 2_000_000
    rows = 6000  # about 100 KB of JSON, over 700 KB decoded
    items = [v2(f"numbers-{i}", rows) for i in range(12)]
    raw = len(items[0][1])
    decoded = raw + 32 * 4 * rows
    bridge = bridges(t, group=f"budget-{uuid.uuid4().hex[:6]}", grpc_target=f"127.0.0.1:{free_port()}",
                     extra_args=["--max-pending-bytes", str(budget)])
    send(kafka_broker.messenger_settings(max_request_size=4 * 1024 * 1024), t["requests"], items)
    wait_for(lambda: bridge.health()["pending"] >= 2, timeout=60, what="requests waiting for the server")
    time.sleep(2.0)  # several more polls: none may take more while the budget is spent
    health = bridge.health()
    assert health["pending_bytes"] <= budget + decoded, health
    assert health["pending"] <= budget // decoded + 1, health
    assert health["pending_bytes"] >= health["pending"] * decoded * 0.9, "the count is decoded size, not raw bytes"


# --- the bounds themselves, on the real client objects ----------------------------------------------


def test_per_model_routes_are_checked_bounded_and_evicted() -> None:
    """A name that does not resolve is refused after ``route_checks`` look-ups, then at once while remembered;
    transports stay within ``max_transports``, the evicted ones closed once their calls could have finished."""
    settings = V2ClientSettings(grpc_target="{model}:1", route_checks=2, retry_initial_s=0.05, max_transports=3,
                                timeout_s=0.2)
    transport = make_transport(settings)
    assert isinstance(transport, PerModelTransport)

    async def scenario() -> None:
        request = InferRequest("no-such-model-kcp", [Tensor("input-0", "FP32", [1, 4], SETOSA)])
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(V2Error) as refused:
                await transport.infer(request)
            assert (refused.value.kind, refused.value.status) == ("rejected", 404), refused.value
            assert "not routable" in str(refused.value) and time.monotonic() - started < 5
        evicted = [transport._for(f"m{i}") for i in range(10)][:7]
        assert len(transport._transports) == 3 and list(transport._transports) == ["m7", "m8", "m9"]
        evicted[0]._ensure()  # a channel opened by a call still running when it was evicted
        assert evicted[0]._channel is not None
        await asyncio.sleep(0.5)
        assert evicted[0]._channel is None, "an evicted transport is closed"
        await transport.close()

    asyncio.run(scenario())


def test_row_limits_cap_merged_calls_and_come_from_published_metadata() -> None:
    bridge = Bridge(BridgeSettings())
    requests = [InferRequest("iris", [Tensor("input-0", "FP32", [5, 4], SETOSA * 5)]) for _ in range(64)]
    chunks = bridge._chunks(requests, 256)
    assert [sum(r.rows for r in c) for c in chunks] == [255, 65]
    assert published_limit({"parameters": {"max_batch_size": 32}}) == 32
    assert published_limit({"properties": {"max_batch_size": "16"}}) == 16
    assert published_limit({"parameters": {"max_batch_size": {"int64_param": 8}}}) == 8
    for unpublished in ({}, {"parameters": {"max_batch_size": "many"}}, {"properties": {"max_batch_size": "0"}}):
        assert published_limit(unpublished) is None
