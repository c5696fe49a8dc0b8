"""The TLS reporting counters (RFC 8460) in every store: SQL, rows, and the three parts.

Design note
-----------
Outbound TLS results are kept in the queue store, not in process memory, so every
node of a cluster adds to the same daily counts and a restart loses nothing already
flushed (``tlsrpt.recorder`` flushes its in-memory batch every few seconds and at
stop). Two tables, added together as one schema step (SQLite version 5, PostgreSQL
migration 5; the DDL is here so a renumbering is one line in each schema file):

``tls_results``        one counter per (day, policy domain, ``TlsResultCount.key``);
                       a write adds to it (``INSERT ... ON CONFLICT DO UPDATE SET
                       count = count + excluded.count``), so two nodes flushing at
                       once both count.
``tls_report_claims``  one row per (day, policy domain) whose report a node took on:
                       the insert that wins decides who sends it, so a cluster (or a
                       restarted node) sends each daily report once (RFC 8460 §4.1).

Each store exposes these as ``store.tls_reports`` (``queue.store.TlsReportStore``):
``SqliteTlsReports``/``PostgresTlsReports`` run the SQL on the store's own reader and
writer; ``MemoryTlsReports`` keeps dicts. These are statistics: PostgreSQL writes them
without waiting for a durable commit (a crash loses at most the last flush).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from postillon.core.tlsrpt import TlsResultCount
from postillon.queue.report_claims import (
    postgres_claim,
    postgres_prune,
    sqlite_claim,
    sqlite_prune,
)

__all__ = [
    "POSTGRES_TABLES",
    "SQLITE_TABLES",
    "MemoryTlsReports",
    "PostgresTlsReports",
    "SqliteTlsReports",
]

# An asyncpg connection, typed loosely (as sts_cache.py does): the schema modules import
# this file, and no import knot for the reader.
Conn = Any

SQLITE_TABLES: Final = (
    """CREATE TABLE tls_results (
        day TEXT NOT NULL,  -- UTC, YYYY-MM-DD
        policy_domain TEXT NOT NULL,
        row_key TEXT NOT NULL,  -- TlsResultCount.key: a digest of the columns below
        policy_type TEXT NOT NULL,
        policy_strings TEXT NOT NULL,  -- JSON array
        result TEXT NOT NULL,
        mx_host TEXT NOT NULL,
        sending_ip TEXT NOT NULL,
        receiving_ip TEXT NOT NULL,
        reason_code TEXT NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (day, policy_domain, row_key)
    ) WITHOUT ROWID""",
    """CREATE TABLE tls_report_claims (
        day TEXT NOT NULL,
        policy_domain TEXT NOT NULL,
        owner TEXT NOT NULL,
        claimed_at REAL NOT NULL,
        PRIMARY KEY (day, policy_domain)
    ) WITHOUT ROWID""",
)

POSTGRES_TABLES: Final = (
    """CREATE TABLE tls_results (
        day text NOT NULL,
        policy_domain text NOT NULL,
        row_key text NOT NULL,
        policy_type text NOT NULL,
        policy_strings text NOT NULL,
        result text NOT NULL,
        mx_host text NOT NULL,
        sending_ip text NOT NULL,
        receiving_ip text NOT NULL,
        reason_code text NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (day, policy_domain, row_key)
    )""",
    """CREATE TABLE tls_report_claims (
        day text NOT NULL,
        policy_domain text NOT NULL,
        owner text NOT NULL,
        claimed_at double precision NOT NULL,
        PRIMARY KEY (day, policy_domain)
    )""",
)

_COLUMNS: Final = (
    "day, policy_domain, row_key, policy_type, policy_strings, result, mx_host,"
    " sending_ip, receiving_ip, reason_code, count"
)
_ADD: Final = (
    " ON CONFLICT (day, policy_domain, row_key) DO UPDATE"
    " SET count = tls_results.count + excluded.count"
)
_ORDER: Final = " ORDER BY policy_domain, policy_type, result, mx_host, receiving_ip, row_key"


def _values(row: TlsResultCount) -> tuple[Any, ...]:
    return (
        row.day,
        row.policy_domain.lower(),
        row.key,
        row.policy_type,
        json.dumps(list(row.policy_strings)),
        row.result,
        row.mx_host,
        row.sending_ip,
        row.receiving_ip,
        row.reason_code,
        row.count,
    )


def _row(r: Sequence[Any]) -> TlsResultCount:
    return TlsResultCount(
        r[0], r[1], r[3], tuple(json.loads(r[4])), r[5], r[6], r[7], r[8], r[9], int(r[10])
    )


def _merged(rows: Sequence[TlsResultCount]) -> list[TlsResultCount]:
    """One row per counter, counts added: a batch may name a counter twice, and one
    statement may not update the same row twice (PostgreSQL refuses it)."""
    merged: dict[tuple[str, str, str], TlsResultCount] = {}
    for row in rows:
        k = (row.day, row.policy_domain.lower(), row.key)
        old = merged.get(k)
        merged[k] = row if old is None else old.with_count(old.count + row.count)
    return list(merged.values())


def _order(r: TlsResultCount) -> tuple[str, ...]:
    """The SQL stores' ``_ORDER``, for the memory store."""
    return (r.policy_domain, r.policy_type, r.result, r.mx_host, r.receiving_ip, r.key)


