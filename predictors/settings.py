"""Server settings: pydantic models filled from ``KCP_*`` environment variables.

Command-line flags keep KServe's spelling (they are parsed in ``predictors.__main__``);
everything that is not a KServe flag is configured here, so the same container image
is driven by env vars in Kubernetes and by the shell locally.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from predictors.protocol.fetch import FetchSettings
from predictors.protocol.v2 import MAX_JSON_VALUES

ENV_PREFIX = "KCP_"


class ImageLimits(BaseModel):
    """Bounds on decoding encoded images in one request (env ``KCP_IMAGE_*``).

    Decoding costs memory and CPU by pixels, not by bytes: a small PNG can declare tens of megapixels.
    A package's ``decode`` step may set a lower per-image limit; these bound every package.
    """

    max_pixels: int = Field(default=16_000_000, gt=0, description="pixels of one image (KCP_IMAGE_MAX_PIXELS)")
    max_total_pixels: int = Field(default=64_000_000, gt=0,
                                  description="pixels of all images of one request (KCP_IMAGE_MAX_TOTAL_PIXELS)")
    max_images: int = Field(default=256, gt=0, description="encoded images in one request (KCP_IMAGE_MAX_IMAGES)")
    decode_deadline_s: float = Field(default=10.0, gt=0,
                                     description="decoding one request's images (KCP_IMAGE_DECODE_DEADLINE_S)")
    decode_slots: int = Field(default=1, gt=0, description="requests decoding images at once in one server "
                                                          "process, so concurrent requests cannot multiply the "
                                                          "memory; decoding holds the GIL in stretches, and one "
                                                          "decoding thread keeps the event loop answering "
                                                          "(--workers scales across cores) "
                                                          "(KCP_IMAGE_DECODE_SLOTS)")


class ServerSettings(BaseModel):
    """Everything about serving that is not a KServe flag."""

    host: str = "0.0.0.0"
    api_key: str | None = Field(default=None, repr=False)
    feedback_db_url: str = "sqlite:///feedback.db"
    prediction_log: bool = True
    prediction_retention_days: float = Field(default=30.0, gt=0,
                                             description="how long feedback can refer to a prediction")
    prediction_log_flush_ms: float = Field(default=50.0, gt=0,
                                           description="longest a logged prediction waits in memory for its write")
    prediction_log_capacity: int = Field(default=100_000, ge=1,
                                         description="prediction-log rows held in memory before requests wait")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0)
    max_json_values: int = Field(default=MAX_JSON_VALUES, gt=0,
                                 description="values a REST body's JSON may hold (KCP_MAX_JSON_VALUES)")
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    images: ImageLimits = Field(default_factory=ImageLimits)
    max_batch_size: int | None = Field(default=None, ge=1, description="override every package's batching")
    max_latency_ms: float | None = Field(default=None, ge=0)
    ui: bool = True
    metrics_auth: bool = Field(default=False, description="require the API key for /metrics and /openapi.json")
    access_log: bool = Field(default=False, description="one log line per HTTP request (uvicorn's access log)")
    model_threads: int = Field(default=1, ge=1, le=256,
                               description="threads one model call may use (onnxruntime, scikit-learn's OpenMP and "
                                           "BLAS); 1 leaves the other cores to concurrent requests and workers")
    execution_cache: Path | None = Field(
        default_factory=lambda: Path.home() / ".cache" / "kserve-classifiers" / "execution.json",
        description="where each model's timed execution choice is kept, so a restart on the same machine "
                    "makes the same choice; unset: decide afresh at every start")

    @field_validator("api_key")
    @classmethod
    def _non_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        return v.strip() if v else v

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> ServerSettings:
        """Read ``KCP_*`` variables; ``overrides`` (from the command line) win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}

        def get(name: str) -> str | None:
            return env.get(ENV_PREFIX + name)

        key = get("API_KEY")
        key_file = get("API_KEY_FILE")
        if key_file:
            key = Path(key_file).read_text(encoding="utf-8").strip()
            if not key:  # a Secret mounted before it was filled in: serving open would be the wrong guess
                raise ValueError(f"{ENV_PREFIX}API_KEY_FILE {key_file} is empty; refusing to serve without the key")
        if key:
            values["api_key"] = key
        for field, var in (("feedback_db_url", "FEEDBACK_DB_URL"), ("max_body_bytes", "MAX_BODY_BYTES"),
                           ("prediction_log", "PREDICTION_LOG"), ("ui", "UI"),
                           ("metrics_auth", "METRICS_AUTH"), ("access_log", "ACCESS_LOG"),
                           ("prediction_retention_days", "PREDICTION_RETENTION_DAYS"),
                           ("prediction_log_flush_ms", "PREDICTION_LOG_FLUSH_MS"),
                           ("prediction_log_capacity", "PREDICTION_LOG_CAPACITY"),
                           ("model_threads", "MODEL_THREADS")):
            if get(var) is not None:
                values[field] = get(var)
        cache = get("EXECUTION_CACHE")
        if cache is not None:
            values["execution_cache"] = Path(cache) if cache else None
        if get("MAX_JSON_VALUES") is not None:
            values["max_json_values"] = get("MAX_JSON_VALUES")
        images = {field: get(f"IMAGE_{field.upper()}") for field in ImageLimits.model_fields}
        values["images"] = ImageLimits(**{k: v for k, v in images.items() if v is not None})
        fetch: dict[str, object] = {}
        for field, var in (("enabled", "URL_FETCH_ENABLED"), ("timeout_s", "URL_TIMEOUT_S"),
                           ("max_bytes", "URL_MAX_BYTES"), ("max_redirects", "URL_MAX_REDIRECTS")):
            if get(var) is not None:
                fetch[field] = get(var)
        if get("URL_ALLOWED_NETWORKS"):
            fetch["allowed_networks"] = [n.strip() for n in get("URL_ALLOWED_NETWORKS").split(",") if n.strip()]
        values["fetch"] = FetchSettings(**fetch)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
