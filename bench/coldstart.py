"""Cold start: seconds from process start to ``/v2/health/ready`` answering 200.

Measured for the iris-only server, the all-models server (every package in models/, with
stand-ins for missing iris / fashion-mnist) and, as the baseline, MLServer serving the same
Iris model. Each is started ``repeats`` times; readiness is polled every 20 ms. Import times
of the heavy modules are measured alongside, since they are most of the answer.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, REPO, WORK, loadavg, machine, our_server, table, write_result
from bench.mlserver import mlserver
from bench.packages import MODELS, fashion_mnist, iris


def all_models_dir() -> tuple[Path, list[str]]:
    """Every package in models/, plus stand-ins for iris and fashion-mnist if they are missing there."""
    target = WORK / "all-models"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    names = []
    if MODELS.is_dir():
        for package in sorted(p for p in MODELS.iterdir() if (p / "config.json").is_file()):
            shutil.copytree(package, target / package.name, ignore=shutil.ignore_patterns("*.png", "*.csv"))
            names.append(f"{package.name} (models/)")
    if not (target / "iris").exists():
        iris(target)
        names.append("iris (stand-in)")
    if not (target / "fashion-mnist").exists():
        fashion_mnist(target)
        names.append("fashion-mnist (stand-in)")
    return target, names


def import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([PYTHON, "-c", f"import {module}"], cwd=REPO, check=True, capture_output=True,
                   env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"})
    return time.perf_counter() - start


def run(repeats: int = 3, quick: bool = False) -> dict[str, Any]:
    if quick:
        repeats = 1
    info = machine()
    iris_dir = WORK / "iris-models"
    package = iris(iris_dir)
    everything, names = all_models_dir()
    samples: dict[str, list[float]] = {"ours, iris only": [], "ours, all models": [], "MLServer 1.7.1, iris": []}
    loads: dict[str, list[float]] = {k: [] for k in samples}
    for _ in range(repeats):  # interleaved, so slow moments of the machine hit all three
        for label in samples:
            loads[label].append(loadavg()[0])
            if label == "ours, iris only":
                cm = our_server("cold-iris", iris_dir)
            elif label == "ours, all models":
                cm = our_server("cold-all", everything)
            else:
                cm = mlserver("cold", package.path / "model.joblib")
            with cm as svc:
                samples[label].append(svc.ready_s)
            print(f"  {label:<24} ready in {svc.ready_s:6.2f} s (load {loads[label][-1]})", flush=True)
    imports = {m: import_seconds(m) for m in ("kserve", "predictors.runtime.server", "tensorflow")}
    baseline = statistics.median(samples["MLServer 1.7.1, iris"])
    rows = [{"server": k, "median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "runs": v,
             "ratio_vs_mlserver": statistics.median(v) / baseline, "loadavg": statistics.mean(loads[k])}
            for k, v in samples.items()]
    text = table(f"Cold start: process start to ready, {repeats} interleaved runs each",
                 ["server", "median s", "min s", "max s", "× MLServer (iris)", "load avg"],
                 [[r["server"], r["median_s"], r["min_s"], r["max_s"], r["ratio_vs_mlserver"], r["loadavg"]]
                  for r in rows])
    print("  import times (fresh interpreter): " + ", ".join(f"{m} {s:.2f} s" for m, s in imports.items()))
    payload = {"benchmark": "coldstart", "machine": info, "all_models": names, "rows": rows,
               "import_seconds": imports, "table": text, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_result("coldstart", payload)
    return payload
