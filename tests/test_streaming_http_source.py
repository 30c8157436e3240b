"""The bridge behind a Knative KafkaSource (``--source http``): one contract with the Deployment bridge.

Real parts on 127.0.0.1: the tansu broker, the model server, two bridge subprocesses (one consuming the request
topic itself, one receiving CloudEvents over HTTP). Each record is produced to Kafka, read back with its partition
and offset, and POSTed the way a KafkaSource delivers it (:func:`kafkasource_delivery`, after eventing-kafka-broker's
dispatcher); the results and dead letters are then compared with what the Deployment bridge wrote for the same
message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cloudevents.http import CloudEvent as SdkEvent
from cloudevents.kafka import to_binary, to_structured

from devtools.images import load_test_images, png_bytes
from streaming.cloudevents import CloudEventError, from_kafka
from streaming.http_source import HttpSource, NotADelivery, to_message
from streaming.messenger import Message, Messenger
from tests.fixtures.broker import BridgeProcess, KafkaBroker, collect, launch_bridge
from tests.fixtures.ports import free_port
from tests.fixtures.server import ServerHandle, serve_on

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]
NAMESPACE, SOURCE_NAME = "kcp", "kcp-requests"
BODY_LIMIT = 256 * 1024


# --- what a KafkaSource sends -------------------------------------------------------------------


def _mangle(name: str) -> str:
    return "".join(c for c in name.lower() if c.isascii() and (c.isalnum()))


def kafkasource_delivery(record: Message) -> tuple[list[tuple[str, str]], bytes]:
    """The HTTP headers and body a KafkaSource's dispatcher POSTs for ``record`` (binary mode).

    A record that is a valid CloudEvent goes as that event; any other is wrapped in one made of its topic,
    partition, offset, key and headers (eventing-kafka-broker's InvalidCloudEventInterceptor)."""
    try:
        event = from_kafka(record.headers, record.value)
    except CloudEventError:
        event = None
    if event is not None:
        headers = [(f"ce-{name}", quote(value, safe=" !#$&'()*+,/:;<=>?@[]^_`{|}~-.")) for name, value in
                   event.attributes().items() if name != "datacontenttype"]
        if event.datacontenttype:
            headers.append(("content-type", event.datacontenttype))
        return headers, event.data or b""
    stamp = datetime.fromtimestamp((record.timestamp_ms or 0) / 1000, UTC).isoformat().replace("+00:00", "Z")
    headers = [("ce-specversion", "1.0"), ("ce-id", f"partition:{record.partition}/offset:{record.offset}"),
               ("ce-source", f"/apis/v1/namespaces/{NAMESPACE}/kafkasources/{SOURCE_NAME}#{record.topic}"),
               ("ce-type", "dev.knative.kafka.event"), ("ce-subject", f"partition:{record.partition}#{record.offset}"),
               ("ce-time", stamp)]
    if record.key is not None:
        headers += [("ce-partitionkey", record.key.decode()), ("ce-key", record.key.decode())]
    for name, value in record.headers:
        if name.lower() == "content-type":
            headers.append(("content-type", value.decode().lower()))
        else:
            headers.append((f"ce-kafkaheader{_mangle(name)}", quote(value.decode(), safe="")))
    return headers, record.value


@dataclass
class Receiver:
    bridge: BridgeProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def deliver(self, record: Message, timeout: float = 60.0) -> httpx.Response:
        headers, body = kafkasource_delivery(record)
        return httpx.post(self.url, headers=headers, content=body, timeout=timeout)


def start_receiver(broker: KafkaBroker, topics: dict[str, str], tmp: Any, *, grpc_target: str,
                   extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> Receiver:
    port = free_port()
    handle = launch_bridge(broker.env(), topics, tmp, group="unused", grpc_target=grpc_target,
                           extra_args=["--source", "http", "--http-port", str(port), *(extra_args or [])], env=env)
    return Receiver(handle, port)


# --- fixtures ------------------------------------------------------------------------------------


def make_topics(broker: KafkaBroker, stem: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:6]
    names = {"requests": f"{stem}-req-{suffix}", "results": f"{stem}-res-{suffix}", "dlq": f"{stem}-dlq-{suffix}"}
    broker.create_topics({names["requests"]: 2, names["results"]: 2, names["dlq"]: 1})
    return names


@pytest.fixture(scope="module")
def consumed(kafka_broker: KafkaBroker, model_server: ServerHandle,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], BridgeProcess]]:
    """The Deployment bridge: it consumes its own request topic."""
    topics = make_topics(kafka_broker, "dep")
    handle = launch_bridge(kafka_broker.env(), topics, tmp_path_factory.mktemp("dep"),
                           group=f"dep-{uuid.uuid4().hex[:6]}", grpc_target=model_server.grpc_target)
    yield topics, handle
    assert handle.stop() == 0, handle.log()[-3000:]


