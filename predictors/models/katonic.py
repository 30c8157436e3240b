"""Katonic custom-model compatibility: serve a package whose artifact is a ``launch.py``.

A Katonic model ships ``launch.py`` with three functions and, optionally, ``schema.py``
with a pydantic input schema::

    def loadmodel(logger): ...                      # -> model object
    def preprocessing(data, logger): ...            # -> features, or False to reject the input
    def predict(features, model, logger): ...       # -> class ids [N] or probabilities [N, K]

The V2 input is a BYTES tensor (``data`` by default) whose elements are JSON documents,
one per row; each is validated against the schema (if any) and the list of dicts is
passed to ``preprocessing`` unchanged, so a Katonic user's code runs as written.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import orjson
from kserve.errors import InferenceError
from pydantic import BaseModel, ValidationError

from predictors.models.base import PackageModel, Prepared
from predictors.models.execution import BatchingChoice, ExecutionChoice
from predictors.package import PackageError
from predictors.protocol.codecs import as_text, to_numpy
from predictors.protocol.errors import BadInput
from predictors.protocol.v2 import Tensor
from predictors.protocol.vocabulary import describe_validation_errors

REQUIRED_FUNCTIONS = ("loadmodel", "preprocessing", "predict")
MAX_ROW_DEPTH = 32
"""Deepest nesting of arrays and objects a row may have. The schema's validation and the user's own code
walk a row recursively; without a bound a row of a few thousand brackets ends in a ``RecursionError``."""


def _depth_exceeds(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests arrays and objects more than ``limit`` deep (walked without recursion)."""
    level: list[Any] = [doc]
    for _ in range(limit):
        level = [child for node in level if isinstance(node, (list, dict))
                 for child in (node.values() if isinstance(node, dict) else node)]
        if not level:
            return False
    return any(isinstance(node, (list, dict)) for node in level)


def _import_file(path: Path) -> ModuleType:
    """Import a user file under a unique module name, with its directory importable."""
    name = f"katonic_{path.stem}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PackageError(path.parent, path.name, None, "cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise PackageError(path.parent, path.name, None, f"import failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent))
    return module


def _schema_class(module: ModuleType) -> type[BaseModel]:
    """The pydantic model defined in schema.py (the first one defined there, whatever its name)."""
    for value in vars(module).values():
        if (inspect.isclass(value) and issubclass(value, BaseModel) and value is not BaseModel
                and value.__module__ == module.__name__):
            return value
    raise PackageError(Path(module.__file__ or ".").parent, "schema.py", None, "defines no pydantic BaseModel")


class KatonicModel(PackageModel):
    """Runs a Katonic ``launch.py`` unchanged behind the V2 protocol."""

    def load_artifact(self) -> None:
        self.user_logger = logging.getLogger(f"katonic.{self.name}")
        launch = _import_file(self.package.artifact_path)
        missing = [f for f in REQUIRED_FUNCTIONS if not callable(getattr(launch, f, None))]
        if missing:
            raise PackageError(self.package.path, "launch.py", None, f"missing function(s) {missing}")
        self.launch = launch
        schema_path = self.package.path / "schema.py"
        self.schema = _schema_class(_import_file(schema_path)) if schema_path.is_file() else None
        try:
            self.user_model = launch.loadmodel(self.user_logger)
        except Exception as exc:
            raise PackageError(self.package.path, "launch.py", "loadmodel",
                               f"raised {type(exc).__name__}: {exc}") from exc

    def load(self) -> bool:
        self.load_artifact()
        self.execution = ExecutionChoice("thread_pool", "user code may block: always in the thread pool")
        self.runtime_reason = "the package's own launch.py"
        self.batching = BatchingChoice(1, "user code takes lists of dicts, not arrays: no adaptive batching")
        self.ready = True
        return self.ready

    async def decode_features(self, tensor: Tensor) -> list[dict[str, Any]]:
        if tensor.datatype != "BYTES":
            raise BadInput(f"input '{tensor.name}' must be BYTES holding one JSON document per row")
        rows: list[dict[str, Any]] = []
        for i, value in enumerate(to_numpy(tensor).ravel()):
            text = as_text(value, tensor.name)
            try:
                doc = orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise BadInput(f"input '{tensor.name}' element {i} is not JSON: {exc}") from exc
            if _depth_exceeds(doc, MAX_ROW_DEPTH):
                raise BadInput(f"input '{tensor.name}' element {i} nests deeper than {MAX_ROW_DEPTH} levels")
            if self.schema is not None:
                try:
                    doc = self.schema.model_validate(doc).model_dump(mode="json")
                except ValidationError as exc:
                    raise BadInput(f"input '{tensor.name}' element {i}: "
                                   f"{describe_validation_errors(exc.errors())}") from exc
            rows.append(doc)
        return rows

    def _run_user_code(self, rows: list[dict[str, Any]]) -> np.ndarray:
        try:
            features = self.launch.preprocessing(rows, self.user_logger)
        except Exception as exc:
            raise BadInput(f"preprocessing rejected the input: {type(exc).__name__}: {exc}") from exc
        if features is False:
            raise BadInput("preprocessing rejected the input")
        try:
            result = np.asarray(self.launch.predict(features, self.user_model, self.user_logger))
        except Exception as exc:
            raise InferenceError(f"predict failed: {type(exc).__name__}: {exc}") from exc
        return self._as_probabilities(result, len(rows))

    def _as_probabilities(self, result: np.ndarray, n: int) -> np.ndarray:
        k = self.package.num_classes
        if result.ndim == 2 and result.shape == (n, k):
            return result.astype(np.float32)
        if result.ndim == 1 and len(result) == n and np.issubdtype(result.dtype, np.integer):
            if result.min() < 0 or result.max() >= k:
                raise InferenceError(f"predict returned labels outside labels_file.json: {result.tolist()}")
            return np.eye(k, dtype=np.float32)[result]  # labels only: one-hot probabilities
        raise InferenceError(f"predict returned shape {list(result.shape)}; expected [{n}] labels or [{n}, {k}]")

    async def predict(self, payload: Prepared, headers: dict[str, str] | None = None) -> Prepared:
        loop = asyncio.get_running_loop()
        payload.probabilities = await loop.run_in_executor(None, self._run_user_code, payload.features)
        return payload
