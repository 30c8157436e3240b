"""The Messenger against real brokers: tansu (Kafka protocol) and the Google Pub/Sub emulator."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from streaming.messenger import CORRELATION_HEADER, Message, Messenger, PermanentSendError, RequestTimeout


def send_batch(messenger: Messenger, records: list[tuple[bytes, bytes | None, list[tuple[str, bytes]]]]
               ) -> list[BaseException | None]:
    """``Messenger.send_batch`` and wait for its single report."""
    reports: list[list[BaseException | None]] = []
    reported = threading.Event()

    def done(errors: list[BaseException | None]) -> None:
        reports.append(list(errors))
        reported.set()

    messenger.send_batch(records, done)
    assert reported.wait(60)
    assert len(reports) == 1
    return reports[0]


def drain(messenger: Messenger, want: int, idle_s: float = 10.0) -> list[Message]:
    out: list[Message] = []
    for m in messenger.messages(idle_timeout_s=idle_s):
        out.append(m)
        if len(out) >= want:
            break
    return out


# --- Kafka --------------------------------------------------------------------------------------


def test_kafka_send_receive_keys_headers_and_json(kafka_broker, kafka_topics) -> None:
    topic = kafka_topics(t=2)["t"]
    with Messenger(topic, settings=kafka_broker.messenger_settings()) as m:
        deliveries = [m.send({"n": i}, key=f"k{i}", headers={"h": f"v{i}"}) for i in range(6)]
        assert {d.partition for d in deliveries} <= {0, 1} and all(d.offset is not None for d in deliveries)
        got = sorted(drain(m, 6), key=lambda x: x.json()["n"])
    assert [g.json() for g in got] == [{"n": i} for i in range(6)]
    assert [g.key_str for g in got] == [f"k{i}" for i in range(6)]
    assert [g.header_str("h") for g in got] == [f"v{i}" for i in range(6)]


def test_kafka_send_batch_reports_each_record_once_all_settled(kafka_broker, kafka_topics) -> None:
    topic = kafka_topics(t=2)["t"]
    too_big = b"x" * (64 * 1024)
    records = [(b"a", b"ka", [("h", b"1")]), (too_big, b"kb", []), (b"c", None, [])]
    with Messenger(topic, settings=kafka_broker.messenger_settings(max_request_size=16 * 1024)) as m:
        errors = send_batch(m, records)
        assert errors[0] is None and errors[2] is None
        assert isinstance(errors[1], PermanentSendError)  # refused for what it is: dead-letter material
        assert send_batch(m, []) == []
        got = sorted(drain(m, 2), key=lambda x: x.value)
    assert [(g.value, g.key, g.header_str("h")) for g in got] == [(b"a", b"ka", "1"), (b"c", None, None)]


def test_kafka_group_resumes_after_the_last_acknowledged_message(kafka_broker, kafka_topics) -> None:
    topic = kafka_topics(t=1)["t"]
    group = f"g-{uuid.uuid4().hex[:6]}"
    settings = kafka_broker.messenger_settings()
    with Messenger(topic, settings=settings) as producer:
        for i in range(6):
            producer.send(str(i))
    with Messenger(topic, group=group, settings=settings) as first:
        got = drain(first, 6)
        assert [g.value for g in got] == [str(i).encode() for i in range(6)]
        for g in got[:2]:
            first.ack(g)
        first.ack(got[3])  # out of order: offset 2 is not done, so only 0..1 may be committed
    with Messenger(topic, group=group, settings=settings) as second:
        again = drain(second, 4)
    assert [g.value for g in again] == [b"2", b"3", b"4", b"5"]


def _responder(topic: str, settings, stop: threading.Event, ready: threading.Event) -> None:
    with Messenger(topic, group=f"svc-{uuid.uuid4().hex[:6]}", settings=settings) as service:
        ready.set()
        while not stop.is_set():
            for request in service.receive(timeout_s=0.2):
                service.reply(request, {"echo": request.json()})
                service.ack(request)


@pytest.fixture
def kafka_responder(kafka_broker, kafka_topics) -> Iterator[dict[str, str]]:
    topics = kafka_topics(requests=1, replies=2)
    stop, ready = threading.Event(), threading.Event()
    worker = threading.Thread(target=_responder, args=(topics["requests"], kafka_broker.messenger_settings(),
                                                       stop, ready), daemon=True)
    worker.start()
    ready.wait(30)
    yield topics
    stop.set()
    worker.join(30)


def test_kafka_request_reply_matches_by_correlation_id(kafka_broker, kafka_responder) -> None:
    t = kafka_responder
    with Messenger(t["requests"], reply_topic=t["replies"], settings=kafka_broker.messenger_settings()) as client:
        first = client.request({"q": 1}, timeout_s=60)
        second = client.request({"q": 2}, correlation_id="mine-2", timeout_s=60)
    assert first.json() == {"echo": {"q": 1}}
    assert second.json() == {"echo": {"q": 2}} and second.header_str(CORRELATION_HEADER) == "mine-2"


def test_kafka_request_without_a_responder_times_out(kafka_broker, kafka_topics) -> None:
    t = kafka_topics(requests=1, replies=1)
    with Messenger(t["requests"], reply_topic=t["replies"], settings=kafka_broker.messenger_settings()) as client, \
            pytest.raises(RequestTimeout):
        client.request({"q": 1}, timeout_s=2)


# --- Pub/Sub ------------------------------------------------------------------------------------


def test_pubsub_send_receive_ack(pubsub_emulator) -> None:
    topic = f"ps-{uuid.uuid4().hex[:8]}"
    settings = pubsub_emulator.messenger_settings()
    with Messenger(topic, "pubsub", group="workers", settings=settings) as consumer:
        consumer.receive(timeout_s=0.1)  # creates the subscription before anything is published
        with Messenger(topic, "pubsub", settings=settings) as producer:
            deliveries = [producer.send({"n": i}, key=f"k{i}", headers={"h": f"v{i}"}) for i in range(5)]
        assert all(d.message_id for d in deliveries)
        got = drain(consumer, 5)
        for g in got:
            consumer.ack(g)
    assert sorted(g.json()["n"] for g in got) == list(range(5))
    by_n = {g.json()["n"]: g for g in got}
    assert by_n[3].key_str == "k3" and by_n[3].header_str("h") == "v3" and by_n[3].position


def test_pubsub_send_batch_reports_each_record_once_all_settled(pubsub_emulator) -> None:
    topic = f"ps-{uuid.uuid4().hex[:8]}"
    settings = pubsub_emulator.messenger_settings()
    with Messenger(topic, "pubsub", group="workers", settings=settings) as consumer:
        consumer.receive(timeout_s=0.1)
        with Messenger(topic, "pubsub", settings=settings) as producer:
            errors = send_batch(producer, [(b"a", b"ka", []), (b"b", None, [("h", b"v" * 2000)]), (b"c", None, [])])
        assert errors[0] is None and errors[2] is None and isinstance(errors[1], PermanentSendError)
        got = drain(consumer, 2)
        for g in got:
            consumer.ack(g)
    assert sorted(g.value for g in got) == [b"a", b"c"]


def test_pubsub_consumers_in_one_group_share_a_subscription(pubsub_emulator) -> None:
    topic = f"ps-{uuid.uuid4().hex[:8]}"
    settings = pubsub_emulator.messenger_settings()
    with Messenger(topic, "pubsub", group="g", settings=settings) as a, \
            Messenger(topic, "pubsub", group="g", settings=settings) as b:
        a.receive(timeout_s=0.1)
        b.receive(timeout_s=0.1)
        assert a.assignment == b.assignment
        with Messenger(topic, "pubsub", settings=settings) as producer:
            for i in range(20):
                producer.send(str(i))
        seen: list[bytes] = []
        for _ in range(100):
            for consumer in (a, b):
                for m in consumer.receive(timeout_s=0.1):
                    seen.append(m.value)
                    consumer.ack(m)
            if len(set(seen)) >= 20:
                break
    assert set(seen) == {str(i).encode() for i in range(20)}


def test_pubsub_request_reply(pubsub_emulator) -> None:
    requests, replies = f"rq-{uuid.uuid4().hex[:8]}", f"rp-{uuid.uuid4().hex[:8]}"
    settings = pubsub_emulator.messenger_settings()
    stop, ready = threading.Event(), threading.Event()

    def serve() -> None:
        with Messenger(requests, "pubsub", group="svc", settings=settings) as service:
            service.receive(timeout_s=0.1)
            ready.set()
            while not stop.is_set():
                for request in service.receive(timeout_s=0.2):
                    service.reply(request, {"answer": request.json()["q"] * 2})
                    service.ack(request)

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    try:
        assert ready.wait(60)
        with Messenger(requests, "pubsub", reply_topic=replies, settings=settings) as client:
            replies_got = [client.request({"q": q}, timeout_s=60) for q in (1, 21)]
    finally:
        stop.set()
        worker.join(30)
    assert [r.json() for r in replies_got] == [{"answer": 2}, {"answer": 42}]
