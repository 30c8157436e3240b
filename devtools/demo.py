"""``python -m devtools demo`` (``make demo``): the whole platform end to end on embedded defaults.

Starts an embedded Kafka broker, the model server and the bridge on free loopback ports,
streams the Iris test split and some Fashion-MNIST and MNIST test images through the
request topic, prints every prediction as it arrives on the result topic, submits the
true labels as feedback, prints each model's feedback report, and stops everything —
also on Ctrl-C or an error — leaving no process behind.

The demo drives the same command lines a user would run by hand (see docs/streaming.md),
so what it shows is what the README documents. It talks to the model server only over
HTTP/gRPC; it never imports it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

from devtools.broker import EmbeddedBroker, free_port

REQUIRED = ("iris", "mnist", "fashion-mnist")
TOPICS = {"kcp-requests": 3, "kcp-results": 3, "kcp-dead-letters": 1}


def _say(message: str) -> None:
    print(f"\n=== {message}", flush=True)


def ensure_packages(model_dir: Path, work_dir: Path) -> Path:
    """The committed packages when present; otherwise quick-trained ones (seconds) in the work dir."""
    trained = all((model_dir / name / "config.json").is_file() for name in REQUIRED)
    if trained and (model_dir / "iris" / "test.csv").is_file():
        names = sorted(p.name for p in model_dir.iterdir() if (p / "config.json").is_file())
        _say(f"model packages: {', '.join(names)} from {model_dir}")
        return model_dir
    target = work_dir / "models"
    _say(f"{model_dir} lacks trained packages; training quick ones into {target} (make train builds the full ones)")
    subprocess.run([sys.executable, "-m", "training", "all", "--quick", "--out", str(target)], check=True)
    katonic = model_dir / "iris-katonic"
    if katonic.is_dir():
        shutil.copytree(katonic, target / "iris-katonic", dirs_exist_ok=True)
        shutil.copy2(target / "iris" / "model.joblib", target / "iris-katonic" / "model.joblib")
    return target


@contextmanager
def _process(name: str, cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A background process that is always stopped: SIGTERM, then SIGKILL after a grace period."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        print(f"stopped {name} (exit {proc.returncode}); log: {log}", flush=True)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"model server exited with {proc.returncode}; see {log}:\n"
                               + log.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"model server not ready after {timeout}s; see {log}")


def _run(cmd: list[str], env: dict[str, str]) -> None:
    subprocess.run(cmd, env=env, check=True)


def format_report(report: dict[str, Any]) -> str:
    """A feedback report (GET /v2/models/{m}/feedback) as a readable table."""
    m = report["cumulative"]
    if not m["count"]:
        return f"{report['model_name']}: no feedback yet"
    lines = [f"model {report['model_name']}: {m['count']} labelled predictions, accuracy {m['accuracy']:.3f}, "
             f"macro F1 {m['macro_avg']['f1']:.3f}, weighted F1 {m['weighted_avg']['f1']:.3f}",
             f"  {'class':<14} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}"]
    for c in m["per_class"]:
        lines.append(f"  {c['name'][:14]:<14} {c['precision']:>9.3f} {c['recall']:>7.3f} {c['f1']:>7.3f} "
                     f"{c['support']:>8}")
    cm = m["confusion_matrix"]
    width = max(4, *(len(str(v)) for row in cm["matrix"] for v in row))
    lines.append("  confusion matrix (rows: true, columns: predicted)")
    lines.append("  " + " " * 14 + " ".join(f"{label!s:>{width}}" for label in cm["labels"]))
    for name, row in zip(cm["names"], cm["matrix"], strict=True):
        lines.append(f"  {name[:14]:<14}" + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def run_demo(model_dir: Path, work_dir: Path, *, iris_delay: float = 0.02, images: int = 20) -> int:
    work_dir.mkdir(parents=True, exist_ok=True)
    models = ensure_packages(model_dir, work_dir)
    http_port, grpc_port, health_port = free_port(), free_port(), free_port()
    server_url = f"http://127.0.0.1:{http_port}"
    db = work_dir / "feedback.db"
    for stale in work_dir.glob("feedback.db*"):
        stale.unlink()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "KCP_FEEDBACK_DB_URL": f"sqlite:///{db}"}
    env.pop("KCP_API_KEY", None)
    py = sys.executable
    with ExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker("127.0.0.1", free_port(), log_path=work_dir / "broker.log"))
        broker.create_topics(TOPICS)
        env["KCP_KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
        _say(f"Kafka broker (tansu) on {broker.bootstrap_servers}, topics {', '.join(TOPICS)}")

        server_log = work_dir / "server.log"
        server = stack.enter_context(_process("model server", [
            py, "-m", "predictors", "serve", "--model_dir", str(models), "--host", "127.0.0.1",
            "--http_port", str(http_port), "--grpc_port", str(grpc_port), "--enable_latency_logging", "false",
        ], server_log, env))
        _wait_ready(server_url, server, server_log)
        served = httpx.get(f"{server_url}/v2/models").json()["models"]
        _say(f"model server ready: REST {server_url}, gRPC 127.0.0.1:{grpc_port}, models {', '.join(served)}")

        stack.enter_context(_process("bridge", [
            py, "-m", "streaming", "bridge", "--grpc-target", f"127.0.0.1:{grpc_port}",
            "--health-port", str(health_port), "--log-level", "WARNING",
        ], work_dir / "bridge.log", env))
        _say(f"bridge consuming kcp-requests -> V2 gRPC -> kcp-results (health http://127.0.0.1:{health_port})")

        iris_rows = len((models / "iris" / "test.csv").read_text().splitlines()) - 1
        _say(f"producing {iris_rows} Iris test rows, {images} Fashion-MNIST and {images // 2} MNIST test images")
        _run([py, "-m", "streaming", "produce", "iris", "--csv", str(models / "iris" / "test.csv"),
              "--delay", str(iris_delay), "--log-level", "WARNING"], env)
        _run([py, "-m", "devtools", "produce-images", "--dataset", "fashion-mnist", "--count", str(images),
              "--with-labels", "--log-level", "WARNING"], env)
        _run([py, "-m", "devtools", "produce-images", "--dataset", "mnist", "--model", "mnist",
              "--count", str(images // 2), "--with-labels", "--log-level", "WARNING"], env)

        total = iris_rows + images + images // 2
        _say(f"results from kcp-results (true labels submitted as feedback to {server_url})")
        _run([py, "-m", "streaming", "results", "--count", str(total), "--idle-timeout", "120", "--feedback",
              "--server-url", server_url, "--log-level", "WARNING"], env)

        _say("feedback reports (GET /v2/models/{model}/feedback)")
        for model in ("iris", "fashion-mnist", "mnist"):
            report = httpx.get(f"{server_url}/v2/models/{model}/feedback", timeout=30).json()
            print(format_report(report), flush=True)
        _say("shutting down")
    _say("demo finished: every process stopped")
    return 0
