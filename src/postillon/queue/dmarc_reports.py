"""The DMARC aggregate reporting counters (RFC 7489 §7.2) in every store.

Design note
-----------
The same shape as ``tls_reports.py``, for inbound DMARC evaluations: counts kept in the
queue store so every node of a cluster adds to the same daily report and a restart loses
nothing already flushed (``dmarcrpt.recorder`` flushes its in-memory batch every few
seconds and at stop). Two tables, part of the policy-state schema step (see
``policy_state.py``):

``dmarc_results``        one counter per (day, policy domain, ``DmarcResultCount.key``);
                         a write adds to it (``ON CONFLICT DO UPDATE SET count = count +
                         excluded.count``), so two nodes flushing at once both count.
``dmarc_report_claims``  one row per (day, policy domain) a node took on: the insert
                         that wins sends the report, once per cluster and restart.

Statistics: PostgreSQL writes them without waiting for a durable commit.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from postillon.core.dmarc import DmarcResultCount
from postillon.queue.report_claims import (
    postgres_claim,
    postgres_prune,
    sqlite_claim,
    sqlite_prune,
)

__all__ = [
    "POSTGRES_TABLES",
    "SQLITE_TABLES",
    "MemoryDmarcReports",
    "PostgresDmarcReports",
    "SqliteDmarcReports",
]

Conn = Any  # an asyncpg connection (typed loosely, as in tls_reports.py)

SQLITE_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS dmarc_results (
        day TEXT NOT NULL,  -- UTC, YYYY-MM-DD
        policy_domain TEXT NOT NULL,
        row_key TEXT NOT NULL,  -- DmarcResultCount.key
        source_ip TEXT NOT NULL,
        detail TEXT NOT NULL,  -- JSON: DmarcResultCount.detail_json()
        count INTEGER NOT NULL,
        PRIMARY KEY (day, policy_domain, row_key)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS dmarc_report_claims (
        day TEXT NOT NULL,
        policy_domain TEXT NOT NULL,
        owner TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        PRIMARY KEY (day, policy_domain)
    ) WITHOUT ROWID""",
)

