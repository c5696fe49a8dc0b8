"""Traffic shaping state in every store: destination suspensions and rate buckets.

Design note
-----------
Two tables, added together as one schema step (SQLite version 6, PostgreSQL
migration 6; the DDL is here so a renumbering is one line in each schema file):

``suspensions``      one row per suspended destination (a recipient domain, or an
                     ``mx:`` shaping rule's match): until when, why, how many
                     suspensions in a row (the next one lasts longer), and whether an
                     operator set it. Written rarely (a 421, ``postillon queue
                     suspend``), read by every node every few seconds, so a suspension
                     holds for the whole cluster and across restarts, and the CLI can
                     set one while the server runs.
``shaping_buckets``  one token bucket per shaping key (a destination's message rate,
                     an address's connection rate): tokens left and when last filled.
                     ``take`` refills, takes one token and may go into debt up to
                     ``max_wait`` seconds of refill (the caller then sleeps that long
                     before sending), in one locked read-modify-write, so several nodes
                     sharing a PostgreSQL queue together keep one rate.

The buckets of the SQLite and in-memory stores live in process memory: such a
queue belongs to one process, and a write (an fsync) per message for a bucket
nobody else reads would cost throughput for nothing. Their suspensions are in
the tables (SQLite) so that ``postillon queue suspend`` works beside the server.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = [
    "POSTGRES_TABLES",
    "SQLITE_TABLES",
    "BucketGrant",
    "MemoryBuckets",
    "MemoryShapingState",
    "PostgresShapingState",
    "ShapingState",
    "SqliteShapingState",
    "Suspension",
    "bucket_take",
]

Conn = Any  # an asyncpg connection, typed loosely as in tls_reports.py

SQLITE_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS suspensions (
        destination TEXT PRIMARY KEY,
        since REAL NOT NULL,
        until REAL NOT NULL,
        reason TEXT NOT NULL,
        level INTEGER NOT NULL,  -- suspensions in a row: the interval grows with it
        operator INTEGER NOT NULL  -- 1: set by an operator (never lifted by itself early)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS shaping_buckets (
        bucket TEXT PRIMARY KEY,
        tokens REAL NOT NULL,
        updated REAL NOT NULL
    ) WITHOUT ROWID""",
)

POSTGRES_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS suspensions (
        destination text PRIMARY KEY,
        since double precision NOT NULL,
        until double precision NOT NULL,
        reason text NOT NULL,
        level integer NOT NULL,
        operator boolean NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS shaping_buckets (
        bucket text PRIMARY KEY,
        tokens double precision NOT NULL,
        updated double precision NOT NULL
    )""",
)


@dataclass(frozen=True, slots=True)
class Suspension:
    destination: str
    since: float
    until: float
    reason: str
    level: int
    operator: bool


@dataclass(frozen=True, slots=True)
class BucketGrant:
    """``granted``: a token is yours, send after ``wait`` seconds. Otherwise the next
    token within ``max_wait`` is ``wait`` seconds away (nothing was taken)."""

    granted: bool
    wait: float


def bucket_take(
    tokens: float | None, updated: float, *, rate: float, burst: float, now: float, max_wait: float
) -> tuple[BucketGrant, float]:
    """The token-bucket step every store shares: (the grant, the tokens left after).

    ``tokens`` None: a new bucket, full. Tokens may go below zero by at most
    ``rate * max_wait``: the taker owns a token that refills within ``wait``.
    """
    level = burst if tokens is None else min(burst, tokens + max(0.0, now - updated) * rate)
    after = level - 1.0
    if after >= -rate * max_wait - 1e-9:
        return BucketGrant(True, max(0.0, -after / rate)), after
    return BucketGrant(False, (-after / rate) - max_wait), level


class ShapingState(Protocol):
    """What a store keeps for ``outbound/shaping`` (``store.shaping``), as a transaction:

    1. ``suspend`` inserts or replaces a destination's suspension; ``resume`` removes it
       (True if there was one); ``suspensions(now)`` lists those still running
       (``until > now``) and ``last_suspension`` the stored row of one destination,
       running or not (for the growing interval).
    2. ``take(bucket, rate, burst, now, max_wait)`` is one atomic token-bucket step
       (``bucket_take``) on the bucket named ``bucket``, shared by every node of the
       store.
    """

    async def suspend(self, suspension: Suspension) -> None: ...

    async def resume(self, destination: str) -> bool: ...

    async def suspensions(self, now: float) -> list[Suspension]: ...

    async def last_suspension(self, destination: str) -> Suspension | None: ...

    async def take(
        self, bucket: str, *, rate: float, burst: float, now: float, max_wait: float
    ) -> BucketGrant: ...


class MemoryBuckets:
    """Token buckets in process memory (the SQLite and in-memory stores)."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    async def take(
        self, bucket: str, *, rate: float, burst: float, now: float, max_wait: float
    ) -> BucketGrant:
        tokens, updated = self._buckets.get(bucket, (None, now))
        grant, after = bucket_take(
            tokens, updated, rate=rate, burst=burst, now=now, max_wait=max_wait
        )
        self._buckets[bucket] = (after, now)
        return grant


