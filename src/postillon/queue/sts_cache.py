"""The MTA-STS policy cache's rows, for both SQL stores (RFC 8461 §3.3, §5.1).

Design note
-----------
A fetched policy is kept with its ``max_age`` in the queue store, not in process memory,
so a restart and every node of a cluster share it: a node that just started still applies
an ``enforce`` policy whose host is unreachable right now (RFC 8461 §5.1: a failed fetch
with an unexpired cached policy keeps the cached one), and a policy is fetched by one node,
not once per node and restart. It is a cache: a row lost in a crash is fetched again, so
PostgreSQL writes it without waiting for a durable commit.

One row per domain (``sts_policies``). A write never replaces a row fetched later than it
(``fetched_at``), so two nodes refreshing at once cannot roll a policy back. The functions
here hold the SQL and the row codec; ``SqliteStore``/``PostgresStore`` call them from their
reader and writer, ``MemoryStore`` keeps the values in a dict.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from postillon.core.sts import CachedPolicy, Mode, StsPolicy

# An asyncpg connection; typed loosely: the schema modules import this file, and
# postgres_connection imports the schema (no import knot for the reader).
Conn = Any

__all__ = [
    "COLUMNS",
    "POSTGRES_TABLE",
    "SQLITE_TABLE",
    "pg_all",
    "pg_get",
    "pg_put",
    "row_of",
    "sqlite_all",
    "sqlite_get",
    "sqlite_put",
    "values_of",
]

SQLITE_TABLE: Final = """CREATE TABLE sts_policies (
    domain TEXT PRIMARY KEY,  -- the recipient domain, lower case, A-labels
    policy_id TEXT NOT NULL,  -- the _mta-sts TXT id it was fetched under
    mode TEXT NOT NULL,
    max_age INTEGER NOT NULL,
    mx TEXT NOT NULL,  -- JSON array of the mx: patterns
    fetched_at REAL NOT NULL,
    checked_at REAL NOT NULL,
    last_error TEXT NOT NULL
) WITHOUT ROWID"""

POSTGRES_TABLE: Final = """CREATE TABLE sts_policies (
    domain text PRIMARY KEY,
    policy_id text NOT NULL,
    mode text NOT NULL,
    max_age bigint NOT NULL,
    mx text NOT NULL,  -- JSON array of the mx: patterns
    fetched_at double precision NOT NULL,
    checked_at double precision NOT NULL,
    last_error text NOT NULL
)"""

COLUMNS: Final = "domain, policy_id, mode, max_age, mx, fetched_at, checked_at, last_error"
_UPDATE: Final = (
    " ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id,"
    " mode = excluded.mode, max_age = excluded.max_age, mx = excluded.mx,"
    " fetched_at = excluded.fetched_at, checked_at = excluded.checked_at,"
    " last_error = excluded.last_error"
    # Never roll back to an older fetch (two nodes refreshing at once).
    " WHERE excluded.fetched_at >= sts_policies.fetched_at"
)


def values_of(entry: CachedPolicy) -> tuple[Any, ...]:
    p = entry.policy
    return (
        entry.domain.lower(),
        entry.policy_id,
        p.mode,
        p.max_age,
        json.dumps(list(p.mx)),
        entry.fetched_at,
        entry.checked_at,
        entry.last_error,
    )


def row_of(row: Sequence[Any]) -> CachedPolicy:
    mode: Mode = row[2]
    policy = StsPolicy(mode, int(row[3]), tuple(json.loads(row[4])))
    return CachedPolicy(row[0], row[1], policy, row[5], row[6], row[7])


# -- SQLite (called on the store's reader and writer threads) ----------------


def sqlite_get(conn: sqlite3.Connection, domain: str) -> CachedPolicy | None:
    row = conn.execute(
        f"SELECT {COLUMNS} FROM sts_policies WHERE domain = ?", (domain.lower(),)
    ).fetchone()
    return row_of(row) if row is not None else None


def sqlite_all(conn: sqlite3.Connection) -> list[CachedPolicy]:
    rows = conn.execute(f"SELECT {COLUMNS} FROM sts_policies ORDER BY domain").fetchall()
    return [row_of(r) for r in rows]


def sqlite_put(conn: sqlite3.Connection, entry: CachedPolicy) -> None:
    conn.execute(
        f"INSERT INTO sts_policies ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?){_UPDATE}",
        values_of(entry),
    )


# -- PostgreSQL (on the store's connections) ---------------------------------


async def pg_get(conn: Conn, domain: str) -> CachedPolicy | None:
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM sts_policies WHERE domain = $1", domain.lower()
    )
    return row_of(row) if row is not None else None


async def pg_all(conn: Conn) -> list[CachedPolicy]:
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM sts_policies ORDER BY domain")
    return [row_of(r) for r in rows]


async def pg_put(conn: Conn, entry: CachedPolicy) -> None:
    await conn.execute(
        f"INSERT INTO sts_policies ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8){_UPDATE}",
        *values_of(entry),
    )
