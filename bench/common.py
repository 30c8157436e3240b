"""What every benchmark shares: the machine record, server processes, the load generator, tables and JSON.

Each benchmark starts what it measures as real processes on loopback, drives them with
:mod:`bench.loadgen` in another process, and reports throughput and latency together with
the load average at the time — on a shared two-core machine the load average is part of the
result.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.loadgen import LoadResult, LoadSpec, Protocol

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
WORK = BENCH / ".work"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_ticks() -> list[int]:
    """The machine's CPU time counters from ``/proc/stat`` (user … steal), or ``[]`` where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def steal_percent(before: list[int], after: list[int]) -> float | None:
    """Share of the machine's CPU time that the hypervisor gave to other guests between two :func:`cpu_ticks`.

    On a shared virtual machine this "steal" comes and goes, and a run that met much of it ran
    slower, and used more CPU per request, for reasons that are not the code's: it is reported
    next to every measured run so such runs can be told apart.
    """
    if len(before) < 8 or len(after) < 8:
        return None
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta)
    return round(100.0 * delta[7] / total, 1) if total > 0 else None


def machine() -> dict[str, Any]:
    """Where the numbers were taken: they mean little without it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "loadavg_at_start": loadavg()}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, process: subprocess.Popen | None = None,
               interval: float = 0.05) -> float:
    """Poll until true; returns the seconds it took. Fails early if ``process`` dies."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {process.returncode}")
        try:
            if predicate():
                return time.perf_counter() - start
        except Exception:  # not up yet
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


@dataclass
class Service:
    """A process started by a benchmark, with its log file; always stopped by :func:`service`."""

    name: str
    process: subprocess.Popen
    log_path: Path
    http_port: int = 0
    grpc_port: int = 0
    ready_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextmanager
