"""Iris A/B between commits: ``python -m bench.versus [--rounds 3] [--requests 2000] [--stock] [--only P] REV ...``.

Each ``REV`` (a git revision, or ``.`` for the working tree) is served by ``python -m predictors
serve`` from its own ``git archive`` export, with the same flags ``bench iris`` gives "ours";
``REV:ARGS`` adds server flags (``HEAD:--event-loop asyncio``). All contenders run at once and are
driven in turn, round after round (:func:`bench.common.interleave`), so a change is measured
against its parent under the same machine load, which ``bench iris`` alone cannot do.
``--stock`` adds stock KServe (:mod:`bench.kserve_stock`); ``--only rest`` or ``--only grpc`` keeps
one protocol's cases. Prints the table; writes nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import tempfile
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

from bench.common import PYTHON, REPO, WORK, Service, free_port, interleave, service, table
from bench.iris import CASES, DEFAULTS, STOCK_KSERVE, contender
from bench.kserve_stock import kserve_stock
from bench.packages import iris


def export(rev: str) -> Path:
    """The tree of ``rev`` in a fresh directory (the working tree itself for ``.``)."""
    if rev == ".":
        return REPO
    target = Path(tempfile.mkdtemp(prefix=f"versus-{rev.replace('/', '_')}-", dir=WORK))
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def served_from(name: str, tree: Path, model_dir: Path, extra: list[str]) -> AbstractContextManager[Service]:
    http_port, grpc_port = free_port(), free_port()
    db = Path(tempfile.mkdtemp(prefix="versus-feedback-", dir=WORK)) / "feedback.db"
    cmd = [PYTHON, "-m", "predictors", "serve", "--model_dir", str(model_dir), "--host", "127.0.0.1",
           "--http_port", str(http_port), "--grpc_port", str(grpc_port), *DEFAULTS, *extra]
    return service(name, cmd, env={"KCP_FEEDBACK_DB_URL": f"sqlite:///{db}"}, cwd=tree,
                   ready_url=f"http://127.0.0.1:{http_port}/v2/health/ready", http_port=http_port, grpc_port=grpc_port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revs", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stock", action="store_true", help="add stock KServe as a contender")
    parser.add_argument("--only", choices=["rest", "grpc"], help="only this protocol's cases")
    args = parser.parse_args(argv)
    models = WORK / "iris-models"
    package = iris(models)
    with ExitStack() as stack:
        contenders = []
        for spec in args.revs:
            rev, _, extra = spec.partition(":")
            svc = stack.enter_context(served_from(f"versus-{len(contenders)}", export(rev), models, shlex.split(extra)))
            contenders.append(contender(spec, svc))
        if args.stock:
            contenders.append(contender(STOCK_KSERVE, stack.enter_context(kserve_stock(
                "versus-kserve", package.path / "model.joblib"))))
        cases = [c for c in CASES if args.only in (None, c[0])]
        rows = interleave(contenders, cases, args.requests, args.rounds)
    print(table(f"Iris A/B — median of {args.rounds} interleaved rounds × {args.requests} requests",
                ["server", "protocol", "conc.", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "load avg"],
                [[r["server"], r["protocol"], r["concurrency"], r["throughput"], r["p50_ms"], r["p99_ms"],
                  r["server_cpu_ms"], r["loadavg"]] for r in rows]))


if __name__ == "__main__":
    main()
