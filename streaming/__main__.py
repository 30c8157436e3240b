"""``python -m streaming {bridge,produce,results,create-topics}``: the streaming command line.

Flags override the ``KCP_*`` environment (see :mod:`streaming.settings`); anything not given on
the command line comes from the environment, then from the defaults. Exit status is 0 on success,
1 on a handled failure (message printed), 2 on a usage error (argparse). The embedded broker, the
demo and the test-image producer are development tools: ``python -m devtools``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from streaming.settings import (
    BridgeSettings,
    KafkaSettings,
    MessengerSettings,
    PubSubSettings,
    V2ClientSettings,
    describe_error,
)


def messenger_flags(p: argparse.ArgumentParser, backend_env: str = "KCP_MESSENGER_BACKEND") -> None:
    """The flags of every command that talks to a broker; ``backend_env`` names the variable its backend is read
    from (the bridge's settings read ``KCP_BRIDGE_BACKEND``, the other commands ``KCP_MESSENGER_BACKEND``)."""
    p.add_argument("--backend", choices=["kafka", "pubsub"], help=f"message broker (env {backend_env}, default kafka)")
    p.add_argument("--bootstrap-servers",
                   help="Kafka address (env KCP_KAFKA_BOOTSTRAP_SERVERS, default 127.0.0.1:9092)")
    p.add_argument("--pubsub-project", help="Pub/Sub project (env KCP_PUBSUB_PROJECT, default kcp-local)")
    p.add_argument("--log-level", default="INFO", choices=LEVELS, help="default INFO")


def _given(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _kafka(args: argparse.Namespace) -> KafkaSettings:
    return KafkaSettings(**_given(bootstrap_servers=args.bootstrap_servers))


def _pubsub(args: argparse.Namespace) -> PubSubSettings:
    return PubSubSettings(**_given(project=args.pubsub_project))


def _messenger(args: argparse.Namespace) -> MessengerSettings:
    return MessengerSettings(**_given(backend=args.backend), kafka=_kafka(args), pubsub=_pubsub(args))


DEFAULT_TOPICS = "kcp-requests:3,kcp-results:3,kcp-dead-letters:1"
LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streaming",
        description="The streaming command line: the Kafka / Pub/Sub bridge to a V2 model server, a CSV row "
                    "producer, the results reader and topic creation.",
        epilog="Flags override KCP_* variables, which override the defaults. Variables without a flag (SASL/TLS, "
               "API key, retries, ...) are listed in streaming/settings.py. Development tools (embedded broker, "
               "demo, test images): python -m devtools.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bridge", help="consume requests, call the V2 model server, publish results")
    messenger_flags(b, "KCP_BRIDGE_BACKEND")
    b.add_argument("--request-topic", help="env KCP_BRIDGE_REQUEST_TOPIC (default kcp-requests)")
    b.add_argument("--result-topic", help="env KCP_BRIDGE_RESULT_TOPIC (default kcp-results)")
    b.add_argument("--dead-letter-topic", help="env KCP_BRIDGE_DEAD_LETTER_TOPIC (default kcp-dead-letters)")
    b.add_argument("--group", help="consumer group (env KCP_BRIDGE_GROUP, default kcp-bridge)")
    b.add_argument("--source", choices=["broker", "http"],
                   help="broker: consume the request topic; http: receive CloudEvents a Knative KafkaSource pushes "
                        "(env KCP_BRIDGE_SOURCE, default broker)")
    b.add_argument("--http-host", help="source http: bind address (env KCP_BRIDGE_HTTP_HOST, default 127.0.0.1)")
    b.add_argument("--http-port", type=int, help="source http: port, 0 = any free (env KCP_BRIDGE_HTTP_PORT, "
                                                 "default 8080)")
    b.add_argument("--protocol", choices=["grpc", "rest"], help="V2 transport (env KCP_V2_PROTOCOL, default grpc)")
    b.add_argument("--grpc-target", help="host:port of V2 gRPC; {model} in it routes per model "
                                         "(env KCP_V2_GRPC_TARGET, default 127.0.0.1:8081)")
    b.add_argument("--rest-url", help="base URL of V2 REST; {model} in it routes per model "
                                      "(env KCP_V2_REST_URL, default http://127.0.0.1:8080)")
    b.add_argument("--max-in-flight", type=int, help="concurrent V2 calls (env KCP_BRIDGE_MAX_IN_FLIGHT, default 8)")
    b.add_argument("--max-batch-size", type=int,
                   help="requests per V2 call, 1 disables batching (env KCP_BRIDGE_MAX_BATCH_SIZE, default 64)")
    b.add_argument("--max-batch-delay-ms", type=float,
                   help="how long a batch may wait to fill (env KCP_BRIDGE_MAX_BATCH_DELAY_MS, default 5)")
    b.add_argument("--max-pending", type=int, help="consumed-but-unacknowledged limit before pausing "
                                                   "(env KCP_BRIDGE_MAX_PENDING, default 512)")
    b.add_argument("--max-pending-bytes", type=int, help="the same limit in bytes those messages keep alive, decoded "
                                                         "(env KCP_BRIDGE_MAX_PENDING_BYTES, default 64 MiB)")
    b.add_argument("--message-deadline", type=float, dest="message_deadline_s",
                   help="seconds after which a message still unanswered is dead-lettered "
                        "(env KCP_BRIDGE_MESSAGE_DEADLINE_S, default 600)")
    b.add_argument("--max-batch-rows", type=int, help="rows of one merged V2 call when the model's metadata "
                                                      "publishes no max_batch_size (env KCP_V2_MAX_BATCH_ROWS, "
                                                      "default 256)")
    b.add_argument("--max-call-bytes", type=int, help="payload cap of one merged V2 call (env KCP_V2_MAX_CALL_BYTES, "
                                                      "default 8 MiB - 64 KiB: the server's gRPC receive limit)")
    b.add_argument("--drain-timeout", type=float, dest="drain_timeout_s",
                   help="seconds to finish work on SIGTERM (env KCP_BRIDGE_DRAIN_TIMEOUT_S, default 30)")
    b.add_argument("--health-host", help="bind address of /healthz /readyz /metrics "
                                         "(env KCP_BRIDGE_HEALTH_HOST, default 127.0.0.1)")
    b.add_argument("--health-port", type=int, help="port of /healthz /readyz /metrics, 0 = any free "
                                                   "(env KCP_BRIDGE_HEALTH_PORT, default 8090)")
    b.add_argument("--session-timeout-ms", type=int,
                   help="Kafka group session timeout (env KCP_KAFKA_SESSION_TIMEOUT_MS, default 10000)")

    p = sub.add_parser("produce", help="send requests (tabular rows from a CSV; test images: python -m devtools)")
    psub = p.add_subparsers(dest="what", required=True)
    pi = psub.add_parser("iris", help="stream the Iris test split row by row")
    messenger_flags(pi)
    pi.add_argument("--csv", type=Path, default=Path("models/iris/test.csv"),
                    help="test split written by training (default %(default)s)")
    pi.add_argument("--form", choices=["row", "features", "v2"], default="row",
                    help="message form (default %(default)s)")
    pi.add_argument("--model", default="iris", help="default %(default)s")
    pi.add_argument("--delay", type=float, default=1.0,
                    help="seconds between rows, 0 = full-speed replay (default %(default)s)")
    pi.add_argument("--count", type=int, help="stop after this many rows")
    pi.add_argument("--repeat", type=int, default=1, help="send the split this many times (default %(default)s)")
    pi.add_argument("--topic", default="kcp-requests", help="default %(default)s")
    pi.add_argument("--run-id", help="prefix of request ids (default: a timestamp)")

    r = sub.add_parser("results", help="print results; --feedback scores them on the model server")
    messenger_flags(r)
    r.add_argument("--topic", default="kcp-results", help="default %(default)s")
    r.add_argument("--group", help="consumer group; without one, read the whole topic without committing")
    r.add_argument("--count", type=int, help="stop after this many unique results")
    r.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds without a result before stopping (default %(default)s)")
    r.add_argument("--feedback", action="store_true", help="POST predicted/true label pairs to the model server")
    r.add_argument("--server-url", default="http://127.0.0.1:8080",
                   help="model server REST base URL (default %(default)s)")
    r.add_argument("--api-key", help="model server API key (default env KCP_API_KEY)")
    r.add_argument("--quiet", action="store_true", help="print only the report")

    t = sub.add_parser("create-topics", help="create missing topics on a Kafka cluster, with their partition counts")
    t.add_argument("--bootstrap-servers",
                   help="Kafka address (env KCP_KAFKA_BOOTSTRAP_SERVERS, default 127.0.0.1:9092)")
    t.add_argument("--topics", default=DEFAULT_TOPICS, help="name[:partitions],... (default %(default)s)")
    t.add_argument("--replication-factor", type=int, default=1, help="default 1")
    t.add_argument("--log-level", default="INFO", choices=LEVELS, help="default INFO")
    return parser


# --- commands ----------------------------------------------------------------------------------


def cmd_bridge(args: argparse.Namespace) -> int:
    from streaming.bridge import run_bridge

    kafka = KafkaSettings(**_given(bootstrap_servers=args.bootstrap_servers,
                                   session_timeout_ms=args.session_timeout_ms))
    v2 = V2ClientSettings(**_given(protocol=args.protocol, grpc_target=args.grpc_target, rest_url=args.rest_url,
                                   max_call_bytes=args.max_call_bytes, max_batch_rows=args.max_batch_rows))
    settings = BridgeSettings(**_given(
        backend=args.backend, request_topic=args.request_topic, result_topic=args.result_topic,
        dead_letter_topic=args.dead_letter_topic, group=args.group, source=args.source, http_host=args.http_host,
        http_port=args.http_port, max_in_flight=args.max_in_flight,
        max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
        max_pending=args.max_pending, max_pending_bytes=args.max_pending_bytes,
        message_deadline_s=args.message_deadline_s, drain_timeout_s=args.drain_timeout_s, health_host=args.health_host,
        health_port=args.health_port), kafka=kafka, pubsub=_pubsub(args), v2=v2)
    run_bridge(settings)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from streaming import producers

    if not args.csv.is_file():
        print(f"{args.csv} not found: train the Iris model first (it writes the test split)", file=sys.stderr)
        return 1
    messages = list(producers.repeat(producers.iris_messages(args.csv, form=args.form, model=args.model,
                                                             run_id=args.run_id), args.repeat))
    if args.count is not None:
        messages = messages[: args.count]
    return send(messages, args)


def send(messages: list[Any], args: argparse.Namespace) -> int:
    """Send producer messages to ``args.topic`` on the messenger the common flags name."""
    from streaming import producers
    from streaming.messenger import Messenger

    with Messenger(args.topic, settings=_messenger(args)) as messenger:
        sent = producers.produce(messenger, messages, delay_s=args.delay,
                                 on_sent=lambda m: logging.getLogger("streaming.produce").debug("sent %s", m.key))
    print(f"sent {sent} {args.what} request(s) to {args.topic}", flush=True)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    import os

    from streaming.messenger import Messenger
    from streaming.results import FeedbackSender, consume_results

    feedback = None
    if args.feedback:
        feedback = FeedbackSender(args.server_url, args.api_key or os.environ.get("KCP_API_KEY"))
    with Messenger(args.topic, group=args.group, settings=_messenger(args)) as messenger:
        report = consume_results(messenger, count=args.count, idle_timeout_s=args.idle_timeout, feedback=feedback,
                                 out=None if args.quiet else sys.stdout)
    if feedback is not None:
        feedback.close()
    print("\n".join(report.lines()), flush=True)
    return 1 if args.count is not None and report.results < args.count else 0


def cmd_create_topics(args: argparse.Namespace) -> int:
    from streaming.topics import create_topics, parse_topics

    bootstrap = args.bootstrap_servers or KafkaSettings().bootstrap_servers
    created = create_topics(bootstrap, parse_topics(args.topics), replication_factor=args.replication_factor)
    print(f"created {created or 'nothing (all exist)'} on {bootstrap}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, args.log_level)))
    # kafka-python's own IO loop warns "blocking the event loop" when the CPU is busy; that is its
    # internal thread, not the bridge's asyncio loop, so the warning only misleads here.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    commands = {"bridge": cmd_bridge, "produce": cmd_produce, "results": cmd_results,
                "create-topics": cmd_create_topics}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except ValidationError as exc:  # settings from flags or KCP_* variables: name the variables
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line for the user, the trace at DEBUG
        logging.getLogger("streaming").debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
