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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

logger = logging.getLogger("predictors")


def _serve(args: argparse.Namespace) -> None:
    from predictors.settings import ServerSettings

    settings = ServerSettings.from_env(host=args.host, max_batch_size=args.max_batch_size,
                                       max_latency_ms=args.max_latency_ms, metrics_auth=args.metrics_auth,
                                       access_log=args.access_log)
    if args.workers > 1 and args.worker_fds is None:
        from predictors.runtime.workers import supervise

        sys.exit(supervise(args.argv, args.workers, host=args.host, http_port=args.http_port,
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


def _validate(args: argparse.Namespace) -> None:
    from predictors.models import ServingContext, model_for
    from predictors.package import PackageError, load_package

    ok = True
    for path in args.packages:
        try:
            package = load_package(path)
            model_for(package, ServingContext()).load()
            print(json.dumps({"package": str(path), "name": package.name, "version": package.version, "ok": True}))
        except PackageError as exc:
            ok = False
            print(json.dumps({"package": str(path), "ok": False, "error": str(exc)}))
    sys.exit(0 if ok else 1)


def _package(args: argparse.Namespace) -> None:
    from dataclasses import asdict
    from pathlib import Path

    from predictors.package import PackageError
    from predictors.packaging import PackagingError, package_estimator

    try:
        report = package_estimator(Path(args.model), Path(args.out), name=args.name, version=args.version,
                                   label_names=args.labels, data=Path(args.data) if args.data else None,
                                   description=args.description, force=args.force)
    except (PackagingError, PackageError) as exc:
        print(f"python -m predictors package: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(asdict(report), indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m predictors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    from kserve.model_server import parser as kserve_parser

    serve = sub.add_parser("serve", parents=[kserve_parser], help="serve model packages over V2 REST and gRPC",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--model_dir", default="/mnt/models",
                       help="a directory of model packages, or one package directory")
    serve.add_argument("--host", default=os.environ.get("KCP_HOST", "0.0.0.0"), help="bind address for REST and gRPC")
    serve.add_argument("--max_batch_size", type=int, default=None,
                       help="adaptive batching: most rows per model call (overrides package configs; 1 = off)")
    serve.add_argument("--max_latency_ms", type=float, default=None,
                       help="adaptive batching: longest wait for a batch to fill (overrides package configs)")
    serve.add_argument("--metrics-auth", dest="metrics_auth", action="store_true", default=None,
                       help="require the API key for /metrics and /openapi.json too (default: open, for Prometheus; "
                            "env KCP_METRICS_AUTH)")
    serve.add_argument("--access-log", dest="access_log", action="store_true", default=None,
                       help="log one line per HTTP request (default: off; env KCP_ACCESS_LOG)")
    # Set by predictors.runtime.workers on the worker processes of --workers N: their inherited sockets.
    serve.add_argument("--kcp-worker-fds", dest="worker_fds", default=None, help=argparse.SUPPRESS)
    # KServe logs a latency line per request by default; like the access log, that is opt-in here.
    serve.set_defaults(func=_serve, enable_latency_logging=False)

    validate = sub.add_parser("validate", help="check packages load (config, labels, artifact)")
    validate.add_argument("packages", nargs="+")
    validate.set_defaults(func=_validate)

    package = sub.add_parser("package", help="turn a fitted scikit-learn classifier (.joblib/.pkl) into a checked "
                                             "model package")
    package.add_argument("model", help="the fitted estimator, saved with joblib.dump or pickle")
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
