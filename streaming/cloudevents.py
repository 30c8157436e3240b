"""CloudEvents 1.0 Kafka protocol binding: read binary and structured mode, write binary mode.

Knative's KafkaSource delivers and KafkaSink writes CloudEvents in *binary* mode: each context
attribute is a ``ce_<name>`` header with a UTF-8 value, ``datacontenttype`` is the
``content-type`` header, and the record value is the event data unchanged. Supporting that on
both sides lets the bridge sit behind a KafkaSource or in front of a KafkaSink without adapters.
*Structured* mode (``content-type: application/cloudevents+json``, the whole event as JSON in the
value) is accepted on input too. Spec: github.com/cloudevents/spec ``kafka-protocol-binding.md``.

Kept as our own code rather than the ``cloudevents`` SDK, which the tests use as an independent check of
it. The bridge decodes one event per consumed message, and the SDK does not do what the bridge needs on its
own: it invents an ``id`` and a ``time`` for an event that lacks them (a request id must come from the
message, to stay the same on redelivery), accepts other spec versions and fails on a header that is not
UTF-8, so wrapping it in these checks costs several times this module's per-message time, a cost the hot
path pays on every message (``python -m devtools.cloudevents_cost`` measures both).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

SPEC_VERSION = "1.0"
HEADER_PREFIX = "ce_"
CONTENT_TYPE = "content-type"
STRUCTURED_JSON = "application/cloudevents+json"
REQUIRED = ("id", "source", "specversion", "type")
KNOWN = (*REQUIRED, "datacontenttype", "dataschema", "subject", "time")
_ATTRIBUTE_NAME = re.compile(r"^[a-z0-9]{1,64}$")
_VALID_NAMES: set[str] = set()
_KNOWN_HEADERS = tuple((k, CONTENT_TYPE if k == "datacontenttype" else HEADER_PREFIX + k) for k in KNOWN)


class CloudEventError(ValueError):
    """A record claims to be a CloudEvent but is not a valid one."""


@dataclass
class CloudEvent:
    """The context attributes and data of one event (data as raw bytes)."""

    id: str
    source: str
    type: str
    specversion: str = SPEC_VERSION
    datacontenttype: str | None = None
    dataschema: str | None = None
    subject: str | None = None
    time: str | None = None
    extensions: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None

    def attributes(self) -> dict[str, str]:
        """All context attributes as strings (the binary-mode header set, unprefixed)."""
        out = {k: v for k in KNOWN if (v := getattr(self, k)) is not None}
        out.update(self.extensions)
        return out


def now() -> str:
    """An RFC 3339 timestamp, the format of the ``time`` attribute."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def from_kafka(headers: Iterable[tuple[str, bytes]], value: bytes | None) -> CloudEvent | None:
    """Decode a Kafka record as a CloudEvent; None if it is not one, CloudEventError if malformed.

    Header names compare case-insensitively (the last of a name wins); this runs once per consumed message,
    so the loop stays flat (no helper call per header)."""
    attrs: dict[str, str] = {}
    content_type: str | None = None
    for k, v in headers:
        name = k.lower()
        if name.startswith(HEADER_PREFIX):
            attrs[name[3:]] = v.decode("utf-8", errors="replace") if v else ""
        elif name == CONTENT_TYPE:
            content_type = v.decode("utf-8", errors="replace") if v is not None else None
    if content_type and content_type.lower().startswith(STRUCTURED_JSON):
        return _from_structured(value or b"")
    if "specversion" not in attrs:
        return None
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    return _build(attrs, value)


def _from_structured(value: bytes) -> CloudEvent:
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CloudEventError(f"structured CloudEvent is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CloudEventError("structured CloudEvent must be a JSON object")
    data: bytes | None = None
    if "data_base64" in doc:
        try:
            data = base64.b64decode(doc.pop("data_base64"), validate=True)
        except (ValueError, TypeError) as exc:
            raise CloudEventError(f"data_base64 is not base64: {exc}") from exc
    elif "data" in doc:
        raw = doc.pop("data")
        data = raw.encode("utf-8") if isinstance(raw, str) and not _is_json(doc.get("datacontenttype")) \
            else json.dumps(raw).encode("utf-8")
    attrs = {k: v if isinstance(v, str) else json.dumps(v) for k, v in doc.items()}
    return _build(attrs, data)


def _is_json(content_type: str | None) -> bool:
    ct = (content_type or "application/json").split(";")[0].strip().lower()
    return ct == "application/json" or ct.endswith("+json")


def _build(attrs: dict[str, str], data: bytes | None) -> CloudEvent:
    if not (attrs.get("id") and attrs.get("source") and attrs.get("specversion") and attrs.get("type")):
        missing = [a for a in REQUIRED if not attrs.get(a)]
        raise CloudEventError(f"CloudEvent lacks required attribute(s): {', '.join(missing)}")
    if attrs["specversion"] != SPEC_VERSION:
        raise CloudEventError(f"unsupported CloudEvents specversion {attrs['specversion']!r}")
    pop = attrs.pop
    return CloudEvent(pop("id"), pop("source"), pop("type"), pop("specversion"), pop("datacontenttype", None),
                      pop("dataschema", None), pop("subject", None), pop("time", None), attrs, data)


def to_kafka_headers(event: CloudEvent) -> list[tuple[str, bytes]]:
    """Binary-mode headers for ``event`` (its data goes in the record value, untouched)."""
    headers: list[tuple[str, bytes]] = []
    for name, header in _KNOWN_HEADERS:  # valid names by construction: only extensions need checking
        value = getattr(event, name)
        if value is not None:
            headers.append((header, value.encode("utf-8")))
    for name, value in event.extensions.items():
        if name not in _VALID_NAMES:
            if not _ATTRIBUTE_NAME.match(name):
                raise CloudEventError(f"invalid CloudEvents attribute name {name!r} (lowercase a-z, 0-9)")
            if len(_VALID_NAMES) < 1024:  # the same few extension names come back on every event
                _VALID_NAMES.add(name)
        headers.append((HEADER_PREFIX + name, value.encode("utf-8")))
    return headers
