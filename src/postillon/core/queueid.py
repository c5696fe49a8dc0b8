"""Queue ids: short, unique across nodes, and sortable by creation time.

Twelve Crockford-base32 characters of milliseconds since the epoch followed by
eight random ones. Sorting ids sorts messages by arrival, which makes
``postillon queue list`` and log greps read naturally; the random tail keeps
ids unique between processes and nodes without coordination.
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def _b32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_queue_id(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000)
    return _b32(millis, 9) + _b32(secrets.randbits(40), 8)


def is_queue_id(text: str) -> bool:
    return len(text) == 17 and all(c in _ALPHABET for c in text)
