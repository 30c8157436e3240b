"""Model repository: discover packages in a directory; load, reload and unload them at run time.

Implements what KServe's ``ModelRepository`` leaves as stubs, for the V2 model-repository
extension (``POST /v2/repository/models/{name}/load|unload``). A reload builds and
loads the new model completely (in a worker thread) before swapping it in, so requests
in flight finish on the old model and new ones go to the new one: no request fails
while a model is swapped under load. A failed load leaves the old model serving.

Concurrent requests: loads of one name run one at a time (a per-name lock that exists only while
a load of that name is pending, created after the name is found on disk, so requests for random
names cannot grow the lock table). An unload that arrives while a load of the name is pending
wins: the pending load discards what it built and answers 409 instead of silently putting the
model back; the unload also answers 200 when the model was not yet loaded but a load was pending.
KServe's repository extension calls :meth:`PackageRepository.unload` synchronously on the event
loop, the same loop the loads run on, so the bookkeeping needs no thread lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import grpc
from kserve.model_repository import ModelRepository

from predictors.models import PackageModel, ServingContext, model_for
from predictors.package import CONFIG_FILE, PackageError, discover_packages, load_package
from predictors.protocol.errors import ClientError, UnknownModel
from predictors.runtime.heap import freeze_loaded_heap

logger = logging.getLogger(__name__)


class LoadSuperseded(ClientError):
    """The model was unloaded while this load was pending; the unload stands: 409 / ABORTED."""

    status = HTTPStatus.CONFLICT
    code = grpc.StatusCode.ABORTED

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name} was unloaded while this load was in progress; the unload stands "
                         "and the model is not served: load it again to serve it")


@dataclass
class _Pending:
    """Loads of one name waiting or running: their lock, and how many hold or wait for it."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class PackageRepository(ModelRepository):
    """Packages under ``model_dir`` (or ``model_dir`` itself if it is one package)."""

    def __init__(self, model_dir: str | Path, context: ServingContext) -> None:
        super().__init__(str(model_dir))
        self.model_root = Path(model_dir)
        self.context = context
        self._pending: dict[str, _Pending] = {}
        self._unloads = 0  # unload requests so far: a load started at n is superseded if one came after
        self._last_unload: dict[str, int] = {}  # name -> value of _unloads at its last unload

    def package_dirs(self) -> dict[str, Path]:
        """Package name → directory, read fresh from disk (names come from config.json, not folder names)."""
        if (self.model_root / CONFIG_FILE).is_file():
            dirs = [self.model_root]
        elif self.model_root.is_dir():
            dirs = discover_packages(self.model_root)
        else:
            raise PackageError(self.model_root, ".", None, "model directory does not exist")
        found: dict[str, Path] = {}
        for d in dirs:
            package = load_package(d)
            if package.name in found:
                raise PackageError(d, CONFIG_FILE, "name", f"duplicate model name '{package.name}' "
                                                           f"(also in {found[package.name]})")
            found[package.name] = d
        return found

    def build(self, directory: Path) -> PackageModel:
        """Validate a package and load its model (blocking: call from a worker thread)."""
        model = model_for(load_package(directory), self.context)
        model.load()
        return model

    def load_all(self) -> list[PackageModel]:
        """Load every package at start-up; any failure stops the server with the package error."""
        models = [self.build(d) for d in self.package_dirs().values()]
        if not models:
            raise PackageError(self.model_root, ".", None, "contains no model packages (no */config.json)")
        for model in models:
            self.update(model)
        return models

    async def load(self, name: str) -> bool:
        """Load or reload ``name`` from disk; swap it in only once fully loaded, unless unloaded meanwhile."""
        started = self._unloads
        loop = asyncio.get_running_loop()
        dirs = await loop.run_in_executor(None, self._dirs_without_errors, name)
        if name not in dirs:
            raise UnknownModel(name)
        async with self._exclusive(name):
            model = await loop.run_in_executor(None, self.build, dirs[name])
            if self._last_unload.get(name, -1) >= started:
                model.stop()
                raise LoadSuperseded(name)
            old = self.models.get(name)
            self.update(model)
            if old is not None and old is not model:
                old.stop()
            freeze_loaded_heap()
            logger.info("model %s version %s loaded from %s", name, model.config.version, dirs[name])
            return True

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str) -> AsyncIterator[None]:
        """Hold ``name``'s load lock; the entry is removed when no load of the name is pending."""
        pending = self._pending.setdefault(name, _Pending())
        pending.users += 1
        try:
            async with pending.lock:
                yield
        finally:
            pending.users -= 1
            if pending.users == 0:
                del self._pending[name]

    def unload(self, name: str) -> None:
        """Stop serving ``name``, and make every load of it pending now discard its result.

        Raises ``KeyError`` (KServe's extension answers 404) when the name is neither served nor loading.
        """
        if name not in self.models and name not in self._pending:
            raise KeyError(f"model with name {name} does not exist")
        self._last_unload[name] = self._unloads
        self._unloads += 1
        if name in self.models:
            super().unload(name)
            freeze_loaded_heap()
        logger.info("model %s unloaded", name)

    def _dirs_without_errors(self, name: str) -> dict[str, Path]:
        """Like package_dirs, but a broken *other* package does not block loading this one."""
        found: dict[str, Path] = {}
        dirs = [self.model_root] if (self.model_root / CONFIG_FILE).is_file() else discover_packages(self.model_root)
        for d in dirs:
            try:
                package = load_package(d)
            except PackageError:
                if d.name == name:
                    raise
                continue
            found.setdefault(package.name, d)
        return found

    def load_model(self, name: str) -> bool:  # KServe's synchronous hook; the async ``load`` is used instead
        raise NotImplementedError("use the async load()")
