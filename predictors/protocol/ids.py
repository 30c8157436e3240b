"""Ids the server makes: request ids for requests without one, and the unique part of prediction ids.

Every prediction id is logged under a unique index (``model, prediction_id``) so feedback can name
it. Random ids (UUID version 4) land anywhere in that index, so each flush of the prediction log
dirties pages all over it, and once the log outgrows the page cache every logged row costs several
times the CPU of an id that starts with the time (appended at the index's end). Server-made
request ids are therefore UUID version 7 (RFC 9562): a millisecond timestamp, then 74 random bits,
so new ids sort after old ones and keep the same unguessability within a millisecond.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time

_RAND_B_BITS = 62
_VARIANT = 0b10 << _RAND_B_BITS


def uuid7() -> str:
    """A UUID version 7 in its canonical text form (``xxxxxxxx-xxxx-7xxx-[89ab]xxx-xxxxxxxxxxxx``)."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10))
    rand_a = (rand >> _RAND_B_BITS) & 0xFFF
    rand_b = rand & ((1 << _RAND_B_BITS) - 1)
    h = f"{millis & 0xFFFF_FFFF_FFFF:012x}7{rand_a:03x}{_VARIANT | rand_b:016x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class UniqueSuffixes:
    """Server-made id parts no other prediction shares and no client can guess: a random per-process
    prefix, a counter, and 64 random bits.

    Clients reuse request ids (retries, fixed ids, two clients picking the same one), so the
    request id alone cannot name a prediction. 48 random bits per process keep replicas and
    workers apart; the counter keeps one process's predictions apart. A forked worker draws a
    new prefix. The random tail is what makes the id a secret of the client that got it: with
    prefix and counter alone, one's own prediction id tells the next ones, and feedback filed
    first under a guessed id would lock out the true label.
    """

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}{secrets.token_hex(8)}"
