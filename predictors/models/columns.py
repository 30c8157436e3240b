"""Tabular features as the server holds them: one ``[N, F]`` matrix, or one 1-D array per named column.

A package declares which in ``config.json``: a single input of shape ``[-1, F]`` is a matrix; several
inputs of shape ``[-1]`` (or ``[-1, 1]``) are columns, one V2 tensor each, as MLServer's pandas codec
sends a data frame. Columns keep their own types (numbers, or strings for categories), which is what a
``ColumnTransformer`` pipeline fitted on a data frame expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from predictors.package import TensorSpec

ColumnKind = Literal["numeric", "string"]


@dataclass(frozen=True)
class Column:
    name: str
    kind: ColumnKind


@dataclass(frozen=True)
class TabularSchema:
    """The inputs of a tabular package: ``matrix`` (one tensor, ``n_features`` wide) or named ``columns``."""

    columns: tuple[Column, ...]
    matrix: bool

    @classmethod
    def of(cls, inputs: Sequence[TensorSpec]) -> TabularSchema:
        if len(inputs) == 1 and len(inputs[0].shape) == 2 and inputs[0].shape[-1] != 1:
            name = inputs[0].name
            return cls(tuple(Column(f"{name}[{i}]", "numeric") for i in range(inputs[0].shape[-1])), matrix=True)
        return cls(tuple(Column(t.name, "string" if t.datatype == "BYTES" else "numeric") for t in inputs),
                   matrix=False)

    @property
    def n_features(self) -> int:
        return len(self.columns)


class ColumnBatch:
    """N rows as one array per column (float64 for numbers, object arrays of ``str`` for strings)."""

    __slots__ = ("arrays", "n")

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.n = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self.n

    def to_frame(self) -> object:
        """A pandas data frame with the columns in order: what scikit-learn was fitted on."""
        import pandas as pd

        return pd.DataFrame(self.arrays)

    @staticmethod
    def concatenate(batches: Sequence[ColumnBatch]) -> ColumnBatch:
        names = batches[0].arrays
        return ColumnBatch({name: np.concatenate([b.arrays[name] for b in batches]) for name in names})

    def rows(self, start: int, stop: int) -> ColumnBatch:
        return ColumnBatch({name: a[start:stop] for name, a in self.arrays.items()})


Features = np.ndarray | ColumnBatch
"""What a tabular model's ``predict_array`` takes."""
