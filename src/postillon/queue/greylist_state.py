"""Greylisting state (triplets and auto-allowed clients) in every store.

Design note
-----------
Greylisting (``checks/greylist.py``) answers the first attempt of an unknown
(client network, sender, recipient) triplet with a temporary failure and accepts a retry
that comes after ``delay`` seconds: real MTAs retry, most spam engines do not. The state
lives in the queue store, so a restart keeps it and every node of a cluster shares it: a
client greylisted by node 1 that retries on node 2 after the delay is passed there.

Two tables, part of the policy-state schema step (``policy_state.py``):

``greylist_triplets``  one row per triplet (``triplet_key``): when first seen, when it
                       passed (NULL until then), when last seen. A row not seen for
                       ``expiry`` seconds is as good as absent (and ``prune`` drops it).
``greylist_clients``   one row per client network that passed: how many triplets it
                       passed; past ``auto_allow_after`` passes it skips greylisting
                       (a real MTA has shown it retries), until unseen for ``expiry``.

Hot path: a known triplet (or an auto-allowed client) seen within the last
``refresh_after`` seconds is answered from a read alone, with no write (on SQLite a write
costs a share of an fsync; a busy MX sees the same senders all day). Its ``last_seen`` is
then up to that much older than the truth, which only moves its expiry that much earlier.

Otherwise ``check`` is one write transaction: it reads the rows, decides with :func:`decide` (pure)
and writes the new state back; on PostgreSQL the rows are locked (``FOR UPDATE``) after an
``INSERT ... ON CONFLICT DO NOTHING`` that makes sure they exist, so two nodes seeing the
same triplet at once agree. It is state, not mail: PostgreSQL writes it without waiting
for a durable commit (a crash forgets at most the last moments: a client is greylisted
once more).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "POSTGRES_TABLES",
    "SQLITE_TABLES",
    "GreylistPolicy",
    "GreylistResult",
    "MemoryGreylist",
    "PostgresGreylist",
    "SqliteGreylist",
    "decide",
    "triplet_key",
]

Conn = Any  # an asyncpg connection (typed loosely, as in tls_reports.py)

SQLITE_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS greylist_triplets (
        triplet_key TEXT PRIMARY KEY,  -- client network / sender / recipient, lower case
        first_seen REAL NOT NULL,
        passed_at REAL,  -- NULL until a retry came after the delay
        last_seen REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS greylist_triplets_by_seen ON greylist_triplets(last_seen)",
    """CREATE TABLE IF NOT EXISTS greylist_clients (
        client_net TEXT PRIMARY KEY,
        passes INTEGER NOT NULL,
        last_seen REAL NOT NULL
    ) WITHOUT ROWID""",
)

POSTGRES_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS greylist_triplets (
        triplet_key text PRIMARY KEY,
        first_seen double precision NOT NULL,
        passed_at double precision,
        last_seen double precision NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS greylist_triplets_by_seen ON greylist_triplets (last_seen)",
    """CREATE TABLE IF NOT EXISTS greylist_clients (
        client_net text PRIMARY KEY,
        passes integer NOT NULL,
        last_seen double precision NOT NULL
    )""",
)

Status = Literal["new", "early", "passed", "known", "client-allowed"]


@dataclass(frozen=True, slots=True)
class GreylistPolicy:
    delay: float  # seconds before a retry is accepted
    expiry: float  # seconds a triplet or an allowed client is remembered unseen
    auto_allow_after: int = 0  # passes after which a client skips greylisting; 0 = never


@dataclass(frozen=True, slots=True)
class GreylistResult:
    """``new``/``early``: refuse for now (``retry_in`` seconds left); the others pass."""

    status: Status
    retry_in: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.status in ("passed", "known", "client-allowed")


def refresh_after(policy: GreylistPolicy) -> float:
    """How stale ``last_seen`` may get before a pass is written again (see the note)."""
    return min(3600.0, policy.expiry / 10)


def _fresh_pass(
    client: tuple[int, float] | None,
    triplet: tuple[float, float | None, float] | None,
    now: float,
    policy: GreylistPolicy,
) -> GreylistResult | None:
    """The answer a read alone gives (a recent pass), or None: write."""
    recent = now - refresh_after(policy)
    if _client_allowed(client, now, policy) and client is not None and client[1] >= recent:
        return GreylistResult("client-allowed")
    if triplet is not None and triplet[1] is not None and triplet[2] >= recent:
        return GreylistResult("known")
    return None


def peek_decision(
    client: tuple[int, float] | None,
    triplet: tuple[float, float | None, float] | None,
    now: float,
    policy: GreylistPolicy,
) -> GreylistResult:
    """What ``check`` would answer, changing nothing (``explain --simulate``)."""
    if _client_allowed(client, now, policy):
        return GreylistResult("client-allowed")
    return decide(Triplet(*triplet) if triplet is not None else None, now, policy)[0]


def triplet_key(client_net: str, sender: str, recipient: str) -> str:
    return f"{client_net}/{sender.lower() or '<>'}/{recipient.lower()}"


@dataclass(frozen=True, slots=True)
class Triplet:
    first_seen: float
    passed_at: float | None
    last_seen: float


def decide(
    row: Triplet | None, now: float, policy: GreylistPolicy
) -> tuple[GreylistResult, Triplet]:
    """The triplet's verdict and its new row (pure; the stores run it in a transaction)."""
    if row is None or row.last_seen < now - policy.expiry:
        return GreylistResult("new", policy.delay), Triplet(now, None, now)
    if row.passed_at is not None:
        return GreylistResult("known"), Triplet(row.first_seen, row.passed_at, now)
    waited = now - row.first_seen
    if waited >= policy.delay:
        return GreylistResult("passed"), Triplet(row.first_seen, now, now)
    # An early retry does not restart the clock (postgrey does the same).
    return GreylistResult("early", policy.delay - waited), Triplet(row.first_seen, None, now)


