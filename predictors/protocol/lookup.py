"""Finding the served model a request names: one rule for REST, gRPC and the feature routers."""

from __future__ import annotations

from typing import Any, Protocol

from kserve.errors import ModelNotReady

from predictors.protocol.errors import UnknownModel


class ModelRegistry(Protocol):
    def get_model(self, name: str) -> Any: ...


def served_model(registry: ModelRegistry, model_name: str, model_version: str | None) -> Any:
    """The served model named, or 404 (:class:`UnknownModel`) if it is not served or not at ``model_version``."""
    model = registry.get_model(model_name)
    if model is None:
        raise UnknownModel(model_name)
    config = getattr(model, "config", None)
    if model_version is not None and (config is None or model_version != config.version):
        raise UnknownModel(f"{model_name} version {model_version}")
    return model


def ready_model(registry: ModelRegistry, model_name: str, model_version: str | None) -> Any:
    """:func:`served_model`, and 503 (``ModelNotReady``) while it is not ready."""
    model = served_model(registry, model_name, model_version)
    if not model.ready:
        raise ModelNotReady(model_name)
    return model
