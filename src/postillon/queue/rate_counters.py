"""Shared rate-limit counters (port-25 rate limits, ``checks/smtp_rate_limit.py``) in every store.

Design note
-----------
A counter is (name, window start): how many messages or recipients one key (a client
network, a sender domain) used in one fixed window of ``window`` seconds aligned to the
epoch. The counters live in the queue store so every node of a cluster counts against
the same limit, and a restart does not hand a sender a fresh allowance. (A fixed window
lets a sender use up to twice its limit across one window boundary; a sliding window
would cost a row per event. The per-window count is what operators read in their logs.)

``take(requests, now)`` is all or nothing, in one write transaction: every counter of
the request is read (on PostgreSQL, created if missing and locked ``FOR UPDATE``, in name
order so two nodes never deadlock); if one would pass its limit, nothing is counted and
its index is returned; otherwise all are incremented. One table, part of the
policy-state schema step (``policy_state.py``); ``prune(now)`` drops ended windows.
PostgreSQL writes it without waiting for a durable commit (a crash forgets at most the
last moments' counts).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "POSTGRES_TABLES",
    "SQLITE_TABLES",
    "MemoryRateCounters",
    "PostgresRateCounters",
    "RateRequest",
    "SqliteRateCounters",
]

Conn = Any  # an asyncpg connection (typed loosely, as in tls_reports.py)

SQLITE_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS rate_counters (
        counter TEXT NOT NULL,  -- e.g. "ip-messages/192.0.2.0/24"
        window_start INTEGER NOT NULL,  -- epoch seconds
        window_end INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (counter, window_start)
    ) WITHOUT ROWID""",
)

POSTGRES_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS rate_counters (
        counter text NOT NULL,
        window_start bigint NOT NULL,
        window_end bigint NOT NULL,
        count bigint NOT NULL,
        PRIMARY KEY (counter, window_start)
    )""",
)


@dataclass(frozen=True, slots=True)
class RateRequest:
    """Count ``amount`` against ``counter`` in its current ``window`` if that stays within
    ``limit``."""

    counter: str
    window: int  # seconds
    amount: int
    limit: int

    def start(self, now: float) -> int:
        return int(now) // self.window * self.window


def _order(requests: Sequence[RateRequest], now: float) -> list[tuple[int, RateRequest, int]]:
    return sorted(
        ((i, r, r.start(now)) for i, r in enumerate(requests)), key=lambda t: t[1].counter
    )


class SqliteRateCounters:
    """The counters on a ``SqliteStore``'s writer (one transaction per ``take``)."""

    def __init__(
        self,
        read: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
        write: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def take(self, requests: Sequence[RateRequest], now: float) -> int | None:
        def op(conn: sqlite3.Connection) -> int | None:
            for i, r, start in _order(requests, now):
                row = conn.execute(
                    "SELECT count FROM rate_counters WHERE counter = ? AND window_start = ?",
                    (r.counter, start),
                ).fetchone()
                if (row[0] if row else 0) + r.amount > r.limit:
                    return i
            for _, r, start in _order(requests, now):
                conn.execute(
                    "INSERT INTO rate_counters VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE"
                    " SET count = rate_counters.count + excluded.count",
                    (r.counter, start, start + r.window, r.amount),
                )
            return None

        refused: int | None = await self._write(op)
        return refused

    async def used(self, counter: str, window: int, now: float) -> int:
        start = int(now) // window * window

        def fn(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT count FROM rate_counters WHERE counter = ? AND window_start = ?",
                (counter, start),
            ).fetchone()
            return int(row[0]) if row else 0

        n: int = await self._read(fn)
        return n

    async def prune(self, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute("DELETE FROM rate_counters WHERE window_end <= ?", (now,)).rowcount
            )

        pruned: int = await self._write(op)
        return pruned


class PostgresRateCounters:
    """The counters on a ``PostgresStore``'s connections (rows locked, see the note)."""

    def __init__(
        self,
        read: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
        write: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def take(self, requests: Sequence[RateRequest], now: float) -> int | None:
        async def op(conn: Conn) -> int | None:
            counts: list[tuple[RateRequest, int, int]] = []
            for i, r, start in _order(requests, now):
                await conn.execute(
                    "INSERT INTO rate_counters VALUES ($1, $2, $3, 0) ON CONFLICT DO NOTHING",
                    r.counter,
                    start,
                    start + r.window,
                )
                count = await conn.fetchval(
                    "SELECT count FROM rate_counters WHERE counter = $1 AND window_start = $2"
                    " FOR UPDATE",
                    r.counter,
                    start,
                )
                if int(count) + r.amount > r.limit:
                    return i
                counts.append((r, start, r.amount))
            for r, start, amount in counts:
                await conn.execute(
                    "UPDATE rate_counters SET count = count + $3"
                    " WHERE counter = $1 AND window_start = $2",
                    r.counter,
                    start,
                    amount,
                )
            return None

        refused: int | None = await self._write(op)
        return refused

    async def used(self, counter: str, window: int, now: float) -> int:
        start = int(now) // window * window

        async def fn(conn: Conn) -> int:
            n = await conn.fetchval(
                "SELECT count FROM rate_counters WHERE counter = $1 AND window_start = $2",
                counter,
                start,
            )
            return int(n or 0)

        n: int = await self._read(fn)
        return n

    async def prune(self, now: float) -> int:
        async def op(conn: Conn) -> int:
            status = await conn.execute("DELETE FROM rate_counters WHERE window_end <= $1", now)
            return int(status.rsplit(" ", 1)[-1])

        pruned: int = await self._write(op)
        return pruned


class MemoryRateCounters:
    """The counters of a ``MemoryStore``: the same rules, in a dict."""

    def __init__(self, check_open: Callable[[], None]) -> None:
        self._check_open = check_open
        self._counts: dict[tuple[str, int], tuple[int, int]] = {}  # → (count, window end)

    async def take(self, requests: Sequence[RateRequest], now: float) -> int | None:
        self._check_open()
        for i, r, start in _order(requests, now):
            if self._counts.get((r.counter, start), (0, 0))[0] + r.amount > r.limit:
                return i
        for _, r, start in _order(requests, now):
            count = self._counts.get((r.counter, start), (0, 0))[0]
            self._counts[(r.counter, start)] = (count + r.amount, start + r.window)
        return None

    async def used(self, counter: str, window: int, now: float) -> int:
        self._check_open()
        return self._counts.get((counter, int(now) // window * window), (0, 0))[0]

    async def prune(self, now: float) -> int:
        self._check_open()
        old = [k for k, (_, end) in self._counts.items() if end <= now]
        for k in old:
            del self._counts[k]
        return len(old)
