"""Claiming due work (store.py steps 2 and 12) on SQLite and PostgreSQL, without
reading the backlog.

Design note
-----------
Due records are claimed highest ``priority`` first, then by ``next_try``. One
``ORDER BY priority DESC, next_try`` walk of the ``records_due_priority`` index
(``(priority DESC, next_try) WHERE state IN ('pending', 'deferred')``) cannot stop at
``next_try <= now`` inside a priority: it reads every *not yet due* record of a higher
priority before it reaches the due ones of a lower one. A queue holding 100,000
deferred retries (priority 1, due in an hour) made every claim of fresh mail
(priority 0) read 100,000 index entries.

So the claim seeks instead of walking: first the few distinct priorities that have
claimable records, found by a skip scan of the same index (one ``MAX(priority)`` seek
per distinct value, a recursive query), then for each, highest first, the range
``priority = p AND next_try <= now`` of the index, until ``limit`` records are found.
The work is O((distinct priorities + claimed) x log n): the same with an empty queue
as with a million records waiting (tests/unit/test_claim_cost.py counts it).
Priorities are few by construction (core/priority.py: -9 .. 29).
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from postillon.queue.codec import record_from_row
from postillon.queue.sqlite_schema import RECORD_COLUMNS
from postillon.queue.store import DeliveryRecord

__all__ = ["postgres_claim_due", "sqlite_claim_due"]

_CLAIMABLE: Final = "state IN ('pending', 'deferred')"  # as the partial indexes say it

# The distinct priorities of claimable records, highest first: one index seek each.
_PRIORITIES: Final = (
    "WITH RECURSIVE p(v) AS ("
    f" SELECT MAX(priority) FROM records WHERE {_CLAIMABLE}"
    " UNION ALL"
    f" SELECT (SELECT MAX(priority) FROM records WHERE {_CLAIMABLE} AND priority < p.v)"
    " FROM p WHERE p.v IS NOT NULL"
    ") SELECT v FROM p WHERE v IS NOT NULL"
)


def sqlite_claim_due(
    conn: sqlite3.Connection, now: float, limit: int, expires: float, owner: str
) -> list[DeliveryRecord]:
    """Lease up to ``limit`` records: expired leases first, then due records by
    priority and ``next_try`` (runs in the writer thread, inside its transaction)."""
    ids = [
        row[0]
        for row in conn.execute(
            "SELECT record_id FROM records WHERE state = 'leased' AND lease_expires <= ?"
            " ORDER BY lease_expires LIMIT ?",
            (now, limit),
        )
    ]
    if len(ids) < limit:
        for (priority,) in conn.execute(_PRIORITIES).fetchall():
            ids += [
                row[0]
                for row in conn.execute(
                    "SELECT record_id FROM records INDEXED BY records_due_priority"
                    f" WHERE {_CLAIMABLE} AND priority = ? AND next_try <= ?"
                    " ORDER BY priority DESC, next_try LIMIT ?",
                    (priority, now, limit - len(ids)),
                )
            ]
            if len(ids) >= limit:
                break
    if not ids:
        return []
    conn.executemany(
        "UPDATE records SET state = 'leased', lease_token = ?, lease_owner = ?,"
        " lease_expires = ?, updated_at = ? WHERE record_id = ?",
        [(secrets.token_hex(8), owner, expires, now, rid) for rid in ids],
    )
    return records_by_id(conn, ids)


def records_by_id(conn: sqlite3.Connection, ids: Sequence[int]) -> list[DeliveryRecord]:
    """The records ``ids`` in that order."""
    by_id: dict[int, DeliveryRecord] = {}
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ", ".join("?" * len(part))
        for row in conn.execute(
            f"SELECT {RECORD_COLUMNS} FROM records WHERE record_id IN ({marks})", part
        ):
            by_id[row[0]] = record_from_row(row)
    return [by_id[i] for i in ids]


async def postgres_claim_due(
    conn: Any, now: float, limit: int, expires: float, owner: str
) -> list[DeliveryRecord]:
    """The same on PostgreSQL (``conn``: an asyncpg connection in a transaction), with
    ``FOR UPDATE SKIP LOCKED`` so that nodes claiming at once never wait for each
    other nor get the same record."""
    ids: list[int] = [
        row[0]
        for row in await conn.fetch(
            "SELECT record_id FROM records WHERE state = 'leased' AND lease_expires <= $1"
            " ORDER BY lease_expires, record_id LIMIT $2 FOR UPDATE SKIP LOCKED",
            now,
            limit,
        )
    ]
    if len(ids) < limit:
        for (priority,) in await conn.fetch(_PRIORITIES):
            ids += [
                row[0]
                for row in await conn.fetch(
                    "SELECT record_id FROM records"
                    f" WHERE {_CLAIMABLE} AND priority = $2 AND next_try <= $1"
                    " ORDER BY priority DESC, next_try, record_id"
                    " LIMIT $3 FOR UPDATE SKIP LOCKED",
                    now,
                    priority,
                    limit - len(ids),
                )
            ]
            if len(ids) >= limit:
                break
    if not ids:
        return []
    tokens = [secrets.token_hex(8) for _ in ids]
    rows = await conn.fetch(
        "UPDATE records r SET state = 'leased', lease_token = t.token,"
        " lease_owner = $3, lease_expires = $4, updated_at = $5"
        " FROM unnest($1::bigint[], $2::text[]) AS t(id, token)"
        " WHERE r.record_id = t.id"
        f" RETURNING {', '.join('r.' + c for c in RECORD_COLUMNS.split(', '))}",
        ids,
        tokens,
        owner,
        expires,
        now,
    )
    by_id = {row[0]: record_from_row(row) for row in rows}
    return [by_id[i] for i in ids]