@pytest.fixture(scope="module")
def pushed(kafka_broker: KafkaBroker, model_server: ServerHandle,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Receiver]]:
    """The bridge as a Knative sink: records of its request topic reach it only as HTTP deliveries."""
    topics = make_topics(kafka_broker, "push")
    receiver = start_receiver(kafka_broker, topics, tmp_path_factory.mktemp("push"),
                              grpc_target=model_server.grpc_target, extra_args=["--max-pending", "64"],
                              env={"KCP_BRIDGE_HTTP_MAX_BODY_BYTES": str(BODY_LIMIT)})
    yield topics, receiver
    assert receiver.bridge.stop() == 0, receiver.bridge.log()[-3000:]


def produce_and_read_back(broker: KafkaBroker, topic: str,
                          records: list[tuple[Any, str, dict[str, str] | list[tuple[str, bytes]]]]) -> list[Message]:
    """Produce ``(value, key, headers)`` records and read them back as stored (with partition and offset)."""
    with Messenger(topic, settings=broker.messenger_settings()) as m:
        for value, key, headers in records:
            m.send(value, key=key, headers=headers)
    keys = {key for _, key, _ in records}
    stored = collect(broker, topic, until=lambda got: keys <= {r.key_str for r in got})
    return [r for r in stored if r.key_str in keys]


def wait_keys(broker: KafkaBroker, topic: str, keys: set[str]) -> dict[str, Message]:
    found = collect(broker, topic, until=lambda got: keys <= {m.key_str for m in got})
    out = {m.key_str: m for m in found if m.key_str in keys}
    assert set(out) == keys, f"missing {sorted(keys - set(out))}"
    return out  # type: ignore[return-value]


def deliver_all(receiver: Receiver, records: list[Message]) -> list[httpx.Response]:
    with ThreadPoolExecutor(8) as pool:  # concurrent, as an unordered KafkaSource delivers
        return list(pool.map(receiver.deliver, records))


# --- unit: a delivery back to its record ---------------------------------------------------------


def test_a_wrapped_record_is_unwrapped_to_the_record_the_consumer_would_see() -> None:
    record = Message("reqs", b'{"features": [1, 2, 3, 4]}', b"k-1", [("kcp-model", b"iris"), ("origin", b"x"),
                                                                      ("content-type", b"application/json")],
                     partition=1, offset=42, timestamp_ms=1_700_000_000_000)
    headers, body = kafkasource_delivery(record)
    message = to_message([(k, v.encode()) for k, v in headers], body, "configured-topic")
    assert (message.topic, message.partition, message.offset, message.key) == ("reqs", 1, 42, b"k-1")
    assert message.position == "reqs/1/42" and message.value == record.value
    assert message.header_str("kcp-model") == "iris" and message.header_str("origin") == "x"
    assert message.header_str("content-type") == "application/json"
    assert message.timestamp_ms == 1_700_000_000_000


def test_a_cloudevent_record_keeps_its_attributes_and_gets_a_stable_position() -> None:
    headers = [("ce-specversion", b"1.0"), ("ce-id", b"e-1"), ("ce-source", b"/shop"), ("ce-type", b"t"),
               ("ce-model", b"iris"), ("ce-note", b"caf%C3%A9"), ("Content-Type", b"application/json")]
    message = to_message(headers, b"[1, 2, 3, 4]", "reqs")
    assert message.position == "reqs//shop#e-1" and message.partition is None
    assert message.header_str("ce_id") == "e-1" and message.header_str("ce_note") == "café"
    assert message.header_str("content-type") == "application/json"
    structured = json.dumps({"specversion": "1.0", "id": "s-1", "source": "/s", "type": "t",
                             "data": {"features": SETOSA}}).encode()
    message = to_message([("content-type", b"application/cloudevents+json")], structured, "reqs")
    assert json.loads(message.value) == {"features": SETOSA} and message.header_str("ce_id") == "s-1"


@pytest.mark.parametrize("headers", [
    [("content-type", b"application/json")],  # a plain POST: not a CloudEvent
    [("ce-specversion", b"1.0"), ("ce-source", b"/s"), ("ce-type", b"t")],  # no id
    [("ce-specversion", b"0.3"), ("ce-id", b"1"), ("ce-source", b"/s"), ("ce-type", b"t")],
    [("content-type", b"application/cloudevents+json")],  # structured, but the body is no event
])
def test_what_is_not_a_cloudevent_delivery_is_refused(headers: list[tuple[str, bytes]]) -> None:
    with pytest.raises(NotADelivery):
        to_message(headers, b"{", "reqs")