def _suspension(row: Any) -> Suspension:
    return Suspension(
        str(row[0]), float(row[1]), float(row[2]), str(row[3]), int(row[4]), bool(row[5])
    )


_COLUMNS: Final = "destination, since, until, reason, level, operator"


class SqliteShapingState(MemoryBuckets):
    """Suspensions in the SQLite file (``read(fn)``, ``write(fn)`` of the store)."""

    def __init__(
        self,
        read: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
        write: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
    ) -> None:
        super().__init__()
        self._read = read
        self._write = write

    async def suspend(self, suspension: Suspension) -> None:
        s = suspension
        values = (s.destination, s.since, s.until, s.reason, s.level, int(s.operator))
        await self._write(
            lambda conn: conn.execute(
                f"INSERT OR REPLACE INTO suspensions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                values,
            )
        )

    async def resume(self, destination: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM suspensions WHERE destination = ?", (destination.lower(),)
            )
            return cur.rowcount > 0

        return bool(await self._write(op))

    async def suspensions(self, now: float) -> list[Suspension]:
        def fn(conn: sqlite3.Connection) -> list[Suspension]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM suspensions WHERE until > ? ORDER BY until", (now,)
            )
            return [_suspension(r) for r in rows]

        result: list[Suspension] = await self._read(fn)
        return result

    async def last_suspension(self, destination: str) -> Suspension | None:
        def fn(conn: sqlite3.Connection) -> Suspension | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM suspensions WHERE destination = ?", (destination,)
            ).fetchone()
            return _suspension(row) if row is not None else None

        result: Suspension | None = await self._read(fn)
        return result


class MemoryShapingState(MemoryBuckets):
    """Everything in dicts (the in-memory store); ``check`` raises when it is closed."""

    def __init__(self, check: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self._check = check
        self._suspensions: dict[str, Suspension] = {}

    async def suspend(self, suspension: Suspension) -> None:
        self._check()
        self._suspensions[suspension.destination] = suspension

    async def resume(self, destination: str) -> bool:
        self._check()
        return self._suspensions.pop(destination.lower(), None) is not None

    async def suspensions(self, now: float) -> list[Suspension]:
        self._check()
        return sorted(
            (s for s in self._suspensions.values() if s.until > now), key=lambda s: s.until
        )

    async def last_suspension(self, destination: str) -> Suspension | None:
        self._check()
        return self._suspensions.get(destination)


class PostgresShapingState:
    """Suspensions and buckets on a ``PostgresStore``'s connections, shared by nodes."""

    def __init__(
        self,
        read: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
        write: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def suspend(self, suspension: Suspension) -> None:
        s = suspension

        async def op(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO suspensions ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (destination) DO UPDATE SET since = excluded.since,"
                " until = excluded.until, reason = excluded.reason, level = excluded.level,"
                " operator = excluded.operator",
                s.destination,
                s.since,
                s.until,
                s.reason,
                s.level,
                s.operator,
            )

        await self._write(op)

    async def resume(self, destination: str) -> bool:
        async def op(conn: Conn) -> bool:
            status = await conn.execute(
                "DELETE FROM suspensions WHERE destination = $1", destination.lower()
            )
            return bool(status != "DELETE 0")

        return bool(await self._write(op))

    async def suspensions(self, now: float) -> list[Suspension]:
        async def fn(conn: Conn) -> list[Suspension]:
            rows = await conn.fetch(
                f"SELECT {_COLUMNS} FROM suspensions WHERE until > $1 ORDER BY until", now
            )
            return [_suspension(r) for r in rows]

        result: list[Suspension] = await self._read(fn)
        return result

    async def last_suspension(self, destination: str) -> Suspension | None:
        async def fn(conn: Conn) -> Suspension | None:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM suspensions WHERE destination = $1", destination
            )
            return _suspension(row) if row is not None else None

        result: Suspension | None = await self._read(fn)
        return result

    async def take(
        self, bucket: str, *, rate: float, burst: float, now: float, max_wait: float
    ) -> BucketGrant:
        async def op(conn: Conn) -> BucketGrant:
            # Make the row exist, then lock it: concurrent takers (other nodes) queue
            # on the row lock, so each sees the tokens the previous one left.
            await conn.execute(
                "INSERT INTO shaping_buckets (bucket, tokens, updated) VALUES ($1, $2, $3)"
                " ON CONFLICT (bucket) DO NOTHING",
                bucket,
                burst,
                now,
            )
            row = await conn.fetchrow(
                "SELECT tokens, updated FROM shaping_buckets WHERE bucket = $1 FOR UPDATE",
                bucket,
            )
            assert row is not None
            # Node clocks differ a little: never refill for a moment before the last take.
            updated = float(row[1])
            at = max(now, updated)
            grant, after = bucket_take(
                float(row[0]), updated, rate=rate, burst=burst, now=at, max_wait=max_wait
            )
            await conn.execute(
                "UPDATE shaping_buckets SET tokens = $2, updated = $3 WHERE bucket = $1",
                bucket,
                after,
                at,
            )
            return grant

        result: BucketGrant = await self._write(op)
        return result
