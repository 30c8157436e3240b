"""``kserve.Model`` subclasses, one per framework, and the factory that picks one for a package."""

from __future__ import annotations

from predictors.models.base import PackageModel, ServingContext
from predictors.package import ModelPackage


def model_for(package: ModelPackage, context: ServingContext) -> PackageModel:
    """The predictor class for a package's framework (imported lazily: TensorFlow is heavy)."""
    framework = package.config.framework
    if framework == "sklearn":
        from predictors.models.tabular import TabularModel

        return TabularModel(package, context)
    if framework == "keras":
        from predictors.models.image import ImageModel

        return ImageModel(package, context)
    from predictors.models.katonic import KatonicModel

    return KatonicModel(package, context)


__all__ = ["PackageModel", "ServingContext", "model_for"]
