"""At-least-once under failure: SIGKILL, SIGTERM, a model-server outage, and two bridges in a group.

Every test counts request ids: the claim is "every request gets a result", so the check is the
set of result ids against the set of request ids (duplicates allowed where the guarantee allows
them, and none where a graceful stop promises none).
"""

from __future__ import annotations

import signal
import threading
import time
import uuid

from kafka import KafkaConsumer, TopicPartition

from streaming.messenger import Messenger
from tests.fixtures.broker import KafkaBroker, collect, ids_of
from tests.fixtures.ports import free_port, wait_for
from tests.fixtures.server import serve_on

ROWS = ([5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5], [6.7, 3.0, 5.2, 2.3])


def requests(run: str, n: int, start: int = 0) -> list[tuple[str, dict]]:
    return [(f"{run}-{i}", {"id": f"{run}-{i}", "features": ROWS[i % 3], "true_label": i % 3})
            for i in range(start, start + n)]


def send_all(broker: KafkaBroker, topic: str, items: list[tuple[str, dict]], delay_s: float = 0.0) -> None:
    with Messenger(topic, settings=broker.messenger_settings()) as m:
        futures = []
        for key, value in items:
            futures.append(m.send_async(value, key=key))
            if delay_s:
                time.sleep(delay_s)
        for f in futures:
            f.result(timeout=60)


def no_dead_letters(broker: KafkaBroker, topic: str) -> list:
    return collect(broker, topic, until=lambda got: False, timeout=1.0)


def test_sigkill_mid_stream_then_restart_loses_nothing(kafka_broker, kafka_topics, bridges, model_server) -> None:
    t = kafka_topics(requests=3, results=2, dlq=1)
    group, run = f"kill-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    args = {"group": group, "grpc_target": model_server.grpc_target,
            "extra_args": ["--max-batch-size", "4", "--max-in-flight", "2"]}
    items = requests(run, 240)
    first = bridges(t, **args)
    producer = threading.Thread(target=send_all, args=(kafka_broker, t["requests"], items, 0.01))
    producer.start()  # the stream is still flowing in when the bridge dies
    before = collect(kafka_broker, t["results"], until=lambda got: len(got) >= 40)
    first.stop(signal.SIGKILL)
    producer.join(60)
    seen_before_kill = set(ids_of(before))
    assert 40 <= len(seen_before_kill) < len(items), "the kill must land mid-stream for this test to mean anything"

    bridges(t, **args)
    expected = {key for key, _ in items}
    results = collect(kafka_broker, t["results"], until=lambda got: expected <= set(ids_of(got)), timeout=120)
    ids = ids_of(results)
    assert set(ids) == expected, f"lost {len(expected - set(ids))} request(s)"
    duplicates = len(ids) - len(set(ids))
    print(f"{len(expected)} requests, {len(ids)} results, {duplicates} duplicate(s) from the in-flight window")
    assert not no_dead_letters(kafka_broker, t["dlq"])


def test_model_server_outage_is_waited_out_without_dead_letters(kafka_broker, kafka_topics, bridges,
                                                                tmp_path) -> None:
    t = kafka_topics(requests=2, results=1, dlq=1)
    http_port, grpc_port = free_port(), free_port()
    run = uuid.uuid4().hex[:6]
    first_half, second_half = requests(run, 20), requests(run, 30, start=20)
    key = f"key-{run}"  # a keyed server: the bridge's bearer token (KCP_API_KEY, shared with the server) works
    with serve_on(http_port, grpc_port, tmp_path, api_key=key):
        bridge = bridges(t, group=f"outage-{run}", grpc_target=f"127.0.0.1:{grpc_port}", env={"KCP_API_KEY": key})
        # a second group whose bridge has the wrong key: refused calls are retried, never dead-lettered
        wrong = bridges(t, group=f"wrong-key-{run}", grpc_target=f"127.0.0.1:{grpc_port}",
                        env={"KCP_V2_API_KEY": "not-the-key"})
        send_all(kafka_broker, t["requests"], first_half)
        collect(kafka_broker, t["results"], until=lambda got: len(got) >= len(first_half))
        wait_for(lambda: wrong.metric("kcp_bridge_retries_total") >= 2, timeout=60, what="wrong-key retries")
        assert wrong.metric("kcp_bridge_produced_total") == 0 and wrong.metric("kcp_bridge_dead_lettered_total") == 0
        wrong.stop(signal.SIGKILL)
    # server stopped: connection refused / UNAVAILABLE from here on
    send_all(kafka_broker, t["requests"], second_half)
    wait_for(lambda: bridge.metric("kcp_bridge_retries_total") >= 3, timeout=60, what="retries during the outage")
    assert bridge.health()["pending"] > 0, "requests wait in the bridge instead of being dropped"
    with serve_on(http_port, grpc_port, tmp_path, api_key=key):
        expected = {key for key, _ in first_half + second_half}
        results = collect(kafka_broker, t["results"], until=lambda got: expected <= set(ids_of(got)), timeout=120)
    assert set(ids_of(results)) == expected
    assert not no_dead_letters(kafka_broker, t["dlq"]), "an outage must not turn requests into dead letters"
    assert bridge.metric("kcp_bridge_dead_lettered_total") == 0


