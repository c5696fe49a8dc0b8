"""Postponing the due records of a suspended destination in bulk (store.py step 14).

Design note
-----------
When 100,000 records deferred for one unreachable destination come due together
(their retry wave), trying them one by one means 100,000 claims, routes, refusals
and outcome writes, ahead of fresh mail (retries have the higher priority). Postfix
tries a few, marks the destination dead and defers the rest ("delivery temporarily
suspended"). Here a failed connection suspends the destination (outbound/shaping.py)
and the runner, told by the first record that came back "suspended", moves every
other record of that recipient domain due before the suspension ends (due now, or
coming due meanwhile: a wave spread over minutes) past it with this statement,
``limit`` records at a time so that commits of fresh mail interleave.

A postponed record becomes DEFERRED, as a record that came back "not attempted" does
(so ``queue flush`` and ``queue resume`` make it due again); it keeps its attempts
(it was not attempted) and its last reply, or gets the suspension's reply when it has
none; its ``next_try`` becomes ``until`` plus up to ``spread`` seconds (so the next
wave is spread). Records of a message whose lifetime has run out (received before
``expire_before``) are left due: the runner bounces them (delivery/outcomes.py).

The domain is matched as ``'%@' || domain`` (the part after the last "@", ASCII case
folded by SQLite's LIKE and PostgreSQL's ILIKE; the few records a non-ASCII case
difference misses are simply claimed and deferred one by one, as before).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

__all__ = ["postgres_postpone", "sqlite_postpone"]

_DUE: Final = "state IN ('pending', 'deferred')"


def like_domain(domain: str) -> str:
    """The LIKE pattern of the recipients of ``domain`` (escape character "\\")."""
    escaped = domain.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "%@" + escaped


def sqlite_postpone(
    conn: sqlite3.Connection,
    domain: str,
    now: float,
    until: float,
    spread: float,
    expire_before: float,
    reply: str,
    limit: int,
) -> int:
    """Postpone up to ``limit`` due records of ``domain``; how many."""
    return int(
        conn.execute(
            "UPDATE records SET state = 'deferred',"
            " next_try = :until + :spread * ((random() & 1048575) / 1048576.0),"
            " last_reply = COALESCE(last_reply, :reply), updated_at = :now"
            " WHERE record_id IN (SELECT record_id FROM records INDEXED BY records_due"
            f" WHERE {_DUE} AND next_try <= :until AND recipient LIKE :pattern ESCAPE '\\'"
            " AND (SELECT received_at FROM messages m WHERE m.queue_id = records.queue_id)"
            " > :expire_before LIMIT :limit)",
            {
                "until": until,
                "spread": spread,
                "reply": reply,
                "now": now,
                "pattern": like_domain(domain),
                "expire_before": expire_before,
                "limit": limit,
            },
        ).rowcount
    )


async def postgres_postpone(
    conn: Any,
    domain: str,
    now: float,
    until: float,
    spread: float,
    expire_before: float,
    reply: str,
    limit: int,
) -> int:
    """The same on PostgreSQL; records locked by a claim in flight are skipped."""
    status: str = await conn.execute(
        "UPDATE records SET state = 'deferred', next_try = $1 + $2 * random(),"
        " last_reply = COALESCE(last_reply, $3), updated_at = $4"
        " WHERE record_id IN (SELECT r.record_id FROM records r"
        f" JOIN messages m ON m.queue_id = r.queue_id WHERE r.{_DUE} AND r.next_try <= $1"
        " AND r.recipient ILIKE $5 AND m.received_at > $6"
        " LIMIT $7 FOR UPDATE OF r SKIP LOCKED)",
        until,
        spread,
        reply,
        now,
        like_domain(domain),
        expire_before,
        limit,
    )
    return int(status.rsplit(" ", 1)[-1])
