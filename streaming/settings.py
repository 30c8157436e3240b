"""Settings for everything in ``streaming``: pydantic-settings models read from ``KCP_*`` variables.

One prefix per concern, so the same container image is configured by environment in Kubernetes
and by flags locally (CLI flags override the environment; see ``streaming.__main__``):

* ``KCP_KAFKA_*``   -- how to reach Kafka (``KCP_KAFKA_BOOTSTRAP_SERVERS``, SASL/TLS, group timings);
* ``KCP_PUBSUB_*``  -- Google Pub/Sub project and emulator;
* ``KCP_V2_*``      -- how the bridge reaches the model server (gRPC or REST, retries, API key);
* ``KCP_BRIDGE_*``  -- topics, concurrency, batching, health port of the bridge.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["kafka", "pubsub"]
Source = Literal["broker", "http"]


class KafkaSettings(BaseSettings):
    """Connection and consumer-group settings for kafka-python."""

    model_config = SettingsConfigDict(env_prefix="KCP_KAFKA_", extra="ignore")

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "kcp-streaming"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = Field(default=None, description="client certificate (mutual TLS)")
    ssl_keyfile: str | None = None
    ssl_password: SecretStr | None = None
    # A new consumer group starts at the beginning: with "latest" a group created after the first
    # requests were produced would silently skip them, which is exactly the loss we promise not to have.
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    commit_interval_ms: int = Field(default=500, ge=0, description="how often completed offsets are committed")
    # "all" is what at-least-once needs; the bridge refuses "0" and warns about "1" (see BridgeSettings).
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = Field(default=5, ge=0)
    # Bytes per partition the producer packs into one record batch. kafka-python's 16 KiB default holds about a
    # dozen results, and its sender's per-batch work then costs more CPU than the records.
    # Capped at max_request_size.
    batch_size: int = Field(default=256 * 1024, ge=1024)
    # The largest record the producer sends (kafka-python's default). Keep it at or below the broker's and
    # topic's message.max.bytes; the bridge cuts dead letters to fit it.
    max_request_size: int = Field(default=1_048_576, ge=4096)
    # How long the broker may hold an empty fetch. Kafka answers as soon as data arrives, but tansu holds an
    # empty fetch for the whole wait even when records arrive meanwhile, so each hop of a request/result round
    # trip costs up to this much: Kafka's default would dominate the bridge's latency. A short wait costs only
    # a few empty fetches a second per idle consumer.
    fetch_max_wait_ms: int = Field(default=20, ge=0, le=10_000)
    max_block_ms: int = Field(default=60_000, ge=100)

    def client_config(self) -> dict[str, object]:
        """Keyword arguments shared by kafka-python's producer, consumer and admin client."""
        cfg: dict[str, object] = {
            "bootstrap_servers": [s.strip() for s in self.bootstrap_servers.split(",") if s.strip()],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            cfg["sasl_mechanism"] = self.sasl_mechanism
            cfg["sasl_plain_username"] = self.sasl_plain_username
            password = self.sasl_plain_password
            cfg["sasl_plain_password"] = password.get_secret_value() if password else None
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                cfg[name] = getattr(self, name)
        if self.ssl_password:
            cfg["ssl_password"] = self.ssl_password.get_secret_value()
        return cfg


class PubSubSettings(BaseSettings):
    """Google Pub/Sub: the project, and the emulator address when testing locally."""

    model_config = SettingsConfigDict(env_prefix="KCP_PUBSUB_", extra="ignore")

    project: str = "kcp-local"
    # Falls back to the variable Google's own clients read, so an existing emulator setup just works.
    emulator_host: str | None = Field(
        default=None,
        validation_alias=AliasChoices("emulator_host", "KCP_PUBSUB_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST"))
    auto_create: bool = Field(default=True, description="create missing topics and subscriptions")
    max_outstanding: int = Field(default=200, ge=1, description="flow control: unacked messages per subscriber")
    ack_deadline_s: int = Field(default=60, ge=10, le=600)


class MessengerSettings(BaseSettings):
    """Which backend a :class:`streaming.messenger.Messenger` uses, and both backends' settings."""

    model_config = SettingsConfigDict(env_prefix="KCP_MESSENGER_", extra="ignore")

    backend: Backend = "kafka"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    pubsub: PubSubSettings = Field(default_factory=PubSubSettings)


class V2ClientSettings(BaseSettings):
    """How to reach a V2 (Open Inference Protocol) server, and how hard to retry."""

    model_config = SettingsConfigDict(env_prefix="KCP_V2_", extra="ignore", populate_by_name=True)

    protocol: Literal["grpc", "rest"] = "grpc"
    rest_url: str = "http://127.0.0.1:8080"
    grpc_target: str = "127.0.0.1:8081"
    # The server reads KCP_API_KEY; accepting it here too lets one Secret configure both.
    api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("api_key", "KCP_V2_API_KEY",
                                                                                  "KCP_API_KEY"))
    timeout_s: float = Field(default=30.0, gt=0)
    retry_initial_s: float = Field(default=0.2, gt=0)
    retry_max_s: float = Field(default=5.0, gt=0)
    # Outages (connection refused, UNAVAILABLE, 503) are retried forever: the bridge keeps its place.
    # A 500 on a healthy server may be a poison message; after this many attempts it is dead-lettered.
    max_server_error_retries: int = Field(default=5, ge=0)
    # A call that exceeds timeout_s is retried this often, then the request is dead-lettered alone.
    max_timeout_retries: int = Field(default=2, ge=0)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Merged calls stay under this many payload bytes: KServe's default gRPC receive limit (8 MiB, which the
    # chart keeps) less a margin for protobuf framing. A request over it alone is still sent once.
    max_call_bytes: int = Field(default=8 * 1024 * 1024 - 64 * 1024, ge=1024)
    # Rows (first dimension) of one merged call when the model's V2 metadata publishes no ``max_batch_size``
    # (in ``parameters`` or ``properties``): the default limit of this project's server. A model with a lower
    # limit that does not publish it refuses the merged call, which is then retried one request at a time.
    max_batch_rows: int = Field(default=256, ge=1)
    # How long a model's row limit read from its metadata is trusted before it is read again.
    metadata_ttl_s: float = Field(default=300.0, gt=0)
    # Per-model routing ("{model}" in the target): a name whose host does not resolve is checked this many
    # times (with backoff) before its messages are refused as unroutable, and the refusal is remembered for
    # unroutable_ttl_s so a flood of such names costs one check each, not one per message.
    route_checks: int = Field(default=3, ge=1)
    unroutable_ttl_s: float = Field(default=30.0, ge=0)
    # Per-model routing keeps at most this many transports (channels); the least recently used is closed.
    max_transports: int = Field(default=32, ge=1)

    @field_validator("api_key")
    @classmethod
    def _blank_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is not None and v.get_secret_value().strip() else None


