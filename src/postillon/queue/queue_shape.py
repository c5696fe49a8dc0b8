"""The queue's shape (Postfix's qshape), aggregated by the store (store.py step 13).

Design note
-----------
``postillon queue summary`` and the admin page's summary count the queued recipients
(pending, leased, deferred, held) by destination domain, state and age bucket. Reading
every message into Python to count them took 4 s over 100,000 queued messages and
built 100,000 objects; the database groups them in one statement instead and returns
a row per (domain, state, age bucket): a few dozen rows, whatever the queue holds.

The domain is grouped as stored (the part after the last ``@``, "" without one): the
caller folds its case in Python, where ``str.lower`` treats every letter alike (SQL's
``lower`` knows ASCII only), merging the few rows that differ by case.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Final

from postillon.queue.store import DeliveryRecord, DeliveryState, QueueShape, ShapeRow

__all__ = [
    "QUEUED_STATES",
    "QueueShape",
    "ShapeRow",
    "age_bucket",
    "postgres_shape",
    "shape_of",
    "sqlite_shape",
]

QUEUED_STATES: Final = (
    DeliveryState.PENDING,
    DeliveryState.LEASED,
    DeliveryState.DEFERRED,
    DeliveryState.HELD,
)
_IN_QUEUE: Final = "('pending', 'leased', 'deferred', 'held')"


def age_bucket(age_seconds: float, buckets_minutes: Sequence[float]) -> int:
    """The index of the last bucket whose lower bound (minutes) ``age_seconds`` reaches."""
    minutes = age_seconds / 60
    index = 0
    for i, lower in enumerate(buckets_minutes):
        if minutes >= lower:
            index = i
    return index


def _bucket_sql(age: str, buckets_minutes: Sequence[float]) -> str:
    """``age_bucket`` as a CASE over ``age`` (seconds), the same float arithmetic."""
    whens = " ".join(
        f"WHEN ({age}) / 60.0 >= {float(lower)!r} THEN {i}"
        for i, lower in reversed(list(enumerate(buckets_minutes)))
    )
    return f"CASE {whens} ELSE 0 END"


# The oldest message with a queued recipient (the first by queue id among equals).
_OLDEST: Final = (
    "SELECT m.queue_id, m.received_at FROM messages m WHERE EXISTS (SELECT 1 FROM records r"
    f" WHERE r.queue_id = m.queue_id AND r.state IN {_IN_QUEUE})"
    " ORDER BY m.received_at, m.queue_id LIMIT 1"
)


# The part after the last "@" (SQLite has no reverse search: rtrim drops every
# character but "@" from the end, leaving the address up to its last "@").
_SQLITE_DOMAIN: Final = (
    "CASE WHEN instr(r.recipient, '@') > 0 THEN substr(r.recipient,"
    " length(rtrim(r.recipient, replace(r.recipient, '@', ''))) + 1) ELSE '' END"
)
_POSTGRES_DOMAIN: Final = (
    "CASE WHEN strpos(r.recipient, '@') > 0 THEN substring(r.recipient from '[^@]*$') ELSE '' END"
)


def _grouped_sql(domain: str, now: str, buckets_minutes: Sequence[float]) -> str:
    bucket = _bucket_sql(f"{now} - m.received_at", buckets_minutes)
    return (
        f"SELECT {domain} AS d, r.state, {bucket} AS b, COUNT(*), MIN(m.received_at)"
        " FROM records r JOIN messages m ON m.queue_id = r.queue_id"
        f" WHERE r.state IN {_IN_QUEUE} GROUP BY d, r.state, b"
    )


def sqlite_shape(
    conn: sqlite3.Connection, now: float, buckets_minutes: Sequence[float]
) -> QueueShape:
    (messages,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
    grouped = conn.execute(_grouped_sql(_SQLITE_DOMAIN, ":now", buckets_minutes), {"now": now})
    rows = tuple(ShapeRow(d, s, int(b), int(n), float(t)) for d, s, b, n, t in grouped)
    oldest = conn.execute(_OLDEST).fetchone()
    return QueueShape(int(messages), rows, *(oldest if oldest else (None, None)))


async def postgres_shape(conn: Any, now: float, buckets_minutes: Sequence[float]) -> QueueShape:
    messages = await conn.fetchval("SELECT COUNT(*) FROM messages")
    grouped = await conn.fetch(
        _grouped_sql(_POSTGRES_DOMAIN, "$1::double precision", buckets_minutes), now
    )
    rows = tuple(ShapeRow(d, s, int(b), int(n), float(t)) for d, s, b, n, t in grouped)
    oldest = await conn.fetchrow(_OLDEST)
    return QueueShape(
        int(messages),
        rows,
        oldest[0] if oldest else None,
        float(oldest[1]) if oldest else None,
    )


def shape_of(
    messages: Iterable[tuple[str, float, Sequence[DeliveryRecord]]],
    now: float,
    buckets_minutes: Sequence[float],
) -> QueueShape:
    """The same from (queue id, received at, records) in queue id order: the
    in-memory store's."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    count = 0
    oldest: tuple[str, float] | None = None
    for queue_id, received_at, records in messages:
        count += 1
        queued = [r for r in records if r.state in QUEUED_STATES]
        if not queued:
            continue
        if oldest is None or received_at < oldest[1]:
            oldest = (queue_id, received_at)
        bucket = age_bucket(now - received_at, buckets_minutes)
        for r in queued:
            domain = r.recipient.rpartition("@")[2] if "@" in r.recipient else ""
            group = groups.setdefault((domain, r.state.value, bucket), [0, received_at])
            group[0] += 1
            group[1] = min(group[1], received_at)
    rows = tuple(ShapeRow(d, s, b, int(n), t) for (d, s, b), (n, t) in groups.items())
    return QueueShape(count, rows, *(oldest if oldest else (None, None)))
