"""Kafka bridge end to end: produce N Iris requests, wait for all N results; the bridge vs the reference loop.

Everything runs on loopback: the embedded tansu broker (``python -m devtools broker run``), our
model server (Iris), the bridge (``python -m streaming bridge``, shipped defaults, gRPC to the
server) and the load process (:mod:`bench.streamload`). The baseline is the reference
design's loop (:mod:`bench.reference_loop`: consume one message, call REST synchronously,
print, next) over the same kind of requests, to the same model server, in the same run. Each
phase (the burst, each steady rate, the reference loop) gets a broker of its own
(:func:`fresh_broker`).

Reported: results/s for a burst of N requests (produce all, wait for every result), the
reference loop's results/s, and end-to-end latency percentiles at a steady offered 1,000
messages/s; each the median of ``rounds`` rounds, a round running every phase once, in turn.
Targets (issue 12, 2 cores): ≥ 2,500 results/s; ≥ 10× the reference loop; bridge CPU
≤ 0.25 ms per message; p99 ≤ 100 ms at a steady 1,000 messages/s.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    REPO,
    WORK,
    Service,
    cpu_seconds,
    free_port,
    http_ok,
    loadavg,
    machine,
    our_server,
    profiled,
    service,
    table,
    write_result,
)
from bench.packages import iris
from bench.streamload import StreamResult, StreamSpec

REQUESTS, RESULTS, DEAD = "bench-requests", "bench-results", "bench-dead-letters"
PARTITIONS = 3
STEADY_RATES = (1000.0, 250.0)  # the asked-for rate, and one well inside the bridge's capacity here


IRIS_ROWS = 150  # what iris_csv writes: the whole data set


def iris_csv(path: Path) -> Path:
    """All 150 Iris rows with labels, in the CSV layout ``streaming produce iris`` reads."""
    from sklearn.datasets import load_iris

    data = load_iris()
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*data.feature_names, "label", "label_name"])
        for x, y in zip(data.data, data.target, strict=True):
            writer.writerow([*(f"{v:g}" for v in x), int(y), data.target_names[y]])
    return path


def _run(cmd: list[str], timeout: float) -> str:
    """Run ``cmd`` from the repository; its standard output (an error with its stderr if it fails)."""
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[2]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _run_json(cmd: list[str], timeout: float) -> dict[str, Any]:
    """:func:`_run`, and the last line it printed as JSON."""
    return json.loads(_run(cmd, timeout).strip().splitlines()[-1])


def stream(spec: StreamSpec) -> StreamResult:
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=WORK, delete=False) as f:
        json.dump(asdict(spec), f)
    try:
        return StreamResult(**_run_json([PYTHON, "-m", "bench.streamload", f.name], spec.timeout_s + 120))
    finally:
        os.unlink(f.name)


@contextmanager
def fresh_broker(tag: str) -> Iterator[tuple[str, Service]]:
    """A new tansu broker with empty topics: its in-memory store makes every fetch cost more as it fills.

    With 500 messages stored, the broker took 1.1 ms of CPU per message at a steady 250/s; after
    six such runs on the same broker (about 15,000 messages), 3.1 ms (bench/RESULTS.md). A Kafka
    broker indexes its log, so each phase here starts from the same, empty, broker instead of
    measuring what the phases before it left behind.
    """
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    broker_cmd = [PYTHON, "-m", "devtools", "broker", "run", "--host", "127.0.0.1", "--port", str(port),
                  "--topics", f"{REQUESTS}:{PARTITIONS},{RESULTS}:{PARTITIONS},{DEAD}:1"]

    def broker_ready() -> bool:
        from streaming.topics import create_topics

        create_topics(bootstrap, {REQUESTS: PARTITIONS, RESULTS: PARTITIONS, DEAD: 1})
        return True

    with service(f"broker-{tag}", broker_cmd, ready=broker_ready, timeout=120) as broker:
        yield bootstrap, broker


@contextmanager
def bridge_on(bootstrap: str, server: Service, group: str) -> Iterator[tuple[Service, int]]:
    """``python -m streaming bridge`` with shipped defaults, gRPC to ``server``; yields it and its health port."""
    health = free_port()
    bridge_cmd = [PYTHON, "-m", "streaming", "bridge", "--bootstrap-servers", bootstrap,
                  "--request-topic", REQUESTS, "--result-topic", RESULTS, "--dead-letter-topic", DEAD,
                  "--group", group, "--protocol", "grpc", "--grpc-target", server.grpc_target,
                  "--health-host", "127.0.0.1", "--health-port", str(health), "--log-level", "WARNING"]
    with service("bridge", bridge_cmd, ready_url=f"http://127.0.0.1:{health}/readyz", timeout=180) as bridge:
        yield bridge, health


def _burst(server: Service, csv_path: Path, count: int, run_id: str, profile: bool) -> dict[str, Any]:
    """One burst on a fresh broker: results/s, and each process's CPU per result."""
    with fresh_broker("burst") as (bootstrap, broker_svc), \
            bridge_on(bootstrap, server, f"bench-bridge-{run_id}") as (bridge_svc, health):
        warm = stream(StreamSpec("burst", bootstrap, REQUESTS, RESULTS, str(csv_path), 500, f"{run_id}w"))
        print(f"  warm-up: {warm.received}/{warm.count} results", flush=True)
        load = loadavg()
        procs = {"broker (tansu)": broker_svc, "model server": server, "bridge": bridge_svc}
        cpu_before = {name: cpu_seconds(svc.process.pid) for name, svc in procs.items()}
        # --gil: only the thread holding the GIL, i.e. Python work, not threads waiting for it
        with profiled(bridge_svc.process.pid, "bridge-burst", profile, gil=True):
            burst = stream(StreamSpec("burst", bootstrap, REQUESTS, RESULTS, str(csv_path), count, f"{run_id}b"))
        cpu = {name: round(1000 * (cpu_seconds(svc.process.pid) - cpu_before[name]) / count, 3)
               for name, svc in procs.items()}
        if burst.cpu_s is not None:  # the load generator shares the cores too: its CPU is part of the picture
            cpu["load generator"] = round(1000 * burst.cpu_s / count, 3)
        healthy = http_ok(f"http://127.0.0.1:{health}/healthz")
    print(f"  burst: {burst.received}/{count} results in {burst.seconds:.2f} s = {burst.results_per_s:,.0f}/s "
          f"(load {load[0]}); CPU ms per result: {cpu}", flush=True)
    return {"result": burst, "cpu_ms_per_result": cpu, "loadavg": load, "healthy": healthy}


