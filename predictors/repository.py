"""Model repository: discover packages in a directory; load, reload and unload them at run time.

Implements what KServe's ``ModelRepository`` leaves as stubs, for the V2 model-repository
extension (``POST /v2/repository/models/{name}/load|unload``). A reload builds and
loads the new model completely (in a worker thread) before swapping it in, so requests
in flight finish on the old model and new ones go to the new one: no request fails
while a model is swapped under load. A failed load leaves the old model serving.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from kserve.model_repository import ModelRepository

from predictors.errors import UnknownModel
from predictors.models import PackageModel, ServingContext, model_for
from predictors.package import CONFIG_FILE, PackageError, discover_packages, load_package

logger = logging.getLogger(__name__)


class PackageRepository(ModelRepository):
    """Packages under ``model_dir`` (or ``model_dir`` itself if it is one package)."""

    def __init__(self, model_dir: str | Path, context: ServingContext) -> None:
        super().__init__(str(model_dir))
        self.model_root = Path(model_dir)
        self.context = context
        self._locks: dict[str, asyncio.Lock] = {}

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
        """Load or reload ``name`` from disk; swap it in only once fully loaded."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            loop = asyncio.get_running_loop()
            dirs = await loop.run_in_executor(None, self._dirs_without_errors, name)
            if name not in dirs:
                raise UnknownModel(name)
            model = await loop.run_in_executor(None, self.build, dirs[name])
            old = self.models.get(name)
            self.update(model)
            if old is not None and old is not model:
                old.stop()
            logger.info("model %s version %s loaded from %s", name, model.config.version, dirs[name])
            return True

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