# --- the receiver alone: its bounds, on a real socket -------------------------------------------


@contextlib.contextmanager
def receiver_alone(**bounds: Any) -> Iterator[tuple[HttpSource, int]]:
    """An :class:`HttpSource` on its own event loop thread, with short timeouts; the test plays the bridge."""
    loop = asyncio.new_event_loop()
    source = HttpSource("reqs", "127.0.0.1", 0, **{"max_body_bytes": 4096, "max_held": 2, "max_held_bytes": 100_000,
                                                   "header_timeout_s": 0.5, "body_timeout_s": 0.5, **bounds})
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    port = asyncio.run_coroutine_threadsafe(source.start(), loop).result(5)
    try:
        yield source, port
    finally:
        asyncio.run_coroutine_threadsafe(source.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def wrapped(offset: int) -> tuple[dict[str, str], bytes]:
    headers, body = kafkasource_delivery(Message("reqs", b'{"features": [1, 2, 3, 4]}', f"k{offset}".encode(),
                                                 partition=0, offset=offset, timestamp_ms=0))
    return dict(headers), body


def test_slow_clients_get_408_and_idle_connections_close() -> None:
    with receiver_alone() as (_, port):
        started = time.monotonic()
        slow_head = raw_exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nce-specversion: 1.0\r\n")
        assert slow_head.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5
        slow_body = raw_exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert slow_body.startswith(b"HTTP/1.1 408")
        assert raw_exchange(port, b"") == b"", "an idle connection is closed without an answer"


def test_the_receiver_holds_at_most_its_bound_and_answers_what_the_bridge_decides() -> None:
    with ThreadPoolExecutor(4) as pool, receiver_alone() as (source, port):  # the receiver closes first
        url = f"http://127.0.0.1:{port}/"
        posts = [pool.submit(httpx.post, url, headers=h, content=b, timeout=30) for h, b in map(wrapped, (1, 2))]
        time.sleep(0.5)
        headers, body = wrapped(3)
        full = httpx.post(url, headers=headers, content=body, timeout=5)
        assert full.status_code == 429 and full.headers["retry-after"] == "1"
        taken = source.poll(1.0, 10)
        assert sorted(m.position for m in taken) == ["reqs/0/1", "reqs/0/2"] and source.poll(0.1, 10) == []
        first, second = sorted(taken, key=lambda m: m.position)
        source.ack(first)
        source.refuse(second, "the model server is unavailable")
        answers = [p.result(10) for p in posts]
        assert [a.status_code for a in answers] == [200, 503]
        assert answers[0].json()["position"] == "reqs/0/1" and "unavailable" in answers[1].json()["error"]
        headers, body = wrapped(4)
        late = pool.submit(httpx.post, url, headers=headers, content=body, timeout=30)
        time.sleep(0.3)
    assert late.result(10).status_code == 503, "stopping: what was not answered is handed back"


# --- end to end ----------------------------------------------------------------------------------


def accepted_forms(run: str) -> list[tuple[Any, str, Any]]:
    """One record of every accepted message form: (value, key, headers)."""
    x, y = load_test_images("fashion-mnist")
    digits, _ = load_test_images("mnist")
    event = SdkEvent({"type": "com.example.iris", "source": "/producer", "id": f"{run}-ce",
                      "datacontenttype": "application/json",
                      "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
                     {"features": VIRGINICA, "true_label": 2})
    binary = to_binary(event, key_mapper=lambda e: e["id"])
    structured = to_structured(SdkEvent({"type": "t", "source": "/producer", "id": f"{run}-ces"},
                                        {"features": SETOSA}), key_mapper=lambda e: e["id"])
    mnist = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 28, 28],
                         "data": (digits[:1] / 255.0).ravel().tolist()}]}
    return [
        ({"id": f"{run}-row", "sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2,
          "label": 0, "label_name": "setosa"}, f"{run}-row", {}),
        ({"features": VIRGINICA, "true_label": 2}, f"{run}-keyed", {"kcp-correlation-id": f"{run}-corr"}),
        (SETOSA, f"{run}-list", {}),
        ({"model_name": "iris", "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                                            "data": SETOSA}]}, f"{run}-v2", {}),
        (mnist, f"{run}-v2-header", {"kcp-model": "mnist"}),
        ({"image_id": f"{run}-image", "image_b64": base64.b64encode(png_bytes(x[0])).decode(),
          "model": "fashion-mnist", "true_label": int(y[0])}, f"{run}-image", {}),
        (png_bytes(digits[1]), f"{run}-png", {"kcp-model": "mnist", "content-type": "image/png"}),
        (binary.value, binary.key, list(binary.headers.items())),
        (structured.value, structured.key, [("content-type", b"application/cloudevents+json")]),
    ]


def without_prediction_ids(doc: dict[str, Any], rid: str) -> dict[str, Any]:
    """A result without its prediction ids, which the server makes new for every prediction."""
    for output in doc["outputs"]:
        if output["name"] == "prediction_id":
            assert len(output["data"]) == 1 and output["data"][0], (rid, output)
            output["data"] = ["..."]
    return doc


def test_every_form_gets_the_result_the_deployment_bridge_writes(kafka_broker, consumed, pushed) -> None:
    (dep_topics, _), (topics, receiver) = consumed, pushed
    run = uuid.uuid4().hex[:6]
    forms = accepted_forms(run)
    with Messenger(dep_topics["requests"], settings=kafka_broker.messenger_settings()) as m:
        for value, key, headers in forms:
            m.send(value, key=key, headers=headers)
    records = produce_and_read_back(kafka_broker, topics["requests"], forms)
    answers = deliver_all(receiver, records)
    assert [a.status_code for a in answers] == [200] * len(records), [a.text for a in answers]

    ids = {r.key_str or "" for r in records}
    expected = wait_keys(kafka_broker, dep_topics["results"], ids)
    got = wait_keys(kafka_broker, topics["results"], ids)
    by_key = {r.key_str: r for r in records}
    for rid in ids:
        mine, theirs = got[rid].json(), expected[rid].json()
        record = by_key[rid]
        source = mine.pop("source")
        theirs.pop("source")
        assert without_prediction_ids(mine, rid) == without_prediction_ids(theirs, rid), rid
        if record.header("ce_specversion") is None and record.header("content-type") != b"application/cloudevents+json":
            assert source == {"topic": topics["requests"], "partition": record.partition, "offset": record.offset,
                              "position": f"{topics['requests']}/{record.partition}/{record.offset}"}
        else:  # a KafkaSource delivers an event without the record's partition and offset
            assert source["topic"] == topics["requests"] and source["partition"] is None
        assert [k for k, _ in got[rid].headers] == [k for k, _ in expected[rid].headers], rid
        assert {k: v for k, v in got[rid].headers if k != "ce_time"} == \
            {k: v for k, v in expected[rid].headers if k != "ce_time"}, rid
    assert got[f"{run}-keyed"].header_str("kcp-correlation-id") == f"{run}-corr"
    assert got[f"{run}-ce"].header_str("ce_traceparent") == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


BAD = {
    "bytes": (b"\xff\xfe\x00\x01garbage", "undecodable", None),
    "json": (b'{"inputs": [', "invalid-json", None),
    "form": (b'{"hello": "world"}', "invalid-request", None),
    "model": (json.dumps({"model_name": "no-such-model", "inputs": [{"name": "input-0", "datatype": "FP32",
                                                                      "shape": [1, 4], "data": SETOSA}]}).encode(),
              "rejected", "404"),
    "shape": (json.dumps({"model_name": "iris", "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 3],
                                                             "data": [1.0, 2.0, 3.0]}]}).encode(), "rejected", "400"),
}


