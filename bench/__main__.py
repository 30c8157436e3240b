"""``python -m bench {iris,zoo,images,bridge,coldstart,all} [--quick] [--profile]`` (``make bench`` runs ``all``).

Each benchmark prints its table and writes ``bench/results/<name>.json``; ``all`` also writes
``bench/results/summary.md`` with every table, the machine and the load averages, ready to be
copied into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _benchmarks(profile: bool) -> dict[str, Callable[[bool], dict[str, Any]]]:
    from bench import bridge, coldstart, images, iris, zoo

    return {
        "iris": lambda quick: iris.run(quick=quick),
        "zoo": lambda quick: zoo.run(quick=quick),
        "images": lambda quick: images.run(quick=quick),
        "bridge": lambda quick: bridge.run(quick=quick, profile=profile),
        "coldstart": lambda quick: coldstart.run(quick=quick),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=["iris", "zoo", "images", "bridge", "coldstart", "all"])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds: a smoke run, not figures")
    parser.add_argument("--profile", action="store_true", help="py-spy the bridge during its burst (bench/profiles/)")
    args = parser.parse_args(argv)
    from bench.common import RESULTS, machine

    benchmarks = _benchmarks(args.profile)
    names = list(benchmarks) if args.benchmark == "all" else [args.benchmark]
    tables, failed = [], []
    info = machine()
    for name in names:
        print(f"== {name} ==", flush=True)
        started = time.perf_counter()
        try:
            result = benchmarks[name](args.quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            print(f"{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        tables.append(result["table"])
        print(f"== {name} done in {time.perf_counter() - started:.0f} s ==", flush=True)
    if args.benchmark == "all":
        RESULTS.mkdir(parents=True, exist_ok=True)
        header = (f"Machine: {info['nproc']} × {info['cpu']}, Python {info['python']}; started {info['date']} "
                  f"(load average {info['loadavg_at_start']}).\n\nCommand: `python -m bench all"
                  f"{' --quick' if args.quick else ''}`\n\n")
        (RESULTS / "summary.md").write_text(header + "\n".join(tables), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
