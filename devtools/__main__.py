"""``python -m devtools {broker,demo,produce-images}``: development tools, outside the bridge image.

* ``broker`` runs the embedded tansu Kafka broker (``start`` in the background with a pid file, ``run`` in
  the foreground, ``stop``) for the demo, the tests and anyone without a Kafka cluster.
* ``demo`` runs the whole platform end to end on embedded defaults (``make demo``).
* ``produce-images`` sends random Fashion-MNIST / MNIST test images as base64 PNG requests.

Exit status is 0 on success, 1 on a handled failure (message printed), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from streaming.__main__ import DEFAULT_TOPICS, LEVELS, messenger_flags, send
from streaming.settings import describe_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devtools",
        description="Development tools, outside every image: the embedded Kafka broker, the end-to-end demo and "
                    "the test-image producer.")
    sub = parser.add_subparsers(dest="command", required=True)

    k = sub.add_parser("broker", help="the embedded tansu Kafka broker")
    ksub = k.add_subparsers(dest="action", required=True)
    ks = ksub.add_parser("start", help="start in the background, create topics, write a pid file")
    ks.add_argument("--port", type=int, default=9092, help="default %(default)s")
    ks.add_argument("--host", default="127.0.0.1", help="default %(default)s")
    ks.add_argument("--topics", default=DEFAULT_TOPICS, help="name[:partitions],...")
    ks.add_argument("--pidfile", type=Path, default=Path(".demo/broker.pid"))
    ks.add_argument("--logfile", type=Path, default=Path(".demo/broker.log"))
    kr = ksub.add_parser("run", help="run in the foreground until SIGTERM/Ctrl-C")
    kr.add_argument("--port", type=int, default=9092, help="default %(default)s")
    kr.add_argument("--host", default="127.0.0.1", help="default %(default)s")
    kr.add_argument("--topics", default=DEFAULT_TOPICS, help="name[:partitions],...")
    kt = ksub.add_parser("stop", help="stop the broker named by a pid file")
    kt.add_argument("--pidfile", type=Path, default=Path(".demo/broker.pid"))
    for q in (ks, kr, kt):
        q.add_argument("--log-level", default="INFO", choices=LEVELS, help="default %(default)s")

    d = sub.add_parser("demo", help="end to end on embedded defaults: broker, server, bridge, data, feedback report")
    d.add_argument("--model-dir", type=Path, default=Path("models"),
                   help="trained packages, quick ones if missing (default %(default)s)")
    d.add_argument("--work-dir", type=Path, default=Path(".demo"),
                   help="logs, feedback database, quick packages (default %(default)s)")
    d.add_argument("--iris-delay", type=float, default=0.02, help="seconds between Iris rows (default %(default)s)")
    d.add_argument("--images", type=int, default=20,
                   help="Fashion-MNIST images to send, half as many MNIST (default %(default)s)")
    d.add_argument("--log-level", default="WARNING", choices=LEVELS, help="default %(default)s")

    pm = sub.add_parser("produce-images", help="send random Fashion-MNIST / MNIST test images as base64 PNG")
    messenger_flags(pm)
    pm.add_argument("--dataset", choices=["fashion-mnist", "mnist"], default="fashion-mnist")
    pm.add_argument("--model", help="model name (default: the dataset name)")
    pm.add_argument("--count", type=int, default=20, help="default %(default)s")
    pm.add_argument("--seed", type=int)
    pm.add_argument("--with-labels", action="store_true", help="include the true label for feedback")
    pm.add_argument("--delay", type=float, default=0.0, help="seconds between images (default %(default)s)")
    pm.add_argument("--topic", default="kcp-requests", help="default %(default)s")
    pm.add_argument("--run-id", help="prefix of request ids (default: a timestamp)")
    return parser


def cmd_broker(args: argparse.Namespace) -> int:
    from devtools import broker

    if args.action == "stop":
        stopped = broker.stop_from_pidfile(args.pidfile)
        print("broker stopped" if stopped else f"no running broker in {args.pidfile}", flush=True)
        return 0
    topics = broker.parse_topics(args.topics)
    if args.action == "start":
        if args.pidfile.exists():
            broker.stop_from_pidfile(args.pidfile)
        args.logfile.parent.mkdir(parents=True, exist_ok=True)
        b = broker.EmbeddedBroker(args.host, args.port, log_path=args.logfile).start(detach=True)
        try:
            b.create_topics(topics)
        except Exception:
            b.stop()
            raise
        assert b.process is not None
        broker.write_pidfile(args.pidfile, b.process.pid, broker.tansu_binary(), b.bootstrap_servers)
        print(f"broker on {b.bootstrap_servers} (pid {b.process.pid}), topics {topics}", flush=True)
        return 0
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with broker.EmbeddedBroker(args.host, args.port) as b:
        b.create_topics(topics)
        print(f"broker on {b.bootstrap_servers}, topics {topics}; Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            done.wait()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from devtools.demo import run_demo

    return run_demo(args.model_dir, args.work_dir, iris_delay=args.iris_delay, images=args.images)


def cmd_produce_images(args: argparse.Namespace) -> int:
    from devtools.images import image_messages

    args.what = "images"
    messages = image_messages(args.dataset, count=args.count, seed=args.seed, with_labels=args.with_labels,
                              model=args.model, run_id=args.run_id)
    return send(messages, args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, args.log_level)))
    commands = {"broker": cmd_broker, "demo": cmd_demo, "produce-images": cmd_produce_images}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except ValidationError as exc:  # settings from flags or KCP_* variables: name the variables
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # one line for the user, the trace at DEBUG
        logging.getLogger("devtools").debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