def _client_allowed(row: tuple[int, float] | None, now: float, policy: GreylistPolicy) -> bool:
    return (
        policy.auto_allow_after > 0
        and row is not None
        and row[0] >= policy.auto_allow_after
        and row[1] >= now - policy.expiry
    )


def _client_passes(row: tuple[int, float] | None, now: float, policy: GreylistPolicy) -> int:
    """The client's pass count after one more pass (an expired count starts again)."""
    if row is None or row[1] < now - policy.expiry:
        return 1
    return row[0] + 1


class SqliteGreylist:
    """The state on a ``SqliteStore``'s reader pool and group-commit writer."""

    def __init__(
        self,
        read: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
        write: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def check(
        self, client_net: str, sender: str, recipient: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult:
        key = triplet_key(client_net, sender, recipient)

        def look(conn: sqlite3.Connection) -> GreylistResult | None:
            client = conn.execute(
                "SELECT passes, last_seen FROM greylist_clients WHERE client_net = ?",
                (client_net,),
            ).fetchone()
            triplet = conn.execute(
                "SELECT first_seen, passed_at, last_seen FROM greylist_triplets"
                " WHERE triplet_key = ?",
                (key,),
            ).fetchone()
            return _fresh_pass(client, triplet, now, policy)

        known: GreylistResult | None = await self._read(look)
        if known is not None:
            return known

        def op(conn: sqlite3.Connection) -> GreylistResult:
            client = conn.execute(
                "SELECT passes, last_seen FROM greylist_clients WHERE client_net = ?",
                (client_net,),
            ).fetchone()
            if _client_allowed(client, now, policy):
                conn.execute(
                    "UPDATE greylist_clients SET last_seen = ? WHERE client_net = ?",
                    (now, client_net),
                )
                return GreylistResult("client-allowed")
            found = conn.execute(
                "SELECT first_seen, passed_at, last_seen FROM greylist_triplets"
                " WHERE triplet_key = ?",
                (key,),
            ).fetchone()
            result, row = decide(Triplet(*found) if found else None, now, policy)
            conn.execute(
                "INSERT OR REPLACE INTO greylist_triplets VALUES (?, ?, ?, ?)",
                (key, row.first_seen, row.passed_at, row.last_seen),
            )
            if result.status == "passed":
                conn.execute(
                    "INSERT OR REPLACE INTO greylist_clients VALUES (?, ?, ?)",
                    (client_net, _client_passes(client, now, policy), now),
                )
            return result

        result: GreylistResult = await self._write(op)
        return result

    async def peek(
        self, client_net: str, sender: str, recipient: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult:
        key = triplet_key(client_net, sender, recipient)

        def look(conn: sqlite3.Connection) -> GreylistResult:
            client = conn.execute(
                "SELECT passes, last_seen FROM greylist_clients WHERE client_net = ?",
                (client_net,),
            ).fetchone()
            triplet = conn.execute(
                "SELECT first_seen, passed_at, last_seen FROM greylist_triplets"
                " WHERE triplet_key = ?",
                (key,),
            ).fetchone()
            return peek_decision(client, triplet, now, policy)

        result: GreylistResult = await self._read(look)
        return result

    async def prune(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM greylist_triplets WHERE last_seen < ?", (before,))
            conn.execute("DELETE FROM greylist_clients WHERE last_seen < ?", (before,))
            return int(n.rowcount)

        pruned: int = await self._write(op)
        return pruned


class PostgresGreylist:
    """The state on a ``PostgresStore``'s connections (rows locked, see the note)."""

    def __init__(
        self,
        read: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
        write: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def check(
        self, client_net: str, sender: str, recipient: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult:
        key = triplet_key(client_net, sender, recipient)

        async def look(conn: Conn) -> GreylistResult | None:
            client = await conn.fetchrow(
                "SELECT passes, last_seen FROM greylist_clients WHERE client_net = $1", client_net
            )
            triplet = await conn.fetchrow(
                "SELECT first_seen, passed_at, last_seen FROM greylist_triplets"
                " WHERE triplet_key = $1",
                key,
            )
            return _fresh_pass(
                (int(client[0]), float(client[1])) if client is not None else None,
                tuple(triplet) if triplet is not None else None,
                now,
                policy,
            )

        known: GreylistResult | None = await self._read(look)
        if known is not None:
            return known

        async def op(conn: Conn) -> GreylistResult:
            client = await conn.fetchrow(
                "SELECT passes, last_seen FROM greylist_clients WHERE client_net = $1 FOR UPDATE",
                client_net,
            )
            client_row = (int(client[0]), float(client[1])) if client is not None else None
            if _client_allowed(client_row, now, policy):
                await conn.execute(
                    "UPDATE greylist_clients SET last_seen = $2 WHERE client_net = $1",
                    client_net,
                    now,
                )
                return GreylistResult("client-allowed")
            inserted = await conn.fetchval(
                "INSERT INTO greylist_triplets VALUES ($1, $2, NULL, $2)"
                " ON CONFLICT DO NOTHING RETURNING triplet_key",
                key,
                now,
            )
            if inserted is not None:
                return GreylistResult("new", policy.delay)
            found = await conn.fetchrow(
                "SELECT first_seen, passed_at, last_seen FROM greylist_triplets"
                " WHERE triplet_key = $1 FOR UPDATE",
                key,
            )
            result, row = decide(Triplet(*found), now, policy)
            await conn.execute(
                "UPDATE greylist_triplets SET first_seen = $2, passed_at = $3, last_seen = $4"
                " WHERE triplet_key = $1",
                key,
                row.first_seen,
                row.passed_at,
                row.last_seen,
            )
            if result.status == "passed":
                await conn.execute(
                    "INSERT INTO greylist_clients VALUES ($1, $2, $3) ON CONFLICT (client_net)"
                    " DO UPDATE SET passes = excluded.passes, last_seen = excluded.last_seen",
                    client_net,
                    _client_passes(client_row, now, policy),
                    now,
                )
            return result

        result: GreylistResult = await self._write(op)
        return result

    async def peek(
        self, client_net: str, sender: str, recipient: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult:
        key = triplet_key(client_net, sender, recipient)

        async def look(conn: Conn) -> GreylistResult:
            client = await conn.fetchrow(
                "SELECT passes, last_seen FROM greylist_clients WHERE client_net = $1", client_net
            )
            triplet = await conn.fetchrow(
                "SELECT first_seen, passed_at, last_seen FROM greylist_triplets"
                " WHERE triplet_key = $1",
                key,
            )
            return peek_decision(
                (int(client[0]), float(client[1])) if client is not None else None,
                tuple(triplet) if triplet is not None else None,
                now,
                policy,
            )

        result: GreylistResult = await self._read(look)
        return result

    async def prune(self, before: float) -> int:
        async def op(conn: Conn) -> int:
            status = await conn.execute(
                "DELETE FROM greylist_triplets WHERE last_seen < $1", before
            )
            await conn.execute("DELETE FROM greylist_clients WHERE last_seen < $1", before)
            return int(status.rsplit(" ", 1)[-1])

        pruned: int = await self._write(op)
        return pruned


class MemoryGreylist:
    """The state of a ``MemoryStore``: the same rules, in dicts."""

    def __init__(self, check_open: Callable[[], None]) -> None:
        self._check_open = check_open
        self._triplets: dict[str, Triplet] = {}
        self._clients: dict[str, tuple[int, float]] = {}

    async def check(
        self, client_net: str, sender: str, recipient: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult:
        self._check_open()
        client = self._clients.get(client_net)
        if _client_allowed(client, now, policy):
            assert client is not None
            self._clients[client_net] = (client[0], now)
            return GreylistResult("client-allowed")
        key = triplet_key(client_net, sender, recipient)
        result, self._triplets[key] = decide(self._triplets.get(key), now, policy)
        if result.status == "passed":
            self._clients[client_net] = (_client_passes(client, now, policy), now)
        return result

    async def peek(
        self, client_net: str, sender: str, recipient: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult:
        self._check_open()
        triplet = self._triplets.get(triplet_key(client_net, sender, recipient))
        row = (triplet.first_seen, triplet.passed_at, triplet.last_seen) if triplet else None
        return peek_decision(self._clients.get(client_net), row, now, policy)

    async def prune(self, before: float) -> int:
        self._check_open()
        old = [k for k, t in self._triplets.items() if t.last_seen < before]
        for k in old:
            del self._triplets[k]
        for c in [c for c, (_, seen) in self._clients.items() if seen < before]:
            del self._clients[c]
        return len(old)
