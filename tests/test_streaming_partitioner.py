"""The bridge's producer partitioner and result headers: cheaper, but byte-for-byte what they replace."""

from __future__ import annotations

import random

import pytest
from cloudevents.kafka import KafkaMessage, from_binary
from kafka.cluster import ClusterMetadata
from kafka.partitioner import DefaultPartitioner
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from streaming.bridge import RESULT_TYPE, Bridge
from streaming.cloudevents import CloudEvent, to_kafka_headers
from streaming.messages import decode
from streaming.messenger import CORRELATION_HEADER, Message
from streaming.partitioner import Murmur2Partitioner, murmur2
from streaming.settings import BridgeSettings
from streaming.tensors import InferResponse, Tensor


@pytest.mark.parametrize(("key", "partition"), [(b"", 681), (b"a", 524), (b"ab", 434), (b"abc", 107),
                                                (b"123456789", 566), (b"\x00 ", 742)])
def test_murmur2_matches_the_java_client(key: bytes, partition: int) -> None:
    # partitions of 1,000 the Java client's default partitioner chooses for these keys (kafka-python's test vectors)
    assert (murmur2(key) & 0x7FFFFFFF) % 1000 == partition


def test_murmur2_matches_kafka_python_on_random_keys() -> None:
    rng = random.Random(12)
    keys = [rng.randbytes(rng.randrange(0, 70)) for _ in range(3000)]
    keys += [f"run-iris-{i}-r3".encode() for i in range(500)]
    assert [murmur2(k) for k in keys] == [kafka_python_murmur2(k) for k in keys]


class _Cluster(ClusterMetadata):  # type: ignore[misc]
    def __init__(self, partitions: dict[str, set[int]]) -> None:
        super().__init__()
        self._parts = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self._parts.get(topic)

    def available_partitions_for_topic(self, topic: str) -> set[int] | None:
        return self._parts.get(topic)

    def topics(self, exclude_internal_topics: bool = True) -> set[str]:
        return set(self._parts)


def test_partitioner_picks_what_the_default_partitioner_picks() -> None:
    cluster = _Cluster({"results": {0, 1, 2}, "gaps": {0, 3, 5, 9}})
    ours, theirs = Murmur2Partitioner(), DefaultPartitioner()
    for topic in ("results", "gaps"):
        for i in range(2000):
            key = f"req-{i}".encode()
            assert ours.partition(topic, key, key, b"v", b"v", cluster) == \
                theirs.partition(topic, key, key, b"v", b"v", cluster)
    assert ours.partition("results", None, None, b"v", b"v", cluster) in {0, 1, 2}  # no key: kafka-python's choice
    with pytest.raises(ValueError):
        ours.partition("missing", b"k", b"k", b"v", b"v", cluster)


@pytest.mark.parametrize("headers", [
    [],
    [("kcp-correlation-id", b"corr-1"), ("kcp-model-version", b"7")],
    [("ce_specversion", b"1.0"), ("ce_id", b"ev-1"), ("ce_source", b"/s"), ("ce_type", b"t"),
     ("ce_traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), ("ce_tracestate", b"")],
])
@pytest.mark.parametrize("version", [None, "3"])
def test_result_headers_are_the_result_events_binary_headers(headers: list[tuple[str, bytes]],
                                                             version: str | None) -> None:
    bridge = Bridge(BridgeSettings())
    message = Message("requests", b'{"features": [5.1, 3.5, 1.4, 0.2], "label": 0}', key=b"req-9", headers=headers,
                      partition=2, offset=41, position="requests/2/41")
    d = decode(message)
    response = InferResponse("iris", [Tensor("label", "INT64", [1], [0])], model_version=version)
    _, got = bridge.result_record(d, response, message, "2026-12-03T06:00:00.000Z")
    model_version = version or d.request.model_version
    extensions = {"correlationid": d.correlation_id, "modelversion": model_version or ""}
    if d.cloudevent is not None:
        extensions.update({k: d.cloudevent.extensions[k] for k in ("traceparent", "tracestate")
                           if k in d.cloudevent.extensions})
    event = CloudEvent(id=d.request_id, source=bridge.settings.cloudevents_source, type=RESULT_TYPE, subject="iris",
                       time="2026-12-03T06:00:00.000Z", datacontenttype="application/json",
                       extensions={k: v for k, v in extensions.items() if v})
    want = [*to_kafka_headers(event), (CORRELATION_HEADER, d.correlation_id.encode()), ("kcp-model", b"iris")]
    if model_version:
        want.append(("kcp-model-version", model_version.encode()))
    assert got == want
    sdk = from_binary(KafkaMessage(headers=dict(got), key=b"req-9", value=b"{}"))  # and the SDK reads them
    assert sdk["id"] == d.request_id and sdk["type"] == RESULT_TYPE
