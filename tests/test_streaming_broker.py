"""The embedded broker commands (``python -m devtools broker``): start in the background, create topics, stop
cleanly; and ``python -m streaming create-topics``, which works on any cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer

from streaming.topics import parse_topics
from tests.fixtures.broker import REPO
from tests.fixtures.ports import free_port, port_open


def cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KCP_")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)


def devtools_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return cli("devtools", *args)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_parse_topics() -> None:
    assert parse_topics("a:3, b ,c:1") == {"a": 3, "b": 1, "c": 1}


def test_broker_start_creates_topics_and_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    port = free_port()
    pidfile, logfile = tmp_path / "broker.pid", tmp_path / "broker.log"
    started = devtools_cli("broker", "start", "--port", str(port), "--topics", "req:3,res:2,dlq",
                            "--pidfile", str(pidfile), "--logfile", str(logfile))
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text().split()[0])
    try:
        assert alive(pid) and port_open(port), "the broker outlives the command that started it"
        bootstrap = f"127.0.0.1:{port}"
        consumer = KafkaConsumer(bootstrap_servers=bootstrap)
        partitions = {t: len(consumer.partitions_for_topic(t) or ()) for t in ("req", "res", "dlq")}
        consumer.close()
        assert partitions == {"req": 3, "res": 2, "dlq": 1}

        created = cli("streaming", "create-topics", "--bootstrap-servers", bootstrap, "--topics", "req:3,more:2")
        assert created.returncode == 0 and "more" in created.stdout and "'req'" not in created.stdout
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        assert {"req", "res", "dlq", "more"} <= set(admin.list_topics())
        admin.close()
    finally:
        stopped = devtools_cli("broker", "stop", "--pidfile", str(pidfile))
    assert stopped.returncode == 0 and "broker stopped" in stopped.stdout
    assert not alive(pid) and not port_open(port) and not pidfile.exists()
    again = devtools_cli("broker", "stop", "--pidfile", str(pidfile))
    assert again.returncode == 0 and "no running broker" in again.stdout


def test_stop_never_signals_a_process_the_pidfile_does_not_describe(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / "broker.pid"
        pidfile.write_text(f"{sleeper.pid}\n/not/the/tansu/binary\n127.0.0.1:1\n")
        result = devtools_cli("broker", "stop", "--pidfile", str(pidfile))
        assert result.returncode == 0 and "no running broker" in result.stdout
        assert sleeper.poll() is None, "an unrelated process with a reused pid must survive"
    finally:
        sleeper.kill()
        sleeper.wait()