def service(name: str, cmd: Sequence[str], *, env: dict[str, str] | None = None, ready_url: str | None = None,
            ready: Callable[[], bool] | None = None, timeout: float = 300.0, cwd: Path = REPO,
            http_port: int = 0, grpc_port: int = 0) -> Iterator[Service]:
    """Start ``cmd``, wait until ready (an HTTP 200 on ``ready_url`` or ``ready()``), yield, then stop it."""
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}-{os.getpid()}-{int(time.time())}.log"
    run_env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=run_env, cwd=cwd,
                                   start_new_session=True)
    svc = Service(name, process, log_path, http_port, grpc_port)
    try:
        check = ready
        if check is None and ready_url is not None:
            def check() -> bool:
                return http_ok(ready_url)
        if check is not None:
            try:
                wait_until(check, timeout, f"{name} readiness", process)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n--- {log_path} ---\n{svc.log_tail()}") from exc
        svc.ready_s = time.perf_counter() - started
        yield svc
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group we created (servers fork workers), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def our_server(name: str, model_dir: Path, *, extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
               timeout: float = 300.0) -> AbstractContextManager[Service]:
    """``python -m predictors serve`` on loopback with its own feedback database."""
    http_port, grpc_port = free_port(), free_port()
    db_dir = Path(tempfile.mkdtemp(prefix="bench-feedback-", dir=WORK if WORK.exists() else None))
    run_env = {"KCP_FEEDBACK_DB_URL": f"sqlite:///{db_dir / 'feedback.db'}", **(env or {})}
    cmd = [PYTHON, "-m", "predictors", "serve", "--model_dir", str(model_dir), "--host", "127.0.0.1",
           "--http_port", str(http_port), "--grpc_port", str(grpc_port), *extra_args]
    return service(name, cmd, env=run_env, ready_url=f"http://127.0.0.1:{http_port}/v2/health/ready",
                   timeout=timeout, http_port=http_port, grpc_port=grpc_port)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants (MLServer runs inference in children)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_load(protocol: Protocol, target: str, body: bytes, concurrency: int, requests: int,
             warmup: int | None = None, server_pid: int | None = None) -> LoadResult:
    """Run :mod:`bench.loadgen` in its own process and return its result.

    With ``server_pid``, also the server's CPU milliseconds per request (warm-up included in both
    counts): unlike throughput on a shared machine, that figure barely depends on other load.
    """
    spec = LoadSpec(protocol=protocol, target=target, body_b64=base64.b64encode(body).decode(),
                    concurrency=concurrency, requests=requests,
                    warmup=warmup if warmup is not None else max(100, min(1000, requests // 10)))
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    ticks_before = cpu_ticks()
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=WORK, delete=False) as f:
        json.dump(asdict(spec), f)
        spec_path = f.name
    try:
        done = subprocess.run([PYTHON, "-m", "bench.loadgen", spec_path], cwd=REPO, capture_output=True, text=True,
                              timeout=1800, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    finally:
        os.unlink(spec_path)
    cpu_after = cpu_seconds(server_pid) if server_pid else 0.0
    steal = steal_percent(ticks_before, cpu_ticks())
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = LoadResult(**json.loads(done.stdout.strip().splitlines()[-1]))
    result.steal_pct = steal
    if server_pid:
        result.server_cpu_ms = 1000.0 * (cpu_after - cpu_before) / (spec.requests + spec.warmup)
    return result


@dataclass
class Contender:
    """One server in an interleaved comparison: how to reach it for a given protocol."""

    label: str
    service: Service
    body: Callable[[Protocol], bytes]
    target: Callable[[Protocol], str]
    cases: Sequence[tuple[Protocol, int]] | None = None  # None: every case of the comparison
    requests: int | None = None  # None: the comparison's count; a slow server gets fewer for similar run times


def interleave(contenders: Sequence[Contender], cases: Sequence[tuple[Protocol, int]], requests: int,
               rounds: int) -> list[dict[str, Any]]:
    """Run every (contender, case) ``rounds`` times, alternating contenders within each round.

    On a machine whose other load comes and goes, back-to-back A-then-B runs would mostly
    measure when each ran; alternating them round by round and taking medians (throughput,
    server CPU per request) and pooled percentiles (latency) puts both under the same
    conditions. Returns one row per (contender, case).
    """
    runs: dict[tuple[str, Protocol, int], list[tuple[LoadResult, list[float]]]] = {}
    for r in range(rounds):
        for protocol, concurrency in cases:
            for c in contenders:
                if c.cases is not None and (protocol, concurrency) not in c.cases:
                    continue
                load = loadavg()
                result = run_load(protocol, c.target(protocol), c.body(protocol), concurrency, c.requests or requests,
                                  server_pid=c.service.process.pid)
                if result.errors:
                    raise RuntimeError(f"{c.label} {protocol} c={concurrency}: {result.errors} errors, "
                                       f"first: {result.first_error}")
                runs.setdefault((c.label, protocol, concurrency), []).append((result, load))
                print(f"  round {r + 1}/{rounds}  {c.label:<40} {protocol:<4} c={concurrency:<3} "
                      f"{result.throughput:8.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
                      f"server CPU {result.server_cpu_ms or 0:5.2f} ms/req  (load {load[0]}, steal "
                      f"{result.steal_pct}%)", flush=True)
    rows = []
    for (label, protocol, concurrency), results in runs.items():
        latencies = np.concatenate([np.asarray(res.latencies_ms) for res, _ in results])
        throughputs = [res.throughput for res, _ in results]
        rows.append({
            "server": label, "protocol": protocol, "concurrency": concurrency, "rounds": len(results),
            "requests_per_round": results[0][0].requests, "throughput": float(np.median(throughputs)),
            "throughput_runs": [round(t, 1) for t in throughputs],
            "p50_ms": float(np.percentile(latencies, 50)), "p90_ms": float(np.percentile(latencies, 90)),
            "p99_ms": float(np.percentile(latencies, 99)), "max_ms": float(latencies.max()),
            "server_cpu_ms": float(np.median([res.server_cpu_ms or 0.0 for res, _ in results])),
            "loadavg": round(float(np.mean([load[0] for _, load in results])), 2),
            "steal_pct_runs": [res.steal_pct for res, _ in results],
            "steal_pct": _median_or_none([res.steal_pct for res, _ in results]),
        })
    return rows


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(float(np.median(known)), 1) if known else None


def paired_ratio(row: dict[str, Any], peer: dict[str, Any]) -> float:
    """Median over rounds of ``row``'s throughput over ``peer``'s in the same round.

    The two ran back to back within each round, so a slow spell of the machine that spans both
    cancels out; the ratio of the two medians (the figure the targets use) does not pair them.
    """
    return float(np.median([a / b for a, b in zip(row["throughput_runs"], peer["throughput_runs"], strict=True)]))


# --- profiling ---------------------------------------------------------------------------------

PROFILES = BENCH / "profiles"


@contextmanager
def profiled(pid: int, name: str, enabled: bool, gil: bool = False) -> Iterator[None]:
    """Sample ``pid`` with py-spy while the block runs (if ``enabled``), then print where its time went.

    Writes ``bench/profiles/<name>.txt`` (py-spy's raw collapsed stacks: feed it to
    speedscope or flamegraph.pl) and prints the functions with the most samples. ``gil``
    samples only the thread holding the GIL, i.e. Python work rather than waiting.
    """
    if not enabled:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    PROFILES.mkdir(parents=True, exist_ok=True)
    out = PROFILES / f"{name}.txt"
    cmd = [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--output", str(out),
           "--nonblocking", *(["--gil"] if gil else [])]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        spy_proc.send_signal(signal.SIGINT)
        spy_proc.wait(timeout=60)
    print(f"  profile of {name} ({out.relative_to(REPO)}):")
    for line in summarize_profile(out):
        print(f"    {line}")


def summarize_profile(path: Path, top: int = 25) -> list[str]:
    """The ``top`` functions by inclusive share of samples (each stack counted once per function)."""
    total = 0
    inclusive: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            fn = frame.split(" (")[0]
            where = frame.rsplit("(", 1)[-1].split(":")[0].split("site-packages/")[-1] if "(" in frame else ""
            key = f"{fn} ({where})"
            if key not in seen:
                seen.add(key)
                inclusive[key] = inclusive.get(key, 0) + n
    skip = ("threading.py", "runpy", "asyncio/", "contextlib", "concurrent/futures")
    ranked = [(k, v) for k, v in sorted(inclusive.items(), key=lambda kv: -kv[1]) if not any(s in k for s in skip)]
    return [f"{100 * v / max(total, 1):5.1f}%  {k}" for k, v in ranked[:top]]


# --- reporting -------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown), printed and kept for RESULTS.md."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells]
    text = "\n".join([f"### {title}", "", line, rule, *body, ""])
    print(text, flush=True)
    return text


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>.json (latest) and a timestamped copy."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    data = json.dumps(payload, indent=2, default=str) + "\n"
    latest = RESULTS / f"{name}.json"
    latest.write_text(data, encoding="utf-8")
    (RESULTS / f"{name}-{stamp}.json").write_text(data, encoding="utf-8")
    print(f"wrote {latest.relative_to(REPO)}", flush=True)
    return latest


def have(command: str) -> bool:
    return shutil.which(command) is not None
