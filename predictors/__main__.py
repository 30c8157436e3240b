"""``python -m predictors``: serve model packages, validate them, deploy them to Kubernetes.

``serve`` accepts KServe's own server flags in KServe's spelling (``--http_port``,
``--grpc_port``, ``--workers``, ``--max_threads``, ``--enable_grpc``, ...), so the same
arguments work here and in an InferenceService container. ``--workers N`` runs N server
processes on the same ports (:mod:`predictors.runtime.workers`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from predictors.settings import ServerSettings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

logger = logging.getLogger("predictors")


def server_settings(args: argparse.Namespace) -> ServerSettings:
    """The server's settings: the environment's, with the ``serve`` flags given on the command line winning."""
    from predictors.settings import ServerSettings, flag_of

    flags = [name for name, field in ServerSettings.model_fields.items() if flag_of(field)]
    return ServerSettings.from_env(**{name: getattr(args, name, None) for name in flags})


def _serve(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from predictors.settings import explain

    try:
        settings = server_settings(args)
    except ValidationError as exc:
        print(f"python -m predictors serve: invalid settings:\n{explain(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # KCP_API_KEY_FILE names a file that cannot be read
        print(f"python -m predictors serve: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.workers > 1 and args.worker_fds is None:
        from predictors.runtime.workers import supervise

        sys.exit(supervise(args.argv, args.workers, host=settings.host, http_port=args.http_port,
                           grpc_port=args.grpc_port if args.enable_grpc else None,
                           configure_logs=args.configure_logging, log_config_file=args.log_config_file))
    server_kwargs = dict(
        http_port=args.http_port, grpc_port=args.grpc_port, workers=1, max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers, enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url, enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format, event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive)
    if args.worker_fds is not None:
        from predictors.runtime.workers import serve_worker

        serve_worker(args.worker_fds, args.model_dir, settings, **server_kwargs)
    else:
        from predictors.runtime.server import serve

        serve(args.model_dir, settings, **server_kwargs)


TRUST_NOTE = ("a package is code that runs with the server's rights (unpickling model.joblib, loading "
              "model.keras, importing launch.py): serve only packages from sources you trust")


def _validate(args: argparse.Namespace) -> None:
    from predictors.models import ServingContext, model_for
    from predictors.package import PackageError, load_package

    ok = True
    for path in args.packages:
        try:
            package = load_package(path)
            model = model_for(package, ServingContext())
            model.load()
            print(json.dumps({"package": str(path), "name": package.name, "version": package.version, "ok": True,
                              **model.properties(), "trust": TRUST_NOTE}))
        except PackageError as exc:
            ok = False
            print(json.dumps({"package": str(path), "ok": False, "error": str(exc)}))
    sys.exit(0 if ok else 1)


def _package(args: argparse.Namespace) -> None:
    from dataclasses import asdict
    from pathlib import Path

    from predictors.package import PackageError
    from predictors.packaging import PackagingError, package_model

    try:
        report = package_model(Path(args.model), Path(args.out), name=args.name, version=args.version,
                               label_names=args.labels, data=Path(args.data) if args.data else None,
                               description=args.description, force=args.force, pixel_divisor=args.pixel_divisor)
    except (PackagingError, PackageError) as exc:
        print(f"python -m predictors package: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(asdict(report), indent=2))


KSERVE_FLAGS_USED = frozenset({
    "http_port", "grpc_port", "workers", "max_threads", "max_asyncio_workers", "enable_grpc", "enable_docs_url",
    "configure_logging", "log_config_file", "access_log_format", "event_loop", "timeout_keep_alive",
    "grpc_max_send_message_length", "grpc_max_receive_message_length", "ssl_certfile", "ssl_keyfile",
})
"""KServe's server flags that this server honours (:mod:`predictors.runtime.server`, :mod:`.workers`).

The others are for KServe's transformers (``--predictor_host``, ``--model_name``, ...) or act only on
KServe's own model path (``--enable_latency_logging``); they are still accepted, so an
InferenceService that passes them starts, but ``--help`` does not offer them.
"""


def _kserve_flags() -> argparse.ArgumentParser:
    """KServe's server flags, those this server does not use hidden from ``--help``.

    Copies of KServe's actions, so its module-level parser (which KServe parses ``sys.argv`` with
    at import) is left as it is.
    """
    import copy

    from predictors.protocol.kserve_adapter import flag_actions

    flags = argparse.ArgumentParser(add_help=False)
    for action in flag_actions():
        mine = copy.copy(action)
        if mine.dest not in KSERVE_FLAGS_USED:
            mine.help = argparse.SUPPRESS
        elif mine.dest == "workers":  # KServe's text says uvicorn workers; here they are whole server processes
            mine.help = "server processes sharing the REST and gRPC ports (predictors.runtime.workers)"
        flags._add_action(mine)
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m predictors", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve model packages, check them, make them from a fitted model, deploy them to Kubernetes.\n"
                    "'serve --help' lists the server's flags; every setting and its KCP_* variable is in "
                    "docs/settings.md.")
    sub = parser.add_subparsers(dest="command", required=True)

    from predictors.settings import add_flags

    serve = sub.add_parser("serve", parents=[_kserve_flags()], help="serve model packages over V2 REST and gRPC",
                           description="Serve model packages over V2 REST and gRPC. Every flag below also has a "
                                       "KCP_* environment variable or is KServe's; see docs/settings.md.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model_dir", default="/mnt/models",
                       help="a directory of model packages, or one package directory")
    add_flags(serve)
    # Set by predictors.runtime.workers on the worker processes of --workers N: their inherited sockets.
    serve.add_argument("--kcp-worker-fds", dest="worker_fds", default=None, help=argparse.SUPPRESS)
    # KServe logs a latency line per request from its own model path, which requests here do not take.
    serve.set_defaults(func=_serve, enable_latency_logging=False)

    validate = sub.add_parser("validate", help="check packages load (config, labels, artifact)")
    validate.add_argument("packages", nargs="+")
    validate.set_defaults(func=_validate)

    package = sub.add_parser("package", help="turn a fitted scikit-learn classifier (.joblib/.pkl) or a Keras image "
                                             "classifier (.keras) into a checked model package")
    package.add_argument("model", help="the fitted estimator (joblib.dump or pickle) or Keras model (.keras)")
    package.add_argument("--name", required=True, help="model name (a DNS label: lower-case letters, digits, '-')")
    package.add_argument("--out", required=True, help="package directory to write")
    package.add_argument("--version", default="1", help="model version")
    package.add_argument("--labels", nargs="+", default=None,
                         help="class names in the order of the model's classes 0..K-1 (classes that are strings "
                              "name themselves)")
    package.add_argument("--data", default=None,
                         help="CSV of rows the model takes (with its column names): the column types and the probe "
                              "rows the compiled model is checked on come from it")
    package.add_argument("--description", default="")
    package.add_argument("--force", action="store_true", help="replace --out if it exists")
    package.add_argument("--pixel-divisor", dest="pixel_divisor", type=float, default=255.0,
                         help="Keras models: pixels 0..255 are divided by this before the model (1 if the model "
                              "scales its own input)")
    package.set_defaults(func=_package)

    try:
        from predictors.deploy import add_deploy_arguments
    except ImportError:
        pass
    else:
        add_deploy_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve" and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --workers passes on to each worker
    args.func(args)


if __name__ == "__main__":
    main()
