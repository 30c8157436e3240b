"""Probe rows: the inputs on which a compiled model must answer exactly as its estimator.

``python -m predictors package`` stores rows from the user's own data in ``probes.npz`` (one array
per input, no pickles). A package written by hand has none, so rows are synthesised: numbers on
several scales around zero, and for string columns the categories the fitted encoders learned.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from predictors.models.columns import ColumnBatch, Features, TabularSchema

PROBES_FILE = "probes.npz"
SYNTHETIC_ROWS = 512


class NoProbes(Exception):
    """No rows could be stored or made for this schema (say, a string column with no known categories)."""


def load_probes(package_dir: Path, schema: TabularSchema, input_name: str) -> Features | None:
    """The package's stored probe rows, or None if it has none."""
    path = package_dir / PROBES_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as stored:
        if schema.matrix:
            return np.asarray(stored[input_name], dtype=np.float64)
        return ColumnBatch({c.name: _column(stored[c.name], c.kind) for c in schema.columns})


def save_probes(package_dir: Path, probes: Features, input_name: str) -> Path:
    path = package_dir / PROBES_FILE
    if isinstance(probes, ColumnBatch):
        arrays = {name: (a.astype(str) if a.dtype == object else a) for name, a in probes.arrays.items()}
    else:
        arrays = {input_name: np.asarray(probes, dtype=np.float64)}
    np.savez_compressed(path, **arrays)
    return path


def synthesize(schema: TabularSchema, estimator: Any, rows: int = SYNTHETIC_ROWS, seed: int = 0) -> Features:
    """Rows for a package without stored probes (raises :class:`NoProbes` where none can be made)."""
    rng = np.random.default_rng(seed)
    scale = np.array([0.1, 1.0, 10.0, 100.0])[rng.integers(0, 4, (rows, 1))]
    if schema.matrix:
        return rng.normal(0.0, 1.0, (rows, schema.n_features)) * scale
    categories = learned_categories(estimator)
    arrays: dict[str, np.ndarray] = {}
    for i, column in enumerate(schema.columns):
        if column.kind == "numeric":
            arrays[column.name] = rng.normal(0.0, 1.0, rows) * scale[:, 0] * (i + 1)
        elif column.name in categories:
            known = np.asarray(categories[column.name], dtype=object)
            arrays[column.name] = known[rng.integers(0, len(known), rows)]
        else:
            raise NoProbes(f"no categories are known for string column '{column.name}'; store probe rows "
                           f"with `python -m predictors package`")
    return ColumnBatch(arrays)


def learned_categories(estimator: Any) -> dict[str, list[str]]:
    """Column name → the string categories a fitted encoder inside ``estimator`` learned."""
    found: dict[str, list[str]] = {}
    for part in estimator_parts(estimator):
        names = getattr(part, "feature_names_in_", None)
        categories = getattr(part, "categories_", None)
        if names is None or categories is None:
            continue
        for name, values in zip(names, categories, strict=False):
            strings = [v for v in values.tolist() if isinstance(v, str)]
            if strings:
                found.setdefault(str(name), strings)
    return found


def estimator_parts(estimator: Any) -> list[Any]:
    """The estimator and every fitted estimator nested in it (pipeline steps, column transformers)."""
    seen, stack, parts = set(), [estimator], []
    while stack:
        part = stack.pop()
        if id(part) in seen or not hasattr(part, "get_params"):
            continue
        seen.add(id(part))
        parts.append(part)
        for attr in ("steps", "transformers_", "transformer_list"):
            for item in getattr(part, attr, None) or []:
                stack.append(item[1])
        stack.extend(v for v in part.get_params(deep=False).values() if hasattr(v, "get_params"))
    return parts


def _column(array: np.ndarray, kind: str) -> np.ndarray:
    return array.astype(object) if kind == "string" else np.asarray(array, dtype=np.float64)
