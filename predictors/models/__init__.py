"""``kserve.Model`` subclasses, one per framework, and the factory that picks one through the registry."""

from __future__ import annotations

import importlib

from predictors.models.base import PackageModel, ServingContext
from predictors.package import FRAMEWORKS, ModelPackage


def model_for(package: ModelPackage, context: ServingContext) -> PackageModel:
    """The predictor for a package: its framework's class from :data:`predictors.package.FRAMEWORKS`."""
    module, _, name = FRAMEWORKS[package.config.framework].model_class.partition(":")
    model_class: type[PackageModel] = getattr(importlib.import_module(module), name)
    return model_class(package, context)


__all__ = ["PackageModel", "ServingContext", "model_for"]
