"""Wiring: one ``kserve.ModelServer`` process serving every package over V2 REST and gRPC.

What this adds to KServe 0.21 (each for a reason KServe's defaults do not cover):

* binds a configurable host (KServe hard-codes 0.0.0.0 / [::]);
* a real model repository (load / reload / unload from the model directory);
* API-key auth, body limits and request metrics as REST middleware and gRPC interceptors;
* the direct V2 path (:mod:`predictors.protocol.v2`) for ``/infer`` and ``ModelInfer``: strict parsing,
  bytes → numpy → bytes, one error mapping (``predictors.protocol.errors``) for both protocols;
* the feedback API and the prediction log it joins against;
* model metadata with the package's version and framework.

Prediction ids (for feedback): a single-row request's prediction id is
``<response id>:<server part>``, row ``i`` of a batch request has
``<response id>:<server part>/<i>``, returned in the ``prediction_id`` output. The server part
is unique per prediction, so clients that reuse a request id never overwrite each other's
predictions; the response ``id`` stays the request id (cut to its first 200 characters in the
prediction id, so every prediction id fits the feedback store).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kserve
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
from kserve.errors import ModelNotReady
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension
from kserve.protocol.rest.server import RESTServer
from kserve.protocol.rest.v2_endpoints import V2Endpoints
from timing_asgi import TimingMiddleware

from predictors.feedback.prediction_log import WriteBehindLog
from predictors.models import ServingContext
from predictors.package import LabelsFile, PackageError
from predictors.protocol.auth import APIKey
from predictors.protocol.errors import BadInput, ClientError, UnknownModel
from predictors.protocol.grpc_server import GRPCEndpoint
from predictors.protocol.kserve_adapter import fastapi_app, parsed_flags, remove_middleware, uvicorn_server
from predictors.protocol.middleware import ServingMiddleware
from predictors.protocol.observability import use_json_logs
from predictors.protocol.rest import (
    InferEndpoint,
    install_error_handlers,
    install_internal_error_handlers,
    register_version_routes,
)
from predictors.runtime.heap import freeze_loaded_heap
from predictors.runtime.repository import PackageRepository
from predictors.settings import ServerSettings

if TYPE_CHECKING:  # the feedback package is optional (imported when the server opens the store)
    from predictors.feedback import FeedbackStore

logger = logging.getLogger(__name__)

# KServe 0.21 uses ORJSONResponse, which FastAPI >= 0.165 deprecates with a warning per request.
warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")

FEEDBACK_FLUSH_TIMEOUT_S = 5.0  # feedback waits this long for queued predictions, then looks them up anyway
SHUTDOWN_FLUSH_TIMEOUT_S = 20.0  # within Kubernetes' default 30 s termination grace period

EXTENSIONS = ["model_repository_extension", "binary_tensor_data", "feedback"]


class ClassifierDataPlane(DataPlane):
    """KServe's data plane with honest server metadata and versioned model metadata."""

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "extensions": EXTENSIONS}

    async def model_metadata(self, model_name: str) -> dict[str, Any]:
        metadata = await super().model_metadata(model_name)
        model = self.get_model_from_registry(model_name)
        config = getattr(model, "config", None)
        if config is not None:
            metadata.update(versions=[config.version], platform=config.framework)
        properties = getattr(model, "properties", None)
        if properties is not None:  # the gRPC ModelMetadataResponse's ``properties`` map, as a JSON object
            metadata["properties"] = properties()
        return metadata


class PackageRepositoryExtension(ModelRepositoryExtension):
    """KServe's extension turns every load failure into a 503; keep 404 and 400 where they apply."""

    def __init__(self, model_registry: PackageRepository) -> None:
        super().__init__(model_registry=model_registry)
        self.repository = model_registry

    async def load(self, model_name: str) -> None:
        try:
            await self.repository.load(model_name)
        except ClientError:
            raise
        except PackageError as exc:
            raise BadInput(str(exc)) from exc
        except Exception as exc:
            raise ModelNotReady(model_name, f"{type(exc).__name__}: {exc}") from exc