POSTGRES_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS dmarc_results (
        day text NOT NULL,
        policy_domain text NOT NULL,
        row_key text NOT NULL,
        source_ip text NOT NULL,
        detail text NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (day, policy_domain, row_key)
    )""",
    """CREATE TABLE IF NOT EXISTS dmarc_report_claims (
        day text NOT NULL,
        policy_domain text NOT NULL,
        owner text NOT NULL,
        claimed_at double precision NOT NULL,
        PRIMARY KEY (day, policy_domain)
    )""",
)

_COLUMNS: Final = "day, policy_domain, row_key, source_ip, detail, count"
_ADD: Final = (
    " ON CONFLICT (day, policy_domain, row_key) DO UPDATE"
    " SET count = dmarc_results.count + excluded.count"
)
_ORDER: Final = " ORDER BY policy_domain, source_ip, row_key"


def _merged(rows: Sequence[DmarcResultCount]) -> list[DmarcResultCount]:
    """One row per counter, counts added (one statement may not update a row twice)."""
    merged: dict[tuple[str, str, str], DmarcResultCount] = {}
    for row in rows:
        if row.count <= 0:
            continue
        row = DmarcResultCount.from_stored(
            row.day, row.policy_domain.lower(), row.source_ip, row.detail_json(), row.count
        )
        k = (row.day, row.policy_domain, row.key)
        old = merged.get(k)
        merged[k] = row if old is None else old.with_count(old.count + row.count)
    return list(merged.values())


def _values(row: DmarcResultCount) -> tuple[Any, ...]:
    return (row.day, row.policy_domain, row.key, row.source_ip, row.detail_json(), row.count)


def _row(r: Sequence[Any]) -> DmarcResultCount:
    return DmarcResultCount.from_stored(r[0], r[1], r[3], r[4], int(r[5]))


class SqliteDmarcReports:
    """The counters on a ``SqliteStore``'s reader pool and group-commit writer."""

    def __init__(
        self,
        read: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
        write: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def add(self, rows: Sequence[DmarcResultCount]) -> None:
        values = [_values(r) for r in _merged(rows)]
        if values:
            sql = f"INSERT INTO dmarc_results ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?){_ADD}"
            await self._write(lambda conn: conn.executemany(sql, values) and None)

    async def day(self, day: str, domain: str | None = None) -> list[DmarcResultCount]:
        def fn(conn: sqlite3.Connection) -> list[DmarcResultCount]:
            where, args = "day = ?", [day]
            if domain is not None:
                where, args = where + " AND policy_domain = ?", [day, domain.lower()]
            rows = conn.execute(f"SELECT {_COLUMNS} FROM dmarc_results WHERE {where}{_ORDER}", args)
            return [_row(r) for r in rows.fetchall()]

        result: list[DmarcResultCount] = await self._read(fn)
        return result

    async def claim(self, day: str, domain: str, owner: str, now: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return sqlite_claim(conn, "dmarc_report_claims", day, domain, owner, now)

        claimed: bool = await self._write(op)
        return claimed

    async def prune(self, before_day: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return sqlite_prune(conn, "dmarc_results", "dmarc_report_claims", before_day)

        pruned: int = await self._write(op)
        return pruned


class PostgresDmarcReports:
    """The counters on a ``PostgresStore``'s connections."""

    def __init__(
        self,
        read: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
        write: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def add(self, rows: Sequence[DmarcResultCount]) -> None:
        values = [_values(r) for r in _merged(rows)]
        if not values:
            return

        async def op(conn: Conn) -> None:
            await conn.executemany(
                f"INSERT INTO dmarc_results ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6){_ADD}",
                values,
            )

        await self._write(op)

    async def day(self, day: str, domain: str | None = None) -> list[DmarcResultCount]:
        async def fn(conn: Conn) -> list[DmarcResultCount]:
            sql = f"SELECT {_COLUMNS} FROM dmarc_results WHERE day = $1"
            if domain is None:
                rows = await conn.fetch(sql + _ORDER, day)
            else:
                rows = await conn.fetch(
                    sql + " AND policy_domain = $2" + _ORDER, day, domain.lower()
                )
            return [_row(r) for r in rows]

        result: list[DmarcResultCount] = await self._read(fn)
        return result

    async def claim(self, day: str, domain: str, owner: str, now: float) -> bool:
        async def op(conn: Conn) -> bool:
            return await postgres_claim(conn, "dmarc_report_claims", day, domain, owner, now)

        claimed: bool = await self._write(op)
        return claimed

    async def prune(self, before_day: str) -> int:
        async def op(conn: Conn) -> int:
            return await postgres_prune(conn, "dmarc_results", "dmarc_report_claims", before_day)

        pruned: int = await self._write(op)
        return pruned


class MemoryDmarcReports:
    """The counters of a ``MemoryStore``: the same rules, in dicts."""

    def __init__(self, check_open: Callable[[], None]) -> None:
        self._check_open = check_open
        self._rows: dict[tuple[str, str, str], DmarcResultCount] = {}
        self._claims: dict[tuple[str, str], str] = {}

    async def add(self, rows: Sequence[DmarcResultCount]) -> None:
        self._check_open()
        for row in _merged(rows):
            k = (row.day, row.policy_domain, row.key)
            old = self._rows.get(k)
            self._rows[k] = row if old is None else row.with_count(old.count + row.count)

    async def day(self, day: str, domain: str | None = None) -> list[DmarcResultCount]:
        self._check_open()
        rows = [
            r
            for (d, dom, _), r in self._rows.items()
            if d == day and (domain is None or dom == domain.lower())
        ]
        return sorted(rows, key=lambda r: (r.policy_domain, r.source_ip, r.key))

    async def claim(self, day: str, domain: str, owner: str, now: float) -> bool:
        self._check_open()
        k = (day, domain.lower())
        if k in self._claims:
            return False
        self._claims[k] = owner
        return True

    async def prune(self, before_day: str) -> int:
        self._check_open()
        old = [k for k in self._rows if k[0] < before_day]
        for k in old:
            del self._rows[k]
        for c in [c for c in self._claims if c[0] < before_day]:
            del self._claims[c]
        return len(old)
