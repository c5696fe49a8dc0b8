"""The claim and prune statements both daily reports share (RFC 8460 TLS reports in
``tls_reports.py``, RFC 7489 DMARC aggregate reports in ``dmarc_reports.py``): one
claim row per (day, policy domain) lets one node of a cluster send each report, and
counters and claims older than the first day to keep are dropped together."""

from __future__ import annotations

import sqlite3
from typing import Any

__all__ = ["postgres_claim", "postgres_prune", "sqlite_claim", "sqlite_prune"]


def sqlite_claim(
    conn: sqlite3.Connection, claims: str, day: str, domain: str, owner: str, now: float
) -> bool:
    cur = conn.execute(
        f"INSERT INTO {claims} (day, policy_domain, owner, claimed_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (day, domain.lower(), owner, now),
    )
    return cur.rowcount == 1


def sqlite_prune(conn: sqlite3.Connection, results: str, claims: str, before_day: str) -> int:
    n = conn.execute(f"DELETE FROM {results} WHERE day < ?", (before_day,)).rowcount
    conn.execute(f"DELETE FROM {claims} WHERE day < ?", (before_day,))
    return int(n)


async def postgres_claim(
    conn: Any, claims: str, day: str, domain: str, owner: str, now: float
) -> bool:
    won = await conn.fetchval(
        f"INSERT INTO {claims} (day, policy_domain, owner, claimed_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING day",
        day,
        domain.lower(),
        owner,
        now,
    )
    return won is not None


async def postgres_prune(conn: Any, results: str, claims: str, before_day: str) -> int:
    status = await conn.execute(f"DELETE FROM {results} WHERE day < $1", before_day)
    await conn.execute(f"DELETE FROM {claims} WHERE day < $1", before_day)
    return int(status.rsplit(" ", 1)[-1])
