"""The model server's settings: one pydantic-settings model, read from ``KCP_*`` environment variables.

Every variable the server process reads is a field here, defined once: its name (``KCP_`` and the
field name unless an alias says otherwise), type, bounds, default and description, and the
command-line flag when it has one (``json_schema_extra={"flag": ...}``; :func:`add_flags` builds
those flags, and a flag given on the command line wins over the environment). The same container
image is then driven by environment in Kubernetes and by the shell locally, every value is checked
once at start-up instead of where it is first used, and ``scripts/settings-table.py`` can list
them all in ``docs/settings.md``.

KServe's own flags (``--http_port``, ``--workers``, ...) stay KServe's; they are parsed in
:mod:`predictors.__main__`.

An empty variable counts as unset (the default applies), as a template that renders ``""`` for a
value it does not know means; the exceptions are named in :attr:`_Settings.EMPTY_IS_A_VALUE`
(``KCP_EXECUTION_CACHE=`` turns the cache off).
"""

from __future__ import annotations

import argparse
import ipaddress
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "KCP_"
MAX_JSON_VALUES = 1024 * 1024
"""Default bound on the values a REST body's JSON may hold (``KCP_MAX_JSON_VALUES``). A parsed value costs
many times its JSON text in Python objects (``[],`` becomes a list object), so the byte limit alone lets one
body take many times its size in memory and hold the event loop while it is built."""
DAY_S = 86400.0
"""Upper bound of the database timeouts: a larger value is a unit mistake, not a wish."""


class _Settings(BaseSettings):
    """What the server's settings models share: ``KCP_`` variables, unknown ones ignored, empty ones unset."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)

    EMPTY_IS_A_VALUE: ClassVar[frozenset[str]] = frozenset()
    """Fields for which an empty variable means something (rather than "use the default")."""

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if not (isinstance(v, str) and not v.strip() and k not in cls.EMPTY_IS_A_VALUE)}
        return data


class ImageLimits(_Settings):
    """Bounds on decoding encoded images in one request (``KCP_IMAGE_*``).

    Decoding costs memory and CPU by pixels, not by bytes: a small PNG can declare tens of megapixels.
    A package's ``decode`` step may set a lower per-image limit; these bound every package.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX + "IMAGE_")

    max_pixels: int = Field(default=16_000_000, gt=0, description="pixels of one decoded image")
    max_total_pixels: int = Field(default=64_000_000, gt=0, description="pixels of all images of one request")
    max_images: int = Field(default=256, gt=0, description="encoded images in one request")
    decode_deadline_s: float = Field(default=10.0, gt=0, description="seconds to decode one request's images")
    decode_slots: int = Field(default=1, gt=0,
                              description="requests decoding images at once in one server process, so concurrent "
                                          "requests cannot multiply the memory; decoding holds the GIL in "
                                          "stretches, and one decoding thread keeps the event loop answering "
                                          "(--workers scales across cores)")


class FetchSettings(_Settings):
    """Limits for fetching images from ``http(s)`` URLs (``KCP_URL_*``; see :mod:`predictors.protocol.fetch`)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX + "URL_")

    enabled: bool = Field(default=True, validation_alias=AliasChoices("enabled", "KCP_URL_FETCH_ENABLED"),
                          description="fetch image URLs sent as BYTES inputs at all")
    timeout_s: float = Field(default=5.0, gt=0, description="seconds per connect and per read")
    deadline_s: float = Field(default=15.0, gt=0, description="seconds for the whole fetch, redirects included")
    address_order: Literal["ipv4_first", "ipv6_first"] = Field(
        default="ipv4_first", description="which family of a host's addresses is tried first")
    max_bytes: int = Field(default=10 * 1024 * 1024, gt=0, description="bytes of one image, as sent on the wire")
    max_request_bytes: int = Field(default=32 * 1024 * 1024, gt=0,
                                   description="bytes of all images one request fetches together")
    max_redirects: int = Field(default=3, ge=0, description="redirects followed, each hop checked again")
    allowed_networks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated CIDRs exempt from the private-address ban")
    allowed_content_types: tuple[str, ...] = Field(
        default=("image/png", "image/jpeg", "image/gif", "image/bmp", "image/webp"),
        description="content types accepted from a fetched URL (a JSON list)")

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [n.strip() for n in v.split(",") if n.strip()]
        return v

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The allowed networks parsed; a malformed CIDR raises ``ValueError``."""
        return [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]