class BridgeSettings(BaseSettings):
    """Topics, concurrency and request-decoding defaults of the Kafka -> V2 -> Kafka bridge."""

    model_config = SettingsConfigDict(env_prefix="KCP_BRIDGE_", extra="ignore")

    backend: Backend = "kafka"
    # "broker": the bridge consumes the request topic itself (group `group`). "http": a Knative KafkaSource consumes
    # it and pushes each record here as a CloudEvent; results and dead letters still go to `backend`'s topics.
    source: Source = Field(default="broker", description="where requests come from: broker (consume) or http (push)")
    request_topic: str = "kcp-requests"
    result_topic: str = "kcp-results"
    dead_letter_topic: str = "kcp-dead-letters"
    group: str = "kcp-bridge"
    http_host: str = Field(default="127.0.0.1", description="source http: bind address of the CloudEvents receiver")
    http_port: int = Field(default=8080, ge=0, le=65535, description="source http: its port, 0 picks a free one")
    # A delivery over it is answered 413 (the KafkaSource then dead-letters the record to its own sink).
    http_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="source http: largest body")
    max_in_flight: int = Field(default=8, ge=1, description="concurrent V2 calls")
    # Larger merged calls spread the model server's per-call cost over more results (its CPU per result falls
    # as the batch grows, and the bridge's with it); the merged call stays under max_call_bytes whatever the size.
    max_batch_size: int = Field(default=64, ge=1, description="requests merged into one V2 call (1 = off)")
    max_batch_delay_ms: float = Field(default=5.0, ge=0)
    max_pending: int = Field(default=512, ge=1, description="messages consumed but not yet acknowledged")
    # Bytes that consumed-but-unacknowledged messages keep alive: each one's value plus its decoded tensors (a JSON
    # number list costs several times its raw bytes as Python objects). A full queue of pending images would not
    # fit a 512 Mi pod; this budget does, with the interpreter, clients and in-flight calls beside it.
    max_pending_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Request ids become the result key, CloudEvent id and correlation header: longer ones are refused
    # (dead-lettered), so a result can never outgrow its request many times over.
    max_id_chars: int = Field(default=256, ge=8)
    # Every message is finished within this long of being consumed: a call (or a result send) still failing
    # then is given up and the message dead-lettered (kind "deadline"), so nothing waits on it for ever.
    message_deadline_s: float = Field(default=600.0, gt=0)
    # How long a dead letter may keep failing transiently before the bridge gives up on it: the message is
    # then left unacknowledged (it is delivered again after a restart) and /readyz reports "failing".
    dead_letter_timeout_s: float = Field(default=60.0, gt=0)
    # Label values the bridge gives its per-model metrics: models that answered at least once, up to this
    # many; any other model string from a message is counted as "other".
    max_model_labels: int = Field(default=64, ge=1)
    poll_timeout_ms: int = Field(default=200, ge=1)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    health_host: str = "127.0.0.1"
    health_port: int = Field(default=8090, ge=0, le=65535, description="0 picks a free port")
    default_row_model: str = "iris"
    default_image_model: str = "fashion-mnist"
    input_name: str = "input-0"
    # This project's server echoes a BYTES "ids" input per row and logs predictions under it;
    # set it empty for servers whose models have no such input (Triton, MLServer).
    ids_input: str | None = Field(default="ids", description="BYTES input carrying request ids; empty = none")
    row_features: list[str] = Field(default=["sepal_length", "sepal_width", "petal_length", "petal_width"])
    cloudevents_source: str = "/kcp/streaming/bridge"
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    pubsub: PubSubSettings = Field(default_factory=PubSubSettings)
    v2: V2ClientSettings = Field(default_factory=V2ClientSettings)

    @model_validator(mode="after")
    def _delivery_guarantee(self) -> BridgeSettings:
        if self.backend == "kafka" and self.kafka.acks == "0":
            raise ValueError("KCP_KAFKA_ACKS=0 removes the bridge's delivery guarantee (a result or dead letter "
                             "could be lost after its request was committed); use 'all' (or '1')")
        return self

    @field_validator("ids_input")
    @classmethod
    def _empty_is_none(cls, v: str | None) -> str | None:
        return v or None

    def messenger(self) -> MessengerSettings:
        """The messenger settings this bridge's source and sink use."""
        return MessengerSettings(backend=self.backend, kafka=self.kafka, pubsub=self.pubsub)