def _steady(server: Service, csv_path: Path, rate: float, seconds: float, run_id: str) -> dict[str, Any]:
    """A steady offered ``rate`` for ``seconds`` on a fresh broker (after a 500-message warm-up)."""
    tag = f"s{int(rate)}"
    with fresh_broker(tag) as (bootstrap, _broker), \
            bridge_on(bootstrap, server, f"bench-bridge-{run_id}{tag}") as (_bridge, health):
        stream(StreamSpec("burst", bootstrap, REQUESTS, RESULTS, str(csv_path), 500, f"{run_id}w{tag}"))
        load = loadavg()
        r = stream(StreamSpec("steady", bootstrap, REQUESTS, RESULTS, str(csv_path), int(rate * seconds),
                              f"{run_id}{tag}", rate=rate))
        healthy = http_ok(f"http://127.0.0.1:{health}/healthz")
    print(f"  steady {rate:,.0f}/s: p50 {r.p50_ms:.1f} ms  p99 {r.p99_ms:.1f} ms; to the result's hand-off p50/p99 "
          f"{r.to_result_ms}, result hop to the reader {r.result_hop_ms} ({r.received}/{r.count}; load {load[0]})",
          flush=True)
    return {"result": r, "loadavg": load, "healthy": healthy}


def _reference(server: Service, csv_path: Path, count: int, run_id: str) -> dict[str, Any]:
    """The reference loop on a broker of its own too, holding just the requests it reads."""
    with fresh_broker("reference") as (bootstrap, _broker):
        _run([PYTHON, "-m", "streaming", "produce", "iris", "--bootstrap-servers", bootstrap, "--csv",
              str(csv_path), "--form", "features", "--delay", "0", "--repeat", str(-(-count // IRIS_ROWS)),
              "--count", str(count), "--topic", REQUESTS, "--run-id", f"{run_id}r", "--log-level", "WARNING"],
             timeout=600)
        load = loadavg()
        reference = _run_json([PYTHON, "-m", "bench.reference_loop", bootstrap, REQUESTS, f"bench-ref-{run_id}",
                               server.http_url, str(count)], timeout=1800)
    print(f"  reference loop: {reference['count']} results in {reference['seconds']:.2f} s = "
          f"{reference['results_per_s']:,.0f}/s (load {load[0]})", flush=True)
    return {**reference, "loadavg": load}


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def run(count: int = 20_000, steady_seconds: float = 15.0, reference_count: int = 1000, rounds: int = 3,
        quick: bool = False, profile: bool = False) -> dict[str, Any]:
    if quick:
        count, steady_seconds, reference_count, rounds = 3000, 5.0, 300, 1
    info = machine()
    models = WORK / "bridge-models"
    package = iris(models)
    csv_path = iris_csv(WORK / "bridge-iris.csv")
    bursts: list[dict[str, Any]] = []
    steadies: dict[float, list[dict[str, Any]]] = {rate: [] for rate in STEADY_RATES}
    references: list[dict[str, Any]] = []
    with our_server("bridge-iris", models) as server:
        # Every phase once per round, in turn, so that a slow spell of the machine hits a round, not a phase.
        for r in range(rounds):
            run_id = time.strftime(f"b%H%M%S{r}")
            print(f"  round {r + 1}/{rounds}", flush=True)
            bursts.append(_burst(server, csv_path, count, run_id, profile and r == 0))
            for rate in STEADY_RATES:
                steadies[rate].append(_steady(server, csv_path, rate, steady_seconds, run_id))
            references.append(_reference(server, csv_path, reference_count, run_id))
    bridge_alive = all(b["healthy"] for b in bursts) and all(s["healthy"] for runs in steadies.values() for s in runs)

    burst_rate = _median([b["result"].results_per_s for b in bursts])
    reference_rate = _median([ref["results_per_s"] for ref in references])
    ratio = burst_rate / reference_rate
    paired = _median([b["result"].results_per_s / ref["results_per_s"]
                      for b, ref in zip(bursts, references, strict=True)])
    cpu_ms_per_result = {name: round(_median([b["cpu_ms_per_result"][name] for b in bursts]), 3)
                         for name in bursts[0]["cpu_ms_per_result"]}
    bridge_cpu = cpu_ms_per_result["bridge"]
    steady_p99 = {rate: _median([s["result"].p99_ms for s in runs]) for rate, runs in steadies.items()}
    targets = {
        "ge_2500_results_per_s": {"value": round(burst_rate), "target": 2500, "met": burst_rate >= 2500},
        "ge_10x_reference_loop": {"value": round(ratio, 1), "target": 10.0, "met": ratio >= 10.0},
        "bridge_cpu_le_0.25_ms_per_message": {"value": bridge_cpu, "target": 0.25, "met": bridge_cpu <= 0.25},
        "p99_le_100_ms_at_1000_per_s": {"value": round(steady_p99[1000.0], 1), "target": 100.0,
                                        "met": steady_p99[1000.0] <= 100.0},
    }

    def runs_of(values: list[float]) -> str:
        return " / ".join(f"{v:,.0f}" for v in values)

    text = table(
        f"Kafka bridge end to end (Iris, tansu broker, gRPC to the model server) — median of {rounds} rounds "
        f"(each phase on a fresh broker, phases in turn); burst of {count}, steady offered rates for "
        f"{steady_seconds:g} s each",
        ["consumer", "messages", "results/s", "p50 ms", "p99 ms", "p99 ms per round", "× reference", "load avg"],
        [["bridge, burst", count, burst_rate, _median([b["result"].p50_ms for b in bursts]),
          _median([b["result"].p99_ms for b in bursts]), runs_of([b["result"].p99_ms for b in bursts]), ratio,
          _median([b["loadavg"][0] for b in bursts])],
         *([f"bridge, steady {rate:,.0f}/s offered", runs[0]["result"].count,
            _median([s["result"].results_per_s for s in runs]), _median([s["result"].p50_ms for s in runs]),
            steady_p99[rate], runs_of([s["result"].p99_ms for s in runs]), "",
            _median([s["loadavg"][0] for s in runs])] for rate, runs in steadies.items()),
         ["reference loop (1 at a time, sync REST)", reference_count, reference_rate, "", "",
          f"results/s: {runs_of([ref['results_per_s'] for ref in references])}", 1.0,
          _median([ref["loadavg"][0] for ref in references])]])
    print(f"  bridge burst / reference loop: {ratio:.2f}x (median of per-round ratios {paired:.2f}x)")
    for name, t in targets.items():
        print(f"  target {name}: {t['value']} ({'met' if t['met'] else 'MISSED' if t['met'] is False else 'reported'})")
    payload = {"benchmark": "bridge", "machine": info, "package": package.source, "rounds": rounds,
               "burst": [asdict(b["result"]) for b in bursts],
               "steady": {str(rate): [asdict(s["result"]) for s in runs] for rate, runs in steadies.items()},
               "reference": references, "paired_ratio": paired, "bridge_healthy_after": bridge_alive,
               "cpu_ms_per_result_burst": cpu_ms_per_result,
               "cpu_ms_per_result_burst_runs": [b["cpu_ms_per_result"] for b in bursts],
               "targets": targets, "table": text,
               "loadavg": {"burst": [b["loadavg"] for b in bursts],
                           "steady": {str(rate): [s["loadavg"] for s in runs] for rate, runs in steadies.items()},
                           "reference": [ref["loadavg"] for ref in references]},
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_result("bridge", payload)
    return payload
