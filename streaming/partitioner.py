"""Kafka's default key -> partition mapping, at a fraction of kafka-python's cost per record.

kafka-python's :class:`~kafka.partitioner.DefaultPartitioner` hashes a record's key with a
pure-Python murmur2 that masks every intermediate step and indexes the key byte by byte, a
visible share of the bridge's CPU per result. :func:`murmur2` here computes
the same 32-bit hash (the Java client's ``Utils.murmur2``) from 4-byte words unpacked in one call,
and :class:`Murmur2Partitioner` maps it exactly as the Java and kafka-python default partitioners
do (``toPositive(murmur2(key)) % numPartitions`` over the topic's sorted partitions), so a key
lands on the same partition whichever client produced it: per-key ordering and co-partitioning
with Java producers are unchanged. Records without a key keep kafka-python's own choice.
"""

from __future__ import annotations

import struct
from typing import Any

from kafka.partitioner import DefaultPartitioner

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS: dict[int, struct.Struct] = {}  # little-endian uint32 unpackers by word count (keys have few lengths)


def murmur2(data: bytes) -> int:
    """MurmurHash2 of ``data`` as the Java Kafka client computes it (unsigned 32-bit result)."""
    length = len(data)
    n = length >> 2
    unpack = _WORDS.get(n)
    if unpack is None:
        unpack = struct.Struct(f"<{n}I")
        if len(_WORDS) < 512:
            _WORDS[n] = unpack
    h = _SEED ^ length
    for k in unpack.unpack_from(data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length & 3
    if tail:
        i = length & ~3
        if tail == 3:
            h ^= data[i + 2] << 16
        if tail >= 2:
            h ^= data[i + 1] << 8
        h = ((h ^ data[i]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


class Murmur2Partitioner(DefaultPartitioner):  # type: ignore[misc]
    """kafka-python's default partitioner with the faster :func:`murmur2` (same partition for every key)."""

    def partition(self, topic: str, key: Any, serialized_key: bytes | None, value: Any, serialized_value: Any,
                  cluster: Any) -> int:
        if serialized_key is None:
            return super().partition(topic, key, serialized_key, value, serialized_value, cluster)  # type: ignore[no-any-return]
        partitions = cluster.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(f"Topic {topic} not found in ClusterMetadata")
        ordered = sorted(partitions)
        return ordered[(murmur2(bytes(serialized_key)) & 0x7FFFFFFF) % len(ordered)]  # type: ignore[no-any-return]
