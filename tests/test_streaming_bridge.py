"""The bridge end to end: real tansu broker, real model server, real bridge subprocess.

One bridge (gRPC) serves the module's topics; every test sends its own request ids and waits for
exactly those on the results / dead-letter topics.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from cloudevents.http import CloudEvent as SdkEvent
from cloudevents.kafka import KafkaMessage, from_binary, to_binary

from devtools.images import image_messages, load_test_images, png_bytes
from streaming.messenger import CORRELATION_HEADER, Message, Messenger
from streaming.producers import Outgoing, produce
from tests.fixtures.broker import REPO, BridgeProcess, KafkaBroker, collect, launch_bridge
from tests.fixtures.server import TRAINED_MODELS, ServerHandle

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]


@pytest.fixture(scope="module")
def topics(kafka_broker: KafkaBroker) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:6]
    names = {"requests": f"e2e-req-{suffix}", "results": f"e2e-res-{suffix}", "dlq": f"e2e-dlq-{suffix}"}
    kafka_broker.create_topics({names["requests"]: 3, names["results"]: 2, names["dlq"]: 1})
    return names


@pytest.fixture(scope="module")
def bridge(kafka_broker: KafkaBroker, topics: dict[str, str], model_server: ServerHandle,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    handle = launch_bridge(kafka_broker.env(), topics, tmp_path_factory.mktemp("bridge"),
                           group=f"e2e-{uuid.uuid4().hex[:6]}", grpc_target=model_server.grpc_target)
    yield handle
    assert handle.stop() == 0, handle.log()[-3000:]  # SIGTERM: drains and exits cleanly


@pytest.fixture(scope="module")
def sender(kafka_broker: KafkaBroker, topics: dict[str, str]) -> Iterator[Messenger]:
    with Messenger(topics["requests"], settings=kafka_broker.messenger_settings()) as m:
        yield m


def by_id(messages: list[Message]) -> dict[str, dict[str, Any]]:
    return {m.key_str or "": m.json() for m in messages}


def wait_results(kafka_broker: KafkaBroker, topic: str, ids: set[str]) -> dict[str, Message]:
    found = collect(kafka_broker, topic, until=lambda got: ids <= {m.key_str for m in got})
    out = {m.key_str: m for m in found if m.key_str in ids}
    assert set(out) == ids, f"missing results for {sorted(ids - set(out))}"
    return out  # type: ignore[return-value]


def out(doc: dict[str, Any], name: str) -> list[Any]:
    return next(o["data"] for o in doc["outputs"] if o["name"] == name)


def v2_request(rid: str, model: str, name: str, datatype: str, array: np.ndarray) -> dict[str, Any]:
    tensor = {"name": name, "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}
    return {"id": rid, "model_name": model, "inputs": [tensor]}


def test_every_input_form_gets_a_result(bridge, sender, kafka_broker, topics, model_server) -> None:
    run = uuid.uuid4().hex[:6]
    x, y = load_test_images("fashion-mnist")
    digits, _ = load_test_images("mnist")
    sent = {
        f"{run}-row": ({"id": f"{run}-row", "sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4,
                        "petal_width": 0.2, "label": 0, "label_name": "setosa"}, {}),
        f"{run}-features": ({"id": f"{run}-features", "features": VIRGINICA, "true_label": 2}, {}),
        f"{run}-v2": (v2_request(f"{run}-v2", "iris", "input-0", "FP32", np.array([SETOSA])), {}),
        f"{run}-v2-header": ({"id": f"{run}-v2-header", "inputs": [
            {"name": "input-0", "datatype": "FP32", "shape": [1, 28, 28],
             "data": (digits[:1] / 255.0).ravel().tolist()}]}, {"kcp-model": "mnist"}),
        f"{run}-image": ({"id": f"{run}-image", "image_id": "fm-0", "image_b64": base64.b64encode(png_bytes(x[0]))
                          .decode(), "model": "fashion-mnist", "true_label": int(y[0])}, {}),
    }
    for rid, (value, headers) in sent.items():
        sender.send(value, key=rid, headers=headers)
    sender.send(png_bytes(digits[1]), key=f"{run}-raw-png", headers={"kcp-model": "mnist", "content-type": "image/png"})
    results = wait_results(kafka_broker, topics["results"], {*sent, f"{run}-raw-png"})
    docs = {k: m.json() for k, m in results.items()}

    with model_server.client() as client:
        versions = {m: client.get(f"/v2/models/{m}").json()["versions"][0] for m in ("iris", "mnist", "fashion-mnist")}
    for rid, doc in docs.items():
        assert doc["id"] == rid and doc["model_version"] == versions[doc["model_name"]], doc
        assert results[rid].header_str(CORRELATION_HEADER) == rid
        assert {"label", "label_name", "probabilities"} <= {o["name"] for o in doc["outputs"]}
        assert len(out(doc, "label")) == 1
    assert docs[f"{run}-row"]["form"] == "row" and out(docs[f"{run}-row"], "label_name") == ["setosa"]
    assert docs[f"{run}-row"]["true_label"] == 0 and docs[f"{run}-row"]["true_label_name"] == "setosa"
    assert out(docs[f"{run}-features"], "label") == [2] and docs[f"{run}-features"]["true_label"] == 2
    assert docs[f"{run}-v2"]["model_name"] == "iris" and out(docs[f"{run}-v2"], "label") == [0]
    assert docs[f"{run}-v2-header"]["model_name"] == "mnist" and docs[f"{run}-v2-header"]["form"] == "v2"
    image = docs[f"{run}-image"]
    assert image["model_name"] == "fashion-mnist" and image["image_id"] == "fm-0" and image["true_label"] == int(y[0])
    assert len(out(image, "probabilities")) == 10
    assert docs[f"{run}-raw-png"]["model_name"] == "mnist" and docs[f"{run}-raw-png"]["form"] == "image"
    assert 0 <= out(docs[f"{run}-raw-png"], "label")[0] <= 9


def test_producer_and_results_commands_with_feedback(kafka_broker, kafka_topics, bridges, model_server) -> None:
    """The commands `make demo` runs, on their own topics: produce iris, produce-images, results --feedback."""
    csv = TRAINED_MODELS / "iris" / "test.csv"
    assert csv.is_file(), f"{csv} is missing: training writes the Iris test split next to the package"
    topics = kafka_topics(requests=2, results=2, dlq=1)
    bridges(topics, group="cli", grpc_target=model_server.grpc_target)
    run = f"cli{uuid.uuid4().hex[:6]}"
    env = {**{k: v for k, v in __import__("os").environ.items() if not k.startswith("KCP_")}, **kafka_broker.env()}

    def cli(*args: str, module: str = "streaming") -> str:
        done = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    rows = len(csv.read_text().strip().splitlines()) - 1
    assert f"sent {rows} iris" in cli("produce", "iris", "--csv", str(csv), "--delay", "0", "--topic",
                                      topics["requests"], "--run-id", run)
    assert "sent 6 images" in cli("produce-images", "--count", "6", "--with-labels", "--seed", "1", "--topic",
                                  topics["requests"], "--run-id", run, module="devtools")
    wait_results(kafka_broker, topics["results"], {f"{run}-iris-{i}" for i in range(rows)}
                 | {f"{run}-fashion-mnist-{i}" for i in range(6)})
    report = cli("results", "--topic", topics["results"], "--count", str(rows + 6), "--idle-timeout", "30",
                 "--feedback", "--server-url", model_server.http_url)
    lines = [line for line in report.splitlines() if line.startswith(run)]
    assert len(lines) == rows + 6 and all(" -> " in line for line in lines)
    assert f"results: {rows + 6} unique" in report
    assert f"iris: feedback sent for {rows}" in report and "fashion-mnist: feedback sent for 6" in report
    assert "feedback error" not in report


def test_bad_messages_are_dead_lettered_and_do_not_block(bridge, sender, kafka_broker, topics) -> None:
    run = uuid.uuid4().hex[:6]
    bad = {
        f"{run}-bytes": (b"\xff\xfe\x00\x01garbage", "undecodable", None),
        f"{run}-json": (b'{"inputs": [', "invalid-json", None),
        f"{run}-form": (b'{"hello": "world"}', "invalid-request", None),
        f"{run}-model": (json.dumps(v2_request(f"{run}-model", "no-such-model", "input-0", "FP32",
                                               np.array([SETOSA]))).encode(), "rejected", "404"),
        f"{run}-shape": (json.dumps(v2_request(f"{run}-shape", "iris", "input-0", "FP32",
                                               np.array([[1.0, 2.0, 3.0]]))).encode(), "rejected", "400"),
    }
    good = [f"{run}-good-{i}" for i in range(len(bad) + 1)]
    for i, (key, (value, _, _)) in enumerate(bad.items()):
        sender.send({"id": good[i], "features": SETOSA}, key=good[i])
        sender.send(value, key=key, headers={"origin": f"test-{i}"})
    sender.send({"id": good[-1], "features": VIRGINICA}, key=good[-1])

    dead = collect(kafka_broker, topics["dlq"], until=lambda got: set(bad) <= {m.key_str for m in got})
    dead_by_key = {m.key_str: m for m in dead if m.key_str in bad}
    assert set(dead_by_key) == set(bad)
    for i, (key, (value, kind, status)) in enumerate(bad.items()):
        record = dead_by_key[key]
        assert record.value == value, "the original payload is kept byte for byte"
        assert record.header_str("origin") == f"test-{i}", "the original headers are kept"
        assert record.header_str("kcp-dlq-kind") == kind
        assert record.header_str("kcp-dlq-reason")
        assert record.header_str("kcp-dlq-source-topic") == topics["requests"]
        assert record.header_str("kcp-dlq-status") == status
    assert "no-such-model" in dead_by_key[f"{run}-model"].header_str("kcp-dlq-reason")  # type: ignore[operator]
    wait_results(kafka_broker, topics["results"], set(good))
    results = collect(kafka_broker, topics["results"], until=lambda got: False, timeout=0.5)
    assert not set(bad) & {m.key_str for m in results}, "a dead letter never also produces a result"


def test_one_bad_image_in_a_batch_does_not_take_its_neighbours_down(bridge, sender, kafka_broker, topics) -> None:
    run = uuid.uuid4().hex[:6]
    good = image_messages("fashion-mnist", count=7, seed=3, with_labels=True, run_id=run)
    corrupt = {"id": f"{run}-corrupt", "image_b64": base64.b64encode(b"\x89PNG\r\n\x1a\n not an image").decode(),
               "model": "fashion-mnist"}
    messages = [*good[:4], Outgoing(corrupt["id"], corrupt), *good[4:]]
    produce(sender, messages)
    wait_results(kafka_broker, topics["results"], {m.key for m in good})
    dead = collect(kafka_broker, topics["dlq"], until=lambda got: f"{run}-corrupt" in {m.key_str for m in got})
    record = next(m for m in dead if m.key_str == f"{run}-corrupt")
    assert record.header_str("kcp-dlq-kind") == "rejected" and record.header_str("kcp-dlq-status") == "400"
    assert not any(m.key_str in {g.key for g in good} for m in dead)


def test_cloudevents_in_and_out_interoperate_with_the_sdk(bridge, sender, kafka_broker, topics) -> None:
    rid = f"ce-{uuid.uuid4().hex[:8]}"
    event = SdkEvent({"type": "com.example.iris", "source": "/knative/kafkasource", "id": rid,
                      "datacontenttype": "application/json", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-"
                                                                            "00f067aa0ba902b7-01"},
                     {"features": VIRGINICA, "true_label": 2})
    message = to_binary(event, key_mapper=lambda e: e["id"])
    sender.send(message.value, key=message.key, headers=list(message.headers.items()))
    result = wait_results(kafka_broker, topics["results"], {rid})[rid]
    back = from_binary(KafkaMessage(headers=dict(result.headers), key=result.key, value=result.value))
    assert back["id"] == rid and back["specversion"] == "1.0"
    assert back["type"] == "org.kcp.inference.result" and back["subject"] == "iris"
    assert back["datacontenttype"] == "application/json" and back["correlationid"] == rid
    assert back["traceparent"] == event["traceparent"], "trace context is carried from request to result"
    assert back.data["id"] == rid and back.data["true_label"] == 2 and out(back.data, "label") == [2]


def test_request_reply_through_the_bridge(bridge, kafka_broker, topics) -> None:
    with Messenger(topics["requests"], reply_topic=topics["results"],
                   settings=kafka_broker.messenger_settings()) as client:
        reply = client.request({"features": SETOSA}, correlation_id=f"rr-{uuid.uuid4().hex[:8]}", timeout_s=60)
    assert out(reply.json(), "label_name") == ["setosa"]


def test_health_and_metrics_endpoint(bridge) -> None:
    health = bridge.health()
    assert health["status"] == "running" and health["assigned"]
    metrics = bridge.metrics()
    assert metrics["kcp_bridge_consumed_total"] >= 1
    for name in ("kcp_bridge_produced_total", "kcp_bridge_dead_lettered_total", "kcp_bridge_latency_seconds_count",
                 "kcp_bridge_pending", "kcp_bridge_batch_size_count"):
        assert any(k.startswith(name) for k in metrics), name


def test_rest_protocol(kafka_broker, kafka_topics, bridges, model_server) -> None:
    t = kafka_topics(requests=1, results=1, dlq=1)
    bridges(t, group="rest", protocol="rest", rest_url=model_server.http_url)
    run = uuid.uuid4().hex[:6]
    with Messenger(t["requests"], settings=kafka_broker.messenger_settings()) as m:
        produce(m, image_messages("mnist", count=3, seed=0, with_labels=True, run_id=run))
        m.send({"id": f"{run}-row", "features": SETOSA}, key=f"{run}-row")
        m.send(v2_request(f"{run}-bad", "iris", "input-0", "FP32", np.array([[1.0]])), key=f"{run}-bad")
    results = wait_results(kafka_broker, t["results"], {f"{run}-mnist-{i}" for i in range(3)} | {f"{run}-row"})
    assert out(results[f"{run}-row"].json(), "label_name") == ["setosa"]
    dead = collect(kafka_broker, t["dlq"], until=lambda got: len(got) >= 1)
    assert dead[0].key_str == f"{run}-bad" and dead[0].header_str("kcp-dlq-status") == "400"


def test_bridge_over_pubsub(pubsub_emulator, bridges, model_server) -> None:
    """The bridge is broker-neutral: the same command on the Pub/Sub backend, against the emulator."""
    run = uuid.uuid4().hex[:6]
    t = {"requests": f"ps-req-{run}", "results": f"ps-res-{run}", "dlq": f"ps-dlq-{run}"}
    settings = pubsub_emulator.messenger_settings()
    env = {"KCP_PUBSUB_EMULATOR_HOST": pubsub_emulator.host, "KCP_PUBSUB_PROJECT": pubsub_emulator.project}
    with Messenger(t["results"], "pubsub", group="reader", settings=settings) as results, \
            Messenger(t["dlq"], "pubsub", group="reader", settings=settings) as dead:
        results.receive(timeout_s=0.1)  # subscriptions exist before the bridge publishes anything
        dead.receive(timeout_s=0.1)
        bridges(t, broker_env=env, group="bridge", grpc_target=model_server.grpc_target,
                extra_args=["--backend", "pubsub"])
        with Messenger(t["requests"], "pubsub", settings=settings) as requests:
            requests.send({"id": f"{run}-1", "features": SETOSA}, key=f"{run}-1")
            requests.send(image_messages("mnist", count=1, seed=2, run_id=run)[0].value, key=f"{run}-img")
            requests.send(b"\xff not json", key=f"{run}-bad")
        got: dict[str, Message] = {}
        for m in results.messages(idle_timeout_s=60):
            got[m.key_str or ""] = m
            results.ack(m)
            if {f"{run}-1", f"{run}-mnist-0"} <= set(got):
                break
        bad = next(iter(dead.messages(idle_timeout_s=60)))
    assert out(got[f"{run}-1"].json(), "label_name") == ["setosa"]
    assert got[f"{run}-mnist-0"].json()["model_name"] == "mnist"
    assert bad.key_str == f"{run}-bad" and bad.header_str("kcp-dlq-kind") == "undecodable"


def test_cli_help_for_every_command() -> None:
    """``python -m streaming {bridge,produce,results,create-topics} --help`` (and ``python -m devtools``'s) need
    no broker or server, and name the variables the commands really read."""
    commands = [("streaming", c) for c in ("bridge", "produce", "results", "create-topics")]
    commands += [("devtools", c) for c in ("broker", "demo", "produce-images")]
    helps = {}
    for module, command in commands:
        done = subprocess.run([sys.executable, "-m", module, command, "--help"], capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert done.returncode == 0 and "usage:" in done.stdout and not done.stderr, (module, command, done.stderr)
        helps[command] = " ".join(done.stdout.split())
    assert "KCP_BRIDGE_BACKEND" in helps["bridge"] and "KCP_MESSENGER_BACKEND" not in helps["bridge"]
    assert "KCP_MESSENGER_BACKEND" in helps["results"]


def test_invalid_settings_name_the_variables_to_fix() -> None:
    """A bad setting is reported as the ``KCP_*`` variable to fix, one line each."""
    env = {**{k: v for k, v in __import__("os").environ.items() if not k.startswith("KCP_")},
           "KCP_KAFKA_SESSION_TIMEOUT_MS": "soon", "KCP_BRIDGE_MAX_PENDING": "0"}
    done = subprocess.run([sys.executable, "-m", "streaming", "bridge", "--health-port", "0", "--max-in-flight", "0"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.returncode == 1
    assert "KCP_KAFKA_SESSION_TIMEOUT_MS: Input should be a valid integer" in done.stderr
    env["KCP_KAFKA_SESSION_TIMEOUT_MS"] = "6000"
    done = subprocess.run([sys.executable, "-m", "streaming", "bridge", "--health-port", "0", "--max-in-flight", "0"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert done.returncode == 1
    assert "KCP_BRIDGE_MAX_IN_FLIGHT" in done.stderr and "KCP_BRIDGE_MAX_PENDING" in done.stderr
    assert "errors.pydantic.dev" not in done.stderr


def test_per_model_target_routes_by_model_name():
    """``{model}`` in the target gives each model its own address (one InferenceService per model)."""
    import asyncio

    from streaming.settings import V2ClientSettings
    from streaming.v2client import PerModelTransport, V2Error, make_transport

    settings = V2ClientSettings(grpc_target="{model}-predictor.ns.svc:8081")
    transport = make_transport(settings)
    assert isinstance(transport, PerModelTransport)
    assert transport._for("iris").settings.grpc_target == "iris-predictor.ns.svc:8081"
    assert transport._for("fashion-mnist").settings.grpc_target == "fashion-mnist-predictor.ns.svc:8081"
    for hostile in ("evil.com:80#", "a/b", "UPPER", ""):
        try:
            transport._for(hostile)
        except V2Error as exc:
            assert exc.kind == "rejected" and exc.status == 400
        else:
            raise AssertionError(f"{hostile!r} was routed")
    asyncio.run(transport.close())