_MODELS: dict[str, type[BaseSettings]] = {m.__name__: m for m in (KafkaSettings, PubSubSettings, MessengerSettings,
                                                                     V2ClientSettings, BridgeSettings)}
_SECRET_FIELDS = frozenset({"sasl_plain_password", "ssl_password", "api_key"})


def _variable(model: type[BaseSettings] | None, loc: tuple[int | str, ...]) -> str:
    """The ``KCP_*`` variable a field path of ``model`` is read from (nested settings have their own prefix)."""
    for i, part in enumerate(loc):
        if model is None:
            break
        field = model.model_fields.get(str(part))
        nested = field.annotation if field is not None else None
        if isinstance(nested, type) and issubclass(nested, BaseSettings) and i + 1 < len(loc):
            model = nested
            continue
        return f"{model.model_config.get('env_prefix', '')}{str(part).upper()}"
    return ".".join(str(p) for p in loc) or "settings"


def describe_error(exc: ValidationError) -> str:
    """A settings error as the variables to fix, one per line: a user sets ``KCP_*`` variables or flags, not
    the field paths pydantic names. Secrets are never echoed."""
    model = _MODELS.get(exc.title)
    lines = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        name = _variable(model, loc)
        shown = "" if (loc and str(loc[-1]) in _SECRET_FIELDS) or isinstance(error.get("input"), dict) else \
            f" (got {error['input']!r})" if "input" in error else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{name}: {message}{shown}" if loc else message)
    return "invalid settings:\n" + "\n".join(f"  {line}" for line in lines)
