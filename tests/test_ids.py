"""Server-made ids: request ids are UUID version 7 (time first, so the prediction log's index is appended to)."""

from __future__ import annotations

import re
import time
import uuid

from predictors.protocol.ids import UniqueSuffixes, uuid7

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_uuid7_is_a_version_7_rfc_9562_uuid_carrying_the_time() -> None:
    before = time.time_ns() // 1_000_000
    made = uuid7()
    after = time.time_ns() // 1_000_000
    assert UUID7.match(made), made
    parsed = uuid.UUID(made)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert before <= parsed.int >> 80 <= after


def test_uuid7_sorts_by_time_and_does_not_repeat() -> None:
    first = [uuid7() for _ in range(5000)]
    time.sleep(0.002)
    later = [uuid7() for _ in range(5000)]
    assert len(set(first + later)) == 10_000
    assert max(first) < min(later)
    assert len({i[15:] for i in first}) == 5000  # the random part differs within one millisecond


def test_unique_suffixes_count_up_under_one_random_prefix() -> None:
    suffixes = UniqueSuffixes()
    a, b = suffixes.next(), suffixes.next()
    assert a[:12] == b[:12] and a != b
    suffixes.reset()
    assert suffixes.next()[:12] != a[:12]