class SqliteTlsReports:
    """The counters on a ``SqliteStore``'s reader pool and group-commit writer."""

    def __init__(
        self,
        read: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
        write: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def add(self, rows: Sequence[TlsResultCount]) -> None:
        values = [_values(r) for r in _merged(rows) if r.count > 0]
        if not values:
            return

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"INSERT INTO tls_results ({_COLUMNS}) VALUES ({', '.join('?' * 11)}){_ADD}",
                values,
            )

        await self._write(op)

    async def day(self, day: str, domain: str | None = None) -> list[TlsResultCount]:
        def fn(conn: sqlite3.Connection) -> list[TlsResultCount]:
            where, args = "day = ?", [day]
            if domain is not None:
                where, args = where + " AND policy_domain = ?", [day, domain.lower()]
            rows = conn.execute(f"SELECT {_COLUMNS} FROM tls_results WHERE {where}{_ORDER}", args)
            return [_row(r) for r in rows.fetchall()]

        result: list[TlsResultCount] = await self._read(fn)
        return result

    async def claim(self, day: str, domain: str, owner: str, now: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return sqlite_claim(conn, "tls_report_claims", day, domain, owner, now)

        claimed: bool = await self._write(op)
        return claimed

    async def prune(self, before_day: str) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return sqlite_prune(conn, "tls_results", "tls_report_claims", before_day)

        pruned: int = await self._write(op)
        return pruned


class PostgresTlsReports:
    """The counters on a ``PostgresStore``'s connections (``read(fn)``, ``write(fn)``)."""

    def __init__(
        self,
        read: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
        write: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def add(self, rows: Sequence[TlsResultCount]) -> None:
        values = [_values(r) for r in _merged(rows) if r.count > 0]
        if not values:
            return
        marks = ", ".join(f"${i}" for i in range(1, 12))

        async def op(conn: Conn) -> None:
            await conn.executemany(
                f"INSERT INTO tls_results ({_COLUMNS}) VALUES ({marks}){_ADD}", values
            )

        await self._write(op)

    async def day(self, day: str, domain: str | None = None) -> list[TlsResultCount]:
        async def fn(conn: Conn) -> list[TlsResultCount]:
            if domain is None:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM tls_results WHERE day = $1{_ORDER}", day
                )
            else:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM tls_results WHERE day = $1"
                    f" AND policy_domain = $2{_ORDER}",
                    day,
                    domain.lower(),
                )
            return [_row(r) for r in rows]

        result: list[TlsResultCount] = await self._read(fn)
        return result

    async def claim(self, day: str, domain: str, owner: str, now: float) -> bool:
        async def op(conn: Conn) -> bool:
            return await postgres_claim(conn, "tls_report_claims", day, domain, owner, now)

        claimed: bool = await self._write(op)
        return claimed

    async def prune(self, before_day: str) -> int:
        async def op(conn: Conn) -> int:
            return await postgres_prune(conn, "tls_results", "tls_report_claims", before_day)

        pruned: int = await self._write(op)
        return pruned


class MemoryTlsReports:
    """The counters of a ``MemoryStore``: the same rules, in dicts."""

    def __init__(self, check_open: Callable[[], None]) -> None:
        self._check_open = check_open
        self._rows: dict[tuple[str, str, str], TlsResultCount] = {}
        self._claims: dict[tuple[str, str], str] = {}

    async def add(self, rows: Sequence[TlsResultCount]) -> None:
        self._check_open()
        for row in _merged(rows):
            if row.count <= 0:
                continue
            domain = row.policy_domain.lower()
            k = (row.day, domain, row.key)
            old = self._rows.get(k)
            count = row.count + (old.count if old is not None else 0)
            self._rows[k] = _row((*_values(row)[:10], count))  # domain in lower case

    async def day(self, day: str, domain: str | None = None) -> list[TlsResultCount]:
        self._check_open()
        rows = [
            r
            for (d, dom, _), r in self._rows.items()
            if d == day and (domain is None or dom == domain.lower())
        ]
        return sorted(rows, key=_order)

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
