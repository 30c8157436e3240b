"""MLServer 1.7 as the peer to beat, in its own virtualenv so its pins never touch the project's.

The virtualenv (``bench/.venv-mlserver``, git-ignored) is created on first use with pinned
versions. scikit-learn and numpy are pinned to the project's own versions so MLServer
unpickles exactly the ``model.joblib`` our server serves (the same fitted model).

MLServer is configured as one would for production: no debug logging, ports on loopback.
``parallel_workers`` is left as a parameter: its default (1) runs inference in a separate
worker process; 0 runs it in the server process. The iris benchmark measures both and
compares us with the better one.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import AbstractContextManager
from pathlib import Path

import numpy
import sklearn

from bench.common import BENCH, WORK, Service, free_port, service

VENV = BENCH / ".venv-mlserver"
PINS = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", f"scikit-learn=={sklearn.__version__}",
        f"numpy=={numpy.__version__}",
        # MLServer 1.7's inference workers call asyncio.get_event_loop() with no loop set, which
        # uvloop >= 0.22 turns into a RuntimeError (every worker dies at start); 0.21 was current
        # when MLServer 1.7 shipped.
        "uvloop==0.21.0"]


def ensure_venv() -> Path:
    """The ``mlserver`` executable, installing MLServer into its virtualenv first if needed."""
    exe = VENV / "bin" / "mlserver"
    marker = VENV / ".pins"
    if exe.is_file() and marker.is_file() and marker.read_text() == "\n".join(PINS):
        return exe
    python = shutil.which("python3.11") or "python3"
    if not (VENV / "bin" / "python").is_file():
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    print(f"installing {' '.join(PINS)} into {VENV} ...", flush=True)
    subprocess.run([*pip, "--only-binary", ":all:", *PINS], check=True)
    marker.write_text("\n".join(PINS))
    return exe


def mlserver(name: str, model_file: Path, model_name: str = "iris",
             parallel_workers: int = 1) -> AbstractContextManager[Service]:
    """Serve ``model_file`` with ``mlserver_sklearn.SKLearnModel``; a context manager of :class:`Service`."""
    exe = ensure_venv()
    root = WORK / f"mlserver-{name}"
    if root.exists():
        shutil.rmtree(root)
    model_dir = root / model_name
    model_dir.mkdir(parents=True)
    shutil.copyfile(model_file, model_dir / "model.joblib")
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    (root / "settings.json").write_text(json.dumps({
        "debug": False, "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
        "metrics_port": metrics_port, "parallel_workers": parallel_workers}))
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": model_name, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"}}))
    return service(name, [str(exe), "start", str(root)],
                   ready_url=f"http://127.0.0.1:{http_port}/v2/models/{model_name}/ready",
                   http_port=http_port, grpc_port=grpc_port, cwd=root)