def _default_execution_cache() -> Path:
    return Path.home() / ".cache" / "kserve-classifiers" / "execution.json"


class ServerSettings(_Settings):
    """Everything about serving that is not a KServe flag (``KCP_*``)."""

    EMPTY_IS_A_VALUE: ClassVar[frozenset[str]] = frozenset({"execution_cache"})

    host: str = Field(default="0.0.0.0", description="bind address for REST and gRPC",
                      json_schema_extra={"flag": "--host"})
    api_key: str | None = Field(default=None, repr=False,
                                description="the API key every inference, metadata, repository and feedback call "
                                            "must present; unset: no key (a warning unless on loopback)")
    api_key_file: Path | None = Field(
        default=None, description="a file holding the API key (a mounted Secret): read at start, where an empty "
                                  "file stops the server, and watched for rotation; wins over KCP_API_KEY")
    api_key_overlap_s: float = Field(default=300.0, ge=0,
                                     description="seconds the previous key stays valid after the key file changes")
    feedback_db_url: str = Field(default="sqlite:///feedback.db",
                                 description="SQLAlchemy URL of the feedback store and prediction log "
                                             "(sqlite:///path.db or postgresql://...)")
    feedback_db_connect_timeout_s: float = Field(default=3.0, gt=0, lt=DAY_S,
                                                 description="PostgreSQL connect timeout in seconds (libpq rounds "
                                                             "up to 2)")
    feedback_db_statement_timeout_s: float = Field(default=10.0, gt=0, lt=DAY_S,
                                                   description="PostgreSQL statement_timeout in seconds")
    feedback_db_retry_s: float = Field(default=5.0, gt=0, lt=DAY_S,
                                       description="seconds the store counts as down after a failed call, so an "
                                                   "outage costs one attempt per period, not one per request")
    prediction_log: bool = Field(default=True, description="log every prediction, so feedback can refer to it by id")
    prediction_retention_days: float = Field(default=30.0, gt=0,
                                             description="how long feedback can refer to a prediction")
    prediction_log_flush_ms: float = Field(default=50.0, gt=0,
                                           description="longest a logged prediction waits in memory for its write")
    prediction_log_capacity: int = Field(default=100_000, ge=1,
                                         description="prediction-log rows held in memory before requests wait")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0, description="bytes of one request body")
    max_json_values: int = Field(default=MAX_JSON_VALUES, gt=0, description="values a REST body's JSON may hold")
    fetch: FetchSettings = Field(default_factory=FetchSettings, description="KCP_URL_*")
    images: ImageLimits = Field(default_factory=ImageLimits, description="KCP_IMAGE_*")
    max_batch_size: int | None = Field(default=None, ge=1,
                                       description="adaptive batching: most rows per model call, for every package "
                                                   "(1 = off; unset: each package's config)",
                                       json_schema_extra={"flag": "--max_batch_size"})
    max_latency_ms: float | None = Field(default=None, ge=0,
                                         description="adaptive batching: longest wait for a batch to fill, for "
                                                     "every package (unset: each package's config)",
                                         json_schema_extra={"flag": "--max_latency_ms"})
    ui: bool = Field(default=True, description="serve the browser page at /ui")
    metrics_auth: bool = Field(default=False, description="require the API key for /metrics and /openapi.json too "
                                                          "(default: open, for Prometheus)",
                               json_schema_extra={"flag": "--metrics-auth"})
    access_log: bool = Field(default=False, description="log one line per HTTP request (uvicorn's access log)",
                             json_schema_extra={"flag": "--access-log"})
    model_threads: int = Field(default=1, ge=1, le=256,
                               description="threads one model call may use (onnxruntime, scikit-learn's OpenMP and "
                                           "BLAS); 1 leaves the other cores to concurrent requests and workers")
    grpc_front: Literal["asyncio", "grpcio"] = Field(
        default="asyncio", description="the gRPC front end: asyncio (HTTP/2 read on the server's event loop, "
                                       "predictors.protocol.grpc_front) or grpcio (grpc.aio, grpc's C core)",
        json_schema_extra={"flag": "--grpc-front"})
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per log line, for log shippers "
                                    "(predictors.protocol.observability.use_json_logs)")
    execution_cache: Path | None = Field(
        default_factory=_default_execution_cache,
        description="where each model's timed execution choice is kept, so a restart on the same machine makes "
                    "the same choice; set empty to decide afresh at every start")

    @field_validator("api_key")
    @classmethod
    def _strip_key(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("execution_cache", mode="before")
    @classmethod
    def _empty_is_off(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _key_from_file(self) -> ServerSettings:
        """The key file wins over ``KCP_API_KEY``; an empty one stops start-up.

        An empty file is a Secret mounted before it was filled in: serving open would be the wrong guess.
        """
        if self.api_key_file is not None:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
            if not key:
                raise ValueError(f"{ENV_PREFIX}API_KEY_FILE {self.api_key_file} is empty; "
                                 "refusing to serve without the key")
            self.api_key = key
        return self

    @classmethod
    def from_env(cls, **overrides: object) -> ServerSettings:
        """The environment's settings; ``overrides`` that are not None (flags given on the command line) win."""
        return cls(**{k: v for k, v in overrides.items() if v is not None})


class ToolSettings(_Settings):
    """What the client commands read: ``python -m predictors deploy`` and ``python -m predictors.feedback``.

    Not the server's: they run on a workstation or in CI, against a server or a cluster elsewhere.
    """

    server_url: str = Field(default="http://127.0.0.1:8080", description="the model server's REST address "
                                                                         "(python -m predictors.feedback)",
                            json_schema_extra={"flag": "--url"})
    api_key: str | None = Field(default=None, repr=False,
                                description="the key python -m predictors.feedback presents (the server's own "
                                            "KCP_API_KEY, when both run in one shell)",
                                json_schema_extra={"flag": "--api-key"})
    helm: Path | None = Field(default=None, description="the helm binary deploy runs (unset: the project's pinned "
                                                        "one in .tools/bin, else helm on PATH)")
    chart: Path | None = Field(default=None, description="the chart deploy renders (unset: helm/kserve-classifiers)",
                               json_schema_extra={"flag": "--chart"})

    @field_validator("api_key")
    @classmethod
    def _strip_key(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None


def explain(exc: ValidationError) -> str:
    """A settings error in the operator's words: the variable, the value given and what is wrong, one per line.

    pydantic names the field and the model; whoever set the environment knows the variable.
    """
    models: dict[str, type[BaseSettings]] = {m.__name__: m for m in (ServerSettings, FetchSettings, ImageLimits,
                                                                      ToolSettings)}
    model = models.get(exc.title)
    lines = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else None
        if model is not None and field in model.model_fields:
            where = f"{env_name(model, field, model.model_fields[field])}={error.get('input')!r}: "
        else:
            where = ""
        lines.append(where + error["msg"].removeprefix("Value error, "))
    return "\n".join(lines)


def env_name(model: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The environment variable that sets ``field`` of ``model``: its ``KCP_*`` alias, else prefix + name."""
    alias = field.validation_alias
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
    for choice in choices:
        if isinstance(choice, str) and choice.startswith(ENV_PREFIX):
            return choice
    return (str(model.model_config.get("env_prefix", "")) + name).upper()


def flag_of(field: FieldInfo) -> str | None:
    """The command-line flag of a field, if it has one."""
    extra = field.json_schema_extra
    return extra.get("flag") if isinstance(extra, dict) else None  # type: ignore[return-value]


def add_flags(parser: argparse.ArgumentParser, model: type[BaseSettings] = ServerSettings) -> None:
    """Add the flag of every field that has one, with the field's description.

    A flag not given leaves no attribute on the parsed namespace (``argparse.SUPPRESS``), so the
    environment applies unless the flag is on the command line.
    """
    for name, field in model.model_fields.items():
        flag = flag_of(field)
        if flag is None:
            continue
        help_text = f"{field.description} (env {env_name(model, name, field)})"
        kind = _value_type(field.annotation)
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text)
            continue
        default = "" if field.default is None else f" (default: {field.default})"
        parser.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, metavar=name.upper(),
                            help=help_text + default)


def _value_type(annotation: Any) -> Any:
    """``int`` for ``int | None``: the type a flag's text is converted to."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (bool, int, float) else str


__all__ = ["ENV_PREFIX", "MAX_JSON_VALUES", "FetchSettings", "ImageLimits", "ServerSettings", "ToolSettings",
           "add_flags", "env_name", "explain", "flag_of"]
