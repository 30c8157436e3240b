"""``serve --workers N``: N server processes behind one REST port and one gRPC port.

One Python process serves on about one core (the GIL), so a node with spare cores serves more
with more processes. Each worker is a complete :class:`~predictors.runtime.server.ClassifierServer`:
its own models, batcher, prediction-log writer and ``/metrics``; the feedback database
(``KCP_FEEDBACK_DB_URL``: SQLite in WAL mode, or PostgreSQL) is the one thing they share, so
feedback sent to any worker finds a prediction answered by any other (the feedback API looks
for an unknown id from one flush interval on, until the other worker's write has landed).

How the processes are arranged, and why:

* **The supervisor** (the process started as ``serve --workers N``) loads no model and serves
  nothing. It binds the REST socket (workers listen on it and accept from one queue) and binds
  a placeholder on the gRPC port with ``SO_REUSEPORT`` (never listening, so it gets no
  connections): a port in use fails here, once, with a clear message; port 0 is resolved once
  for every worker; the port stays ours while a worker restarts.
* **Workers are fresh interpreters** (``python -m predictors serve ... --workers 1`` plus the
  inherited sockets), not forks: forking a process that has started TensorFlow or gRPC threads
  is unsafe. gRPC servers bind the shared port themselves (``grpc.so_reuseport`` is on by
  default on Linux; the kernel spreads connections over them).
* **A control socket per worker** (JSON lines): the worker says :data:`READY` once its packages
  are loaded and its loop is about to serve, and reports each hot swap it did
  (``/v2/repository/models/{m}/load`` or ``unload``), which the supervisor passes on to the other
  workers so that all serve the same version. End of file tells the supervisor the worker is
  gone, and tells the worker its supervisor is gone (it then stops itself as on SIGTERM, so no
  orphan keeps the port).
* **Signals**: SIGTERM or SIGINT is passed on to every worker as SIGTERM and the supervisor waits
  for them (each drains its requests and writes its queued prediction-log rows), at most
  :data:`STOP_TIMEOUT_S`, then kills what is left.
* **Failures**: a worker that exits before the first start completed stops everything and the
  supervisor exits with its code (2 for a broken package, as without workers); a worker that
  dies later is restarted after a back-off that doubles from :data:`RESTART_BACKOFF_S` up to
  :data:`MAX_RESTART_BACKOFF_S`, and is reset once a worker has run :data:`STABLE_AFTER_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kserve.logging import configure_logging

from predictors.runtime.server import ClassifierServer, PackageRepositoryExtension, _log_like_kserve, serve
from predictors.settings import ServerSettings

logger = logging.getLogger(__name__)

WORKER_FDS_FLAG = "--kcp-worker-fds"
"""Hidden ``serve`` option that makes a process a worker: ``<REST socket fd>,<control socket fd>``."""
READY = "ready"
RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 30.0
STABLE_AFTER_S = 30.0
STOP_TIMEOUT_S = 60.0
"""Longest wait for workers to drain after SIGTERM: KServe's 30 s grace period plus the log's last flush."""
TICK_S = 0.2


# --- the worker side -------------------------------------------------------------------------------


class SharedRepositoryExtension(PackageRepositoryExtension):
    """Hot swap in every worker: load or unload here, then ``announce`` it (to the supervisor, who tells
    the other workers to do the same)."""

    def __init__(self, registry: Any, announce: Callable[[dict[str, str]], None]) -> None:
        super().__init__(model_registry=registry)
        self._announce = announce

    async def load(self, model_name: str, *, announce: bool = True) -> None:  # type: ignore[override]
        await super().load(model_name)
        if announce:
            self._announce({"op": "load", "model": model_name})

    async def unload(self, model_name: str, *, announce: bool = True) -> None:  # type: ignore[override]
        await super().unload(model_name)
        if announce:
            self._announce({"op": "unload", "model": model_name})


class WorkerServer(ClassifierServer):
    """A :class:`ClassifierServer` that serves REST on the supervisor's socket and talks to it."""

    def __init__(self, model_dir: str | Path, settings: ServerSettings, *, rest_socket: socket.socket,
                 control: socket.socket, **kwargs: Any) -> None:
        super().__init__(model_dir, settings, **kwargs)
        self.rest_sockets = [rest_socket]
        self.model_repository_extension = SharedRepositoryExtension(self.repository, self._send)
        self._control = control
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._follow_supervisor, name="supervisor", daemon=True).start()

    def setup_event_loop(self) -> None:
        """Called by :meth:`ClassifierServer.start` on the loop that will serve, once the models are loaded
        and the servers built: the worker is ready."""
        super().setup_event_loop()
        self._loop = asyncio.get_event_loop()
        self._send({"event": READY})

    def _send(self, message: dict[str, str]) -> None:
        self._control.sendall(json.dumps(message).encode() + b"\n")

    def _follow_supervisor(self) -> None:
        """Apply what the supervisor sends (another worker's hot swap); when it is gone (end of file),
        stop as on SIGTERM."""
        for message in read_messages(self._control):
            if message.get("op") in ("load", "unload") and self._loop is not None:
                asyncio.run_coroutine_threadsafe(self._follow(message["op"], message["model"]), self._loop)
        logger.error("worker %d: the supervisor is gone; stopping", os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    async def _follow(self, op: str, model_name: str) -> None:
        extension = self.model_repository_extension
        try:
            await (extension.load if op == "load" else extension.unload)(model_name, announce=False)
        except Exception as exc:  # this worker keeps what it had; the one that was asked already answered
            logger.error("model %s: %s done by another worker failed here: %s", model_name, op, exc)
        else:
            logger.info("model %s: %s done by another worker, done here too", model_name, op)


def read_messages(sock: socket.socket) -> Iterator[dict[str, str]]:
    """JSON lines from a blocking control socket until end of file (or a socket error)."""
    pending = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except OSError:
            return
        if not chunk:
            return
        messages, pending = split_messages(pending, chunk)
        yield from messages


def split_messages(pending: bytes, chunk: bytes) -> tuple[list[dict[str, str]], bytes]:
    """The complete JSON lines in ``pending + chunk``, and the incomplete rest."""
    *lines, rest = (pending + chunk).split(b"\n")
    messages = []
    for line in lines:
        try:
            messages.append(json.loads(line))
        except ValueError:
            logger.error("control message is not JSON, ignored: %r", line[:200])
    return messages, rest


def serve_worker(fds: str, model_dir: str | Path, settings: ServerSettings, **server_kwargs: Any) -> None:
    """Run one worker on the sockets named by :data:`WORKER_FDS_FLAG` (inherited from the supervisor)."""
    rest_fd, control_fd = (int(fd) for fd in fds.split(","))
    serve(model_dir, settings, server_class=WorkerServer, rest_socket=socket.socket(fileno=rest_fd),
          control=socket.socket(fileno=control_fd), **server_kwargs)


# --- the supervisor side ---------------------------------------------------------------------------


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_rest_socket(host: str, port: int) -> socket.socket:
    """The REST socket every worker serves: bound here, put into listening by the first worker that starts
    (until then a client is refused at once instead of waiting in a queue nobody serves)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def reserve_grpc_port(host: str, port: int) -> socket.socket:
    """A placeholder on the gRPC port in the workers' ``SO_REUSEPORT`` group; it never listens, so the
    kernel never hands it a connection."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


@dataclass(eq=False)
class _Worker:
    """One worker slot: the process in it now, and its restart history."""

    index: int
    process: subprocess.Popen | None = None
    control: socket.socket | None = None
    pending: bytes = b""
    ready: bool = False
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Start ``workers`` worker processes on shared ports, keep them running, stop them on a signal."""

    def __init__(self, argv: Sequence[str], workers: int, *, host: str, http_port: int,
                 grpc_port: int | None) -> None:
        self.argv = list(argv)
        self.host = host
        self.rest_socket = bind_rest_socket(host, http_port)
        self.http_port = self.rest_socket.getsockname()[1]
        self.grpc_placeholder = reserve_grpc_port(host, grpc_port) if grpc_port is not None else None
        self.grpc_port = self.grpc_placeholder.getsockname()[1] if self.grpc_placeholder else None
        self.workers = [_Worker(i + 1) for i in range(workers)]
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop_signal: int | None = None

    # ----- running

    def run(self) -> int:
        """Supervise until a signal or a failed start; returns the exit code for the supervisor process."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self.selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            for worker in self.workers:
                self._start(worker)
            all_ready = False
            while self._stop_signal is None:
                self._poll()
                failed = self._reap(starting=not all_ready)
                if failed is not None and failed.process is not None:
                    logger.error("worker %d could not start (%s); stopping", failed.index,
                                 _describe(failed.process.returncode))
                    self._stop_all()
                    return _exit_code(failed.process.returncode)
                if not all_ready and all(w.ready for w in self.workers):
                    all_ready = True
                    logger.info("%d workers ready: REST %s:%d, gRPC %s", len(self.workers), self.host, self.http_port,
                                f"{self.host}:{self.grpc_port}" if self.grpc_port else "off")
                self._restart_due()
            logger.info("signal %d: stopping %d workers", self._stop_signal, len(self.workers))
            return self._stop_all()
        finally:
            signal.set_wakeup_fd(-1)
            self.close()

    def _on_signal(self, sig: int, _frame: Any) -> None:
        self._stop_signal = sig

    def _start(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        fds = (self.rest_socket.fileno(), theirs.fileno())
        ports = ["--http_port", str(self.http_port)]
        if self.grpc_port is not None:
            ports += ["--grpc_port", str(self.grpc_port)]
        cmd = [sys.executable, "-m", "predictors", *self.argv, "--workers", "1", *ports,
               WORKER_FDS_FLAG, f"{fds[0]},{fds[1]}"]
        try:
            worker.process = subprocess.Popen(cmd, pass_fds=fds)
        finally:
            theirs.close()
        worker.control, worker.pending, worker.ready = ours, b"", False
        worker.started_at, worker.restart_at = time.monotonic(), None
        self.selector.register(ours, selectors.EVENT_READ, worker)
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def _poll(self) -> None:
        """Wait up to one tick for a signal, a worker's ready message, or a worker's end of file."""
        for key, _ in self.selector.select(TICK_S):
            if key.fileobj is self._wake_r:
                while True:
                    try:
                        if not self._wake_r.recv(64):
                            break
                    except BlockingIOError:
                        break
                continue
            worker: _Worker = key.data
            try:
                data = worker.control.recv(4096) if worker.control else b""
            except OSError:
                data = b""
            if not data:
                self._drop_control(worker)
                continue
            messages, worker.pending = split_messages(worker.pending, data)
            for message in messages:
                if message.get("event") == READY and not worker.ready:
                    worker.ready = True
                    logger.info("worker %d ready (pid %d)", worker.index, worker.process.pid)
                elif message.get("op") in ("load", "unload"):
                    self._pass_on(worker, message)

    def _pass_on(self, sender: _Worker, message: dict[str, str]) -> None:
        """A hot swap done by one worker, to be done by every other ready one (one that is still starting
        loads the package directory as it is now)."""
        line = json.dumps(message).encode() + b"\n"
        for worker in self.workers:
            if worker is not sender and worker.ready and worker.control is not None:
                with contextlib.suppress(OSError):  # it is exiting; its replacement loads from disk
                    worker.control.sendall(line)
        logger.info("model %s: %s by worker %d, passed on to the others", message.get("model"), message["op"],
                    sender.index)

    def _drop_control(self, worker: _Worker) -> None:
        if worker.control is not None:
            self.selector.unregister(worker.control)
            worker.control.close()
            worker.control = None

    def _reap(self, *, starting: bool) -> _Worker | None:
        """Notice workers that exited; while ``starting``, return one that exited before it was ready.
        Later exits schedule a restart."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.process is None or worker.restart_at is not None or worker.process.poll() is None:
                continue
            self._drop_control(worker)
            if starting and not worker.ready:
                return worker
            if worker.ready and now - worker.started_at >= STABLE_AFTER_S:
                worker.failures = 0
            delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2 ** worker.failures)
            worker.failures += 1
            worker.restart_at = now + delay
            logger.error("worker %d (pid %d) exited unexpectedly (%s); restarting in %.1f s", worker.index,
                         worker.process.pid, _describe(worker.process.returncode), delay)
        return None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)

    # ----- stopping

    def _stop_all(self) -> int:
        """SIGTERM every live worker, wait for all (at most :data:`STOP_TIMEOUT_S`), kill the rest.
        0 when every worker stopped cleanly, else 1."""
        live = [w.process for w in self.workers if w.process is not None and w.process.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        code = 0
        for process in live:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker pid %d did not stop within %.0f s; killing it", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
            if process.returncode not in (0, -signal.SIGTERM):
                logger.error("worker pid %d stopped with %s", process.pid, _describe(process.returncode))
                code = 1
        return code

    def close(self) -> None:
        for worker in self.workers:
            self._drop_control(worker)
        self.selector.close()
        for sock in (self._wake_r, self._wake_w, self.rest_socket, self.grpc_placeholder):
            if sock is not None:
                sock.close()


def _describe(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:  # a real-time signal has no name
            return f"signal {-returncode}"
    return f"exit code {returncode}"


def _exit_code(returncode: int | None) -> int:
    """A failed worker's exit code as the supervisor's: its own, or 1 when a signal ended it."""
    return returncode if returncode is not None and returncode > 0 else 1


def supervise(argv: Sequence[str], workers: int, *, host: str, http_port: int, grpc_port: int | None,
              configure_logs: bool = True, log_config_file: str | None = None) -> int:
    """Entry point of ``serve --workers N`` (N > 1): returns the exit code. ``argv`` are the ``serve``
    arguments as given; each worker gets them back with ``--workers 1``, the resolved ports and its sockets.
    ``configure_logs``, ``log_config_file``: KServe's ``--configure_logging`` and ``--log_config_file``."""
    if configure_logs:
        configure_logging(log_config_file)
        _log_like_kserve()
    try:
        supervisor = Supervisor(argv, workers, host=host, http_port=http_port, grpc_port=grpc_port)
    except OSError as exc:
        logger.error("cannot bind %s (REST port %d, gRPC port %s): %s", host, http_port, grpc_port, exc)
        return 1
    return supervisor.run()
