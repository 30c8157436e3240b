"""The two read-only REST helpers the page needs that the V2 protocol has no place for.

``POST /v2/models/{name}/preprocess``
    Same body as ``/infer``; answers the model's input tensor *after* its preprocessing, as
    FP32 ``[N, S, S]`` in [0, 1], in the shape of a V2 response. It runs the model's own
    ``preprocess`` (validation, decoding, URL fetching, the package's pipeline), so what the
    page shows is exactly what the classifier receives — not a re-implementation that could
    drift from it. Image models only: a tabular model's input is already what the user typed.
``GET /v2/models/{name}/card``
    What a person needs to try the model and that V2 metadata does not carry: task,
    description, feature names, class names, top-k, and for a model whose rows are JSON
    objects (Katonic) the fields of one row (``row_fields``, from its ``schema.py``): its
    input tensor is BYTES ``[-1]``, which says nothing about what to type.

Both live under ``/v2/models/{name}/`` so the API key guards them like every model endpoint,
and every failure is a 4xx/503 ``{"error": ...}`` answered here, whatever app mounts them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from kserve.errors import ModelNotReady
from pydantic import BaseModel

from predictors.protocol.errors import BadInput, UnknownModel
from predictors.protocol.rest import JSONErrorRoute
from predictors.protocol.v2 import BINARY_HEADER, parse_rest

ModelLookup = Callable[[str], Any]
"""``lookup(name)``: the served model called ``name``, or ``None``."""


def _ready_model(lookup: ModelLookup, name: str) -> Any:
    model = lookup(name)
    if model is None:
        raise UnknownModel(name)
    if not getattr(model, "ready", False):
        raise ModelNotReady(name)
    return model


_FIELD_TYPES = {"number": "number", "integer": "integer", "string": "string", "boolean": "boolean"}


def row_fields(model: Any) -> list[dict[str, Any]] | None:
    """The fields of one JSON-object row from the model's pydantic row schema; None when it has none.

    Each field: ``name``, ``type`` (number, integer, string, boolean, or json for anything else),
    ``required``, ``title`` and ``description`` as the schema gives them, and the numeric bounds.
    """
    schema = getattr(model, "schema", None)
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        return None
    document = schema.model_json_schema()
    required = set(document.get("required", []))
    fields = []
    for name, spec in document.get("properties", {}).items():
        kind = spec.get("type")
        if kind is None and "anyOf" in spec:  # Optional[X]: the non-null branch
            kinds = [branch.get("type") for branch in spec["anyOf"] if branch.get("type") != "null"]
            kind = kinds[0] if len(kinds) == 1 else None
        field = {"name": name, "type": _FIELD_TYPES.get(kind or "", "json"), "required": name in required,
                 "title": spec.get("title", name), "description": spec.get("description")}
        for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if bound in spec:
                field[bound] = spec[bound]
        fields.append(field)
    return fields


def describe(model: Any) -> dict[str, Any]:
    """The card of a served package model (see the module docstring)."""
    config = model.config
    labels = model.package.labels
    rows_are_objects = config.framework == "katonic"
    columns = len(config.inputs) > 1
    categories = model.categories() if columns and hasattr(model, "categories") else {}
    return {
        "name": model.name,
        "version": config.version,
        "framework": config.framework,
        "task": config.task,
        "description": config.description,
        "input": config.input.model_dump(),
        "image_size": config.image_size,
        "image_shape": [*config.image_shape, config.channels][:3] if config.image_shape else None,
        "feature_names": config.feature_names,
        "labels": [{"label": label, "name": labels.name_of(label)} for label in labels.labels],
        "top_k": min(config.postprocessing.top_k, len(labels.labels)),
        "max_batch_size": config.max_batch_size,
        "row_format": "json_object" if rows_are_objects else "columns" if columns else "tensor",
        "row_fields": row_fields(model) if rows_are_objects else None,
        "columns": [{**spec.model_dump(), "categories": categories.get(spec.name)} for spec in config.inputs]
        if columns else None,
    }


def build_ui_router(lookup: ModelLookup) -> APIRouter:
    """The ``/preprocess`` and ``/card`` routes over the models ``lookup`` finds."""
    router = APIRouter(route_class=JSONErrorRoute, tags=["ui"])

    @router.post("/v2/models/{model_name}/preprocess")
    async def preprocess(model_name: str, request: Request) -> Response:
        """The model's input after its own preprocessing: FP32 [N, H, W] or [N, H, W, C] in [0, 1] (image
        models)."""
        model = _ready_model(lookup, model_name)
        config = getattr(model, "config", None)
        if config is None or config.task != "image_classification":
            raise BadInput(f"model '{model_name}' is not an image model: the preprocessed preview shows the image "
                           "a model sees, and this model takes its features as sent")
        infer_request = parse_rest(await request.body(), request.headers.get(BINARY_HEADER), model_name)
        prepared = await model.preprocess(infer_request)
        features = np.asarray(prepared.features, dtype=np.float32)
        body = {
            "model_name": model_name,
            "model_version": config.version,
            "outputs": [{"name": config.input.name, "datatype": "FP32", "shape": list(features.shape),
                         "data": features.ravel()}],
        }
        return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")

    @router.get("/v2/models/{model_name}/card")
    async def card(model_name: str) -> JSONResponse:
        """Task, description, feature names and class names of a served model."""
        model = _ready_model(lookup, model_name)
        if getattr(model, "package", None) is None:
            raise BadInput(f"model '{model_name}' has no package description")
        return JSONResponse(describe(model))

    return router


__all__ = ["ModelLookup", "build_ui_router", "describe"]
