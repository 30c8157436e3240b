"""Topic creation on any Kafka cluster (``python -m streaming create-topics``).

Topics are created with their final partition count up front: some Kafka-protocol brokers (tansu among
them) cannot add partitions later, and the bridge's ordering is per partition anyway.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streaming.settings import KafkaSettings


class TopicError(RuntimeError):
    """Topics that were asked for did not appear."""


def parse_topics(spec: str | Iterable[str]) -> dict[str, int]:
    """``"requests:3,results:3,dlq"`` -> ``{"requests": 3, "results": 3, "dlq": 1}``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: dict[str, int] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, _, count = item.partition(":")
        out[name.strip()] = int(count) if count else 1
        if out[name.strip()] < 1:
            raise ValueError(f"topic {name!r}: partition count must be at least 1")
    return out


def create_topics(bootstrap_servers: str, topics: dict[str, int], *, settings: KafkaSettings | None = None,
                  replication_factor: int = 1, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics with their partition counts; returns the names that were created."""
    settings = (settings or KafkaSettings()).model_copy(update={"bootstrap_servers": bootstrap_servers})
    admin = KafkaAdminClient(**settings.client_config())
    created = []
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(name, n, replication_factor) for name, n in topics.items() if name not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new, timeout_ms=int(timeout_s * 1000))
            created = [t.name for t in new]
        deadline = time.monotonic() + timeout_s
        while not set(topics) <= set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise TopicError(f"topics {sorted(set(topics) - set(admin.list_topics()))} did not appear")
            time.sleep(0.05)
    finally:
        admin.close()
    return created