class BoundRESTServer(RESTServer):
    """KServe's REST server on a chosen host, access log optional, without KServe's timing middleware,
    and with ``front`` (our :class:`ServingMiddleware`) as the outermost ASGI app.

    The timing middleware logs per-request timings to ``kserve.trace``; :class:`ServingMiddleware`
    already measures every inference request as a Prometheus histogram, and each ASGI layer costs
    time on every request. In front of FastAPI rather than inside it, ``/infer`` skips FastAPI's and
    Starlette's own layers (error, telemetry and body-limit wrappers, a noticeable share of the CPU of a
    small model's request); every other route still goes through the whole app. uvicorn's access log is one
    more log line per request: off unless asked for.
    """

    def __init__(self, *args: Any, host: str, access_log: bool, front: Callable[[Any], Any],
                 sockets: list[socket.socket] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = host
        self._front = front
        self._sockets = sockets
        if not access_log:  # uvicorn logs access whenever its logger has a handler (uvicorn.Config does the same)
            access_logger = logging.getLogger("uvicorn.access")
            access_logger.handlers = []
            access_logger.propagate = False

    def create_application(self) -> None:
        super().create_application()
        app = fastapi_app()
        remove_middleware(app, TimingMiddleware)
        install_internal_error_handlers(app)  # after KServe's: theirs answer 500s with the exception text

    async def start(self) -> None:
        """KServe's ``start``, on ``sockets`` when given (``--workers``: the one REST socket all workers share)."""
        self.create_application()
        self.config.app = self._front(fastapi_app())  # uvicorn loads it in serve()
        await uvicorn_server(self).serve(sockets=self._sockets)


class ClassifierServer(kserve.ModelServer):
    """The model server: KServe's, plus the pieces listed in this module's docstring."""

    rest_sockets: list[socket.socket] | None = None
    """Sockets to serve REST on instead of binding ``host:http_port`` (set by :mod:`predictors.runtime.workers`)."""

    def __init__(self, model_dir: str | Path, settings: ServerSettings, **kwargs: Any) -> None:
        use_json_logs(settings.log_format)  # before KServe configures logging in super().__init__
        self.settings = settings
        self.feedback_store = _open_feedback_store(settings)
        self.context = ServingContext(settings=settings, prediction_log=self.feedback_store)
        self.repository = PackageRepository(model_dir, self.context)
        super().__init__(registered_models=self.repository, **kwargs)
        _log_like_kserve()
        self.dataplane = ClassifierDataPlane(model_registry=self.repository)
        self.model_repository_extension = PackageRepositoryExtension(model_registry=self.repository)
        self.api_key = (APIKey(settings.api_key, key_file=settings.api_key_file, overlap_s=settings.api_key_overlap_s)
                        if settings.api_key else None)
        if self.api_key is None and not _is_loopback(settings.host):
            logger.warning("serving on %s without an API key: anyone who can reach this address can call every "
                           "model and the repository API; set KCP_API_KEY or KCP_API_KEY_FILE", settings.host)

    def _configure_app(self) -> None:
        """Routes, middleware and handlers on KServe's module-level app, before KServe adds its own."""
        app = fastapi_app()
        install_error_handlers(app)
        register_version_routes(app, V2Endpoints(self.dataplane, self.model_repository_extension))
        if self.feedback_store is not None:
            from predictors.feedback import build_feedback_router

            writer = self.context.log_writer()
            flush = None if writer is None else functools.partial(_flush_for_feedback, writer, self.feedback_store)
            app.include_router(build_feedback_router(
                self.feedback_store, self._labels_of, flush_predictions=flush,
                unknown_id_retry_s=writer.flush_interval_s if writer is not None else 0.0,
                get_version=self._version_of))
        if self.settings.ui:
            try:
                from predictors.ui import mount_ui
            except ImportError:
                pass
            else:
                mount_ui(app, self.repository.get_model)

    def _start_retention(self) -> None:
        """Prune the prediction log now and every hour, in a daemon thread (never on the event loop)."""
        store = self.feedback_store
        if store is None:
            return
        keep = timedelta(days=self.settings.prediction_retention_days)

        def prune_forever() -> None:
            while True:
                try:
                    removed = store.prune_predictions(datetime.now(UTC) - keep)
                    if removed:
                        logger.info("pruned %d logged predictions older than %s", removed, keep)
                except Exception:  # retry next hour
                    logger.exception("pruning the prediction log failed")
                time.sleep(3600)

        threading.Thread(target=prune_forever, name="prediction-log-retention", daemon=True).start()

    def _version_of(self, name: str) -> str | None:
        """The version served now under ``name`` (None if none is): what feedback without ids is about."""
        config = getattr(self.repository.get_model(name), "config", None)
        return None if config is None else config.version

    def _labels_of(self, model_name: str) -> LabelsFile:
        model = self.repository.get_model(model_name)
        if model is None or not hasattr(model, "package"):
            raise UnknownModel(model_name)
        return model.package.labels

    def start(self, models: list | None = None) -> None:  # type: ignore[override]
        """Load every package, then serve REST and gRPC until a signal arrives."""
        loaded = self.repository.load_all() if models is None else models
        for model in loaded:
            model.enable_latency_logging = self.enable_latency_logging
            model.start()
        self._configure_app()
        self._start_retention()
        self._rest_server = BoundRESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension,
            self.http_port, host=self.settings.host, access_log=self.settings.access_log,
            access_log_format=self.access_log_format, workers=1, sockets=self.rest_sockets,
            front=functools.partial(ServingMiddleware, max_body_bytes=self.settings.max_body_bytes, key=self.api_key,
                                    metrics_auth=self.settings.metrics_auth,
                                    infer=InferEndpoint(self.repository, self.settings.max_body_bytes,
                                                        self.settings.max_json_values)),
            grace_period=self.grace_period, event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            flags = parsed_flags()
            self._grpc_server = GRPCEndpoint(
                self.settings.host, self.grpc_port, self.dataplane, self.model_repository_extension, self.api_key,
                front=self.settings.grpc_front, max_workers=self.max_threads,
                max_send_bytes=flags.grpc_max_send_message_length,
                max_receive_bytes=flags.grpc_max_receive_message_length, grace_period=self.grace_period)
            self.servers.append(self._grpc_server.serve())
        self.register_signal_handler()
        freeze_loaded_heap()
        with asyncio.Runner(loop_factory=self._loop_factory()) as runner:
            asyncio.set_event_loop(runner.get_loop())
            self.setup_event_loop()  # KServe's thread pool size and exception handler, on the loop that serves
            runner.run(self._serve_then_drain())

    def _loop_factory(self) -> Any:
        """uvloop only when asked for (``--event-loop uvloop``): it did not serve these models faster than
        asyncio's own loop, so ``auto`` keeps the standard one."""
        if self.event_loop == "uvloop":
            import uvloop

            return uvloop.new_event_loop
        return None

    async def _serve_then_drain(self) -> None:
        """Serve until stopped, then write every queued prediction-log row and close the store."""
        await asyncio.gather(*self.servers)
        writer = self.context.log_writer()
        if writer is not None:
            await writer.close(SHUTDOWN_FLUSH_TIMEOUT_S)
        if self.feedback_store is not None:
            self.feedback_store.close()

    def stop(self, sig: int) -> None:
        """Graceful shutdown: stop accepting, let in-flight requests finish (then ``_serve_then_drain``)."""

        async def shutdown() -> None:
            if self._grpc_server:
                await self._grpc_server.stop()
            if self._rest_server:
                uvicorn_server(self._rest_server).should_exit = True

        asyncio.get_event_loop().create_task(shutdown())


def _flush_for_feedback(writer: WriteBehindLog, store: FeedbackStore) -> Awaitable[bool]:
    """Write queued predictions before feedback looks them up; False at once while the writer fails
    and the store was last seen down: waiting out the timeout would only delay the feedback API's 503."""
    down = writer.failing and not store.health().available
    return writer.flush(0.0 if down else FEEDBACK_FLUSH_TIMEOUT_S)


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _log_like_kserve() -> None:
    """Our INFO lines (the inline-predict choice, prediction-log outages) through KServe's configured handler;
    without this only warnings of ``predictors.*`` would reach the log."""
    kserve_logger = logging.getLogger("kserve")
    if kserve_logger.handlers:
        ours = logging.getLogger("predictors")
        ours.setLevel(logging.INFO)
        ours.handlers = list(kserve_logger.handlers)
        ours.propagate = False


def _open_feedback_store(settings: ServerSettings):
    try:
        from predictors.feedback import FeedbackStore
    except ImportError:
        logger.warning("predictors.feedback is not available; feedback API disabled")
        return None
    return FeedbackStore(settings.feedback_db_url, connect_timeout_s=settings.feedback_db_connect_timeout_s,
                         statement_timeout_s=settings.feedback_db_statement_timeout_s,
                         retry_after_s=settings.feedback_db_retry_s)


def serve(model_dir: str | Path, settings: ServerSettings, *,
          server_class: Callable[..., ClassifierServer] = ClassifierServer, **server_kwargs: Any) -> None:
    """Entry point used by ``python -m predictors serve`` (``server_class``: a ``--workers`` worker's)."""
    server = server_class(model_dir, settings, **server_kwargs)
    try:
        server.start()
    except PackageError as exc:
        logger.error("%s", exc)
        sys.exit(2)
