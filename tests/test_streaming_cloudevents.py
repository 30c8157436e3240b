"""CloudEvents Kafka binding: our headers against the independent ``cloudevents`` SDK, and through a real broker."""

from __future__ import annotations

import json

import pytest
from cloudevents.http import CloudEvent as SdkEvent
from cloudevents.kafka import KafkaMessage, from_binary, to_binary

from streaming.cloudevents import CloudEvent, CloudEventError, from_kafka, now, to_kafka_headers
from streaming.messenger import Messenger


def ours() -> CloudEvent:
    return CloudEvent(id="req-1", source="/kcp/test", type="org.kcp.inference.request", subject="iris", time=now(),
                      datacontenttype="application/json", extensions={"correlationid": "c-1", "traceparent": "00-ab"},
                      data=b'{"features": [1, 2, 3, 4]}')


def test_our_binary_headers_parse_with_the_sdk() -> None:
    event = ours()
    sdk = from_binary(KafkaMessage(headers=dict(to_kafka_headers(event)), key=None, value=event.data),
                      data_unmarshaller=lambda b: b)
    assert sdk["id"] == "req-1" and sdk["source"] == "/kcp/test" and sdk["type"] == event.type
    assert sdk["subject"] == "iris" and sdk["specversion"] == "1.0" and sdk["datacontenttype"] == "application/json"
    assert sdk["correlationid"] == "c-1" and sdk["traceparent"] == "00-ab"
    assert sdk.data == event.data


def test_sdk_binary_messages_parse_with_ours() -> None:
    sdk = SdkEvent({"type": "t.x", "source": "/src", "id": "e-9", "subject": "s", "datacontenttype": "application/json",
                    "myext": "v"}, {"a": 1})
    message = to_binary(sdk)
    event = from_kafka(list(message.headers.items()), message.value)
    assert event is not None
    assert (event.id, event.source, event.type, event.subject) == ("e-9", "/src", "t.x", "s")
    assert event.extensions["myext"] == "v" and json.loads(event.data or b"") == {"a": 1}
    assert event.time == sdk["time"]


def test_structured_mode_and_non_events() -> None:
    doc = {"specversion": "1.0", "id": "s-1", "source": "/s", "type": "t", "data_base64": "AAEC"}
    headers = [("content-type", b"application/cloudevents+json; charset=utf-8")]
    event = from_kafka(headers, json.dumps(doc).encode())
    assert event is not None and event.data == b"\x00\x01\x02"
    assert from_kafka([("content-type", b"application/json")], b"{}") is None
    with pytest.raises(CloudEventError):
        from_kafka([("ce_specversion", b"1.0"), ("ce_id", b"x")], b"")  # no source / type
    with pytest.raises(CloudEventError):
        to_kafka_headers(CloudEvent(id="a", source="/s", type="t", extensions={"Bad-Name": "x"}))


def test_headers_round_trip_through_the_broker(kafka_broker, kafka_topics) -> None:
    topic = kafka_topics(events=1)["events"]
    event = ours()
    with Messenger(topic, settings=kafka_broker.messenger_settings()) as messenger:
        messenger.send(event.data or b"", key="req-1", headers=to_kafka_headers(event))
        received = []
        for message in messenger.messages(idle_timeout_s=10):
            received.append(message)
            break
    assert received, "the event did not come back from the broker"
    back = from_kafka(received[0].headers, received[0].value)
    assert back == event