def test_bad_messages_get_the_same_dead_letter_and_a_2xx(kafka_broker, pushed) -> None:
    topics, receiver = pushed
    run = uuid.uuid4().hex[:6]
    records = produce_and_read_back(kafka_broker, topics["requests"],
                                    [(value, f"{run}-{name}", {"origin": f"test-{name}"})
                                     for name, (value, _, _) in BAD.items()])
    answers = deliver_all(receiver, records)
    assert [a.status_code for a in answers] == [200] * len(BAD), "a bad message is finished, not retried"
    dead = wait_keys(kafka_broker, topics["dlq"], {f"{run}-{name}" for name in BAD})
    for record in records:
        name = (record.key_str or "").removeprefix(f"{run}-")
        value, kind, status = BAD[name]
        letter = dead[record.key_str or ""]
        assert letter.value == value, "the original payload is kept byte for byte"
        assert letter.header_str("origin") == f"test-{name}", "the original headers are kept"
        assert letter.header_str("kcp-dlq-kind") == kind and letter.header_str("kcp-dlq-status") == status
        assert letter.header_str("kcp-dlq-source-topic") == topics["requests"]
        assert letter.header_str("kcp-dlq-source-partition") == str(record.partition)
        assert letter.header_str("kcp-dlq-source-offset") == str(record.offset)
        assert letter.header_str("kcp-dlq-position") == f"{topics['requests']}/{record.partition}/{record.offset}"
    results = collect(kafka_broker, topics["results"], until=lambda got: False, timeout=0.5)
    assert not {f"{run}-{name}" for name in BAD} & {m.key_str for m in results}


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_what_is_not_a_delivery_gets_a_clear_4xx_and_changes_nothing(pushed, kafka_broker) -> None:
    topics, receiver = pushed
    before = receiver.bridge.metric("kcp_bridge_consumed_total")
    assert httpx.get(receiver.url, timeout=5).status_code == 405
    assert httpx.post(receiver.url + "v2/models/iris/infer", json={}, timeout=5).status_code == 404
    plain = httpx.post(receiver.url, json={"features": SETOSA}, timeout=5)
    assert plain.status_code == 400 and "not a CloudEvent" in plain.json()["error"]
    no_id = httpx.post(receiver.url, headers={"ce-specversion": "1.0", "ce-source": "/s", "ce-type": "t"},
                       content=b"[1]", timeout=5)
    assert no_id.status_code == 400 and "id" in no_id.json()["error"]
    big = raw_exchange(receiver.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n"
                                      b"ce-specversion: 1.0\r\n\r\n")
    assert big.startswith(b"HTTP/1.1 413")
    chunked_big = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + \
        b"".join(b"10000\r\n" + b"x" * 0x10000 + b"\r\n" for _ in range(BODY_LIMIT // 0x10000 + 1))
    assert raw_exchange(receiver.port, chunked_big + b"0\r\n\r\n").startswith(b"HTTP/1.1 413")
    assert raw_exchange(receiver.port, b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge_head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw_exchange(receiver.port, huge_head)[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400")
    assert receiver.bridge.metric("kcp_bridge_consumed_total") == before, "nothing was taken"
    # and the receiver still works
    key = f"ok-{uuid.uuid4().hex[:6]}"
    record = produce_and_read_back(kafka_broker, topics["requests"], [({"features": SETOSA}, key, {})])[0]
    assert receiver.deliver(record).status_code == 200


def test_outage_answers_503_then_a_redelivery_succeeds_with_the_api_key(kafka_broker, tmp_path) -> None:
    topics = make_topics(kafka_broker, "outage")
    http_port, grpc_port = free_port(), free_port()
    key = f"key-{uuid.uuid4().hex[:6]}"
    receiver = start_receiver(kafka_broker, topics, tmp_path, grpc_target=f"127.0.0.1:{grpc_port}",
                              extra_args=["--message-deadline", "3", "--max-pending", "1"], env={"KCP_API_KEY": key})
    try:
        run = uuid.uuid4().hex[:6]
        first, second = produce_and_read_back(kafka_broker, topics["requests"],
                                              [({"features": SETOSA}, f"{run}-a", {}),
                                               ({"features": VIRGINICA}, f"{run}-b", {})])
        held: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: held.append(receiver.deliver(first)))
        started = time.monotonic()
        thread.start()
        time.sleep(1.0)
        busy = receiver.deliver(second, timeout=5)
        assert busy.status_code == 429 and busy.headers["retry-after"], "max-pending 1: the second waits its turn"
        thread.join(30)
        assert held[0].status_code == 503 and held[0].headers["retry-after"]
        assert 2.5 < time.monotonic() - started < 20, "refused at the message deadline, not at once nor never"
        assert receiver.bridge.metric("kcp_bridge_refused_total") == 1
        assert not collect(kafka_broker, topics["dlq"], until=lambda got: False, timeout=1.0), \
            "an outage is the sender's to retry, never a dead letter"
        with serve_on(http_port, grpc_port, tmp_path, api_key=key):  # the server is back, with its API key on
            # delivered again as Knative does: a 503 while the bridge's channel reconnects is retried
            for record in (first, second):
                answers = [receiver.deliver(record).status_code]
                while answers[-1] == 503 and len(answers) < 5:
                    answers.append(receiver.deliver(record).status_code)
                assert answers[-1] == 200, answers
        results = wait_keys(kafka_broker, topics["results"], {f"{run}-a", f"{run}-b"})
        labels = {k: next(o["data"] for o in m.json()["outputs"] if o["name"] == "label_name")
                  for k, m in results.items()}
        assert labels == {f"{run}-a": ["setosa"], f"{run}-b": ["virginica"]}
    finally:
        assert receiver.bridge.stop() == 0, receiver.bridge.log()[-3000:]