def test_two_bridges_in_one_group_share_the_partitions(kafka_broker, kafka_topics, bridges, model_server) -> None:
    t = kafka_topics(requests=4, results=2, dlq=1)
    group, run = f"pair-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    a = bridges(t, group=group, grpc_target=model_server.grpc_target)
    b = bridges(t, group=group, grpc_target=model_server.grpc_target, wait_assigned=False)
    everything = {f"{t['requests']}/{p}" for p in range(4)}

    def split_between_both() -> bool:
        mine, theirs = set(a.health()["assigned"]), set(b.health()["assigned"])
        return bool(mine) and bool(theirs) and not mine & theirs and mine | theirs == everything

    wait_for(split_between_both, timeout=60, interval=0.3, what="both bridges to own partitions")
    items = requests(run, 80)
    send_all(kafka_broker, t["requests"], items)
    expected = {key for key, _ in items}
    results = collect(kafka_broker, t["results"], until=lambda got: expected <= set(ids_of(got)))
    assert set(ids_of(results)) == expected
    consumed_a, consumed_b = a.metric("kcp_bridge_consumed_total"), b.metric("kcp_bridge_consumed_total")
    assert consumed_a > 0 and consumed_b > 0, (consumed_a, consumed_b)
    assert consumed_a + consumed_b >= len(items)


def committed_offsets(broker: KafkaBroker, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)}
    finally:
        consumer.close(autocommit=False)


def test_sigterm_drains_commits_and_a_restart_duplicates_nothing(kafka_broker, kafka_topics, bridges,
                                                                 model_server) -> None:
    t = kafka_topics(requests=2, results=1, dlq=1)
    group, run = f"term-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex[:6]
    args = {"group": group, "grpc_target": model_server.grpc_target,
            "extra_args": ["--max-batch-size", "2", "--max-in-flight", "1"]}
    items = requests(run, 200)
    first = bridges(t, **args)
    producer = threading.Thread(target=send_all, args=(kafka_broker, t["requests"], items, 0.005))
    producer.start()
    collect(kafka_broker, t["results"], until=lambda got: len(got) >= 20)
    assert first.stop(signal.SIGTERM) == 0, first.log()[-3000:]
    producer.join(60)

    committed = committed_offsets(kafka_broker, group, t["requests"], 2)
    done = collect(kafka_broker, t["results"], until=lambda got: False, timeout=2.0)
    positions = {(m.json()["source"]["partition"], m.json()["source"]["offset"]) for m in done}
    # Graceful: everything committed has a result, and nothing has a result that is not committed.
    assert positions == {(p, o) for p, end in committed.items() for o in range(end)}
    assert 20 <= len(done) < len(items), "SIGTERM should land mid-stream"

    bridges(t, **args)
    expected = {key for key, _ in items}
    results = collect(kafka_broker, t["results"], until=lambda got: expected <= set(ids_of(got)), timeout=120,
                      settle_s=1.0)
    ids = ids_of(results)
    assert set(ids) == expected
    assert len(ids) == len(expected), "a drained and committed stop leaves nothing to redo"
