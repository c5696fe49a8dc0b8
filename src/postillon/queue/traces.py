"""The decision trace in every store (``postillon explain``): SQL, rows, the three parts.

Design note
-----------
Every decision of every check (``core.trace.TraceStep``) is kept in one table,
``decision_trace``, so ``postillon explain`` in another process (or on another
node of a PostgreSQL cluster) tells the story of a session or message. The DDL is
self-contained (``CREATE ... IF NOT EXISTS``) and added as one schema step (SQLite
version 6, PostgreSQL migration 6), so a renumbering is one line in each schema file.

The trace is a diagnostic, not mail: it is written in batches by
``checks.trace.TraceRecorder`` (a crash loses the last few seconds; PostgreSQL
writes it without waiting for a durable commit), bounded by age (``prune``, from
``[explain] keep_hours``) and never read on the mail path.

Reads, as a transaction:

1. ``add(steps)`` appends steps; steps of one session keep their order.
2. ``session(id)`` is every step of one SMTP session, in order.
3. ``message(queue_id)`` is the story of one message: the steps of the session that
   made it, before its transaction and of it (not of the session's other messages).
4. ``sessions(client_ip, since, until, rejected_only, limit)`` is the steps of the
   newest ``limit`` sessions of that client in that time (``client_ip`` "" = any
   client), optionally only those in which something was refused.
5. ``prune(before)`` drops steps older than ``before``; how many went.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from postillon.core.trace import TraceStep

__all__ = ["POSTGRES_TABLES", "SQLITE_TABLES", "MemoryTraces", "PostgresTraces", "SqliteTraces"]

Conn = Any  # an asyncpg connection, typed loosely (as tls_reports.py does)

SQLITE_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS decision_trace (
        step_id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        queue_id TEXT NOT NULL,  -- '' before the transaction has one
        at REAL NOT NULL,
        client_ip TEXT NOT NULL,
        phase TEXT NOT NULL,
        check_name TEXT NOT NULL,
        action TEXT NOT NULL,
        saw TEXT NOT NULL,
        reply TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS decision_trace_session ON decision_trace (session_id)",
    "CREATE INDEX IF NOT EXISTS decision_trace_queue ON decision_trace (queue_id)"
    " WHERE queue_id != ''",
    "CREATE INDEX IF NOT EXISTS decision_trace_client ON decision_trace (client_ip, at)",
    "CREATE INDEX IF NOT EXISTS decision_trace_at ON decision_trace (at)",
)

POSTGRES_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS decision_trace (
        step_id bigserial PRIMARY KEY,
        session_id text NOT NULL,
        queue_id text NOT NULL,
        at double precision NOT NULL,
        client_ip text NOT NULL,
        phase text NOT NULL,
        check_name text NOT NULL,
        action text NOT NULL,
        saw text NOT NULL,
        reply text NOT NULL
    )""",
    *SQLITE_TABLES[1:],
)

_COLUMNS: Final = "session_id, queue_id, at, client_ip, phase, check_name, action, saw, reply"
_ORDER: Final = " ORDER BY at, step_id"


def _values(step: TraceStep) -> tuple[Any, ...]:
    return (
        step.session_id,
        step.queue_id,
        step.at,
        step.client_ip,
        step.phase,
        step.check,
        step.action,
        step.saw,
        step.reply,
    )


def _step(r: Sequence[Any]) -> TraceStep:
    return TraceStep(
        session_id=r[0],
        queue_id=r[1],
        at=float(r[2]),
        client_ip=r[3],
        phase=r[4],
        check=r[5],
        action=r[6],
        saw=r[7],
        reply=r[8],
    )


def _story(steps: list[TraceStep], queue_id: str) -> list[TraceStep]:
    """A session's steps that belong to the story of ``queue_id``."""
    return [s for s in steps if s.queue_id in ("", queue_id)]


def _sessions_query(mark: Callable[[int], str], client_ip: str, rejected_only: bool) -> str:
    where = [f"at >= {mark(1)}", f"at < {mark(2)}"]
    if client_ip:
        where.append(f"client_ip = {mark(4)}")
    if rejected_only:
        where.append("action = 'reject'")
    inner = (
        f"SELECT session_id FROM decision_trace WHERE {' AND '.join(where)}"
        f" GROUP BY session_id ORDER BY max(at) DESC LIMIT {mark(3)}"
    )
    return f"SELECT {_COLUMNS} FROM decision_trace WHERE session_id IN ({inner}){_ORDER}"


class SqliteTraces:
    """The trace on a ``SqliteStore``'s reader pool and group-commit writer."""

    def __init__(
        self,
        read: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
        write: Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def add(self, steps: Sequence[TraceStep]) -> None:
        values = [_values(s) for s in steps]
        if values:
            await self._write(
                lambda conn: conn.executemany(
                    f"INSERT INTO decision_trace ({_COLUMNS}) VALUES ({', '.join('?' * 9)})",
                    values,
                )
            )

    async def _select(self, sql: str, args: Sequence[Any]) -> list[TraceStep]:
        def fn(conn: sqlite3.Connection) -> list[TraceStep]:
            return [_step(r) for r in conn.execute(sql, args).fetchall()]

        result: list[TraceStep] = await self._read(fn)
        return result

    async def session(self, session_id: str) -> list[TraceStep]:
        sql = f"SELECT {_COLUMNS} FROM decision_trace WHERE session_id = ?{_ORDER}"
        return await self._select(sql, (session_id,))

    async def message(self, queue_id: str) -> list[TraceStep]:
        sql = (
            f"SELECT {_COLUMNS} FROM decision_trace WHERE session_id IN"
            f" (SELECT session_id FROM decision_trace WHERE queue_id = ?){_ORDER}"
        )
        return _story(await self._select(sql, (queue_id,)), queue_id)

    async def sessions(
        self,
        client_ip: str,
        since: float,
        until: float,
        rejected_only: bool = False,
        limit: int = 20,
    ) -> list[TraceStep]:
        sql = _sessions_query(lambda i: f"?{i}", client_ip, rejected_only)
        args: list[Any] = [since, until, limit] + ([client_ip] if client_ip else [])
        return await self._select(sql, args)

    async def prune(self, before: float) -> int:
        pruned: int = await self._write(
            lambda conn: conn.execute("DELETE FROM decision_trace WHERE at < ?", (before,)).rowcount
        )
        return pruned


class PostgresTraces:
    """The trace on a ``PostgresStore``'s connections (``read(fn)``, ``write(fn)``)."""

    def __init__(
        self,
        read: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
        write: Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]],
    ) -> None:
        self._read = read
        self._write = write

    async def add(self, steps: Sequence[TraceStep]) -> None:
        values = [_values(s) for s in steps]
        if not values:
            return
        marks = ", ".join(f"${i}" for i in range(1, 10))

        async def op(conn: Conn) -> None:
            await conn.executemany(
                f"INSERT INTO decision_trace ({_COLUMNS}) VALUES ({marks})", values
            )

        await self._write(op)

    async def _select(self, sql: str, *args: Any) -> list[TraceStep]:
        async def fn(conn: Conn) -> list[TraceStep]:
            return [_step(r) for r in await conn.fetch(sql, *args)]

        result: list[TraceStep] = await self._read(fn)
        return result

    async def session(self, session_id: str) -> list[TraceStep]:
        sql = f"SELECT {_COLUMNS} FROM decision_trace WHERE session_id = $1{_ORDER}"
        return await self._select(sql, session_id)

    async def message(self, queue_id: str) -> list[TraceStep]:
        sql = (
            f"SELECT {_COLUMNS} FROM decision_trace WHERE session_id IN"
            f" (SELECT session_id FROM decision_trace WHERE queue_id = $1){_ORDER}"
        )
        return _story(await self._select(sql, queue_id), queue_id)

    async def sessions(
        self,
        client_ip: str,
        since: float,
        until: float,
        rejected_only: bool = False,
        limit: int = 20,
    ) -> list[TraceStep]:
        sql = _sessions_query(lambda i: f"${i}", client_ip, rejected_only)
        args: list[Any] = [since, until, limit] + ([client_ip] if client_ip else [])
        return await self._select(sql, *args)

    async def prune(self, before: float) -> int:
        async def op(conn: Conn) -> int:
            status = await conn.execute("DELETE FROM decision_trace WHERE at < $1", before)
            return int(status.rsplit(" ", 1)[-1])

        pruned: int = await self._write(op)
        return pruned


class MemoryTraces:
    """The trace of a ``MemoryStore``: the same rules, in a list."""

    def __init__(self, check_open: Callable[[], None]) -> None:
        self._check_open = check_open
        self._steps: list[TraceStep] = []

    async def add(self, steps: Sequence[TraceStep]) -> None:
        self._check_open()
        self._steps.extend(steps)

    def _ordered(self, keep: Callable[[TraceStep], bool]) -> list[TraceStep]:
        # A stable sort on time: steps recorded at the same instant keep their order.
        return sorted((s for s in self._steps if keep(s)), key=lambda s: s.at)

    async def session(self, session_id: str) -> list[TraceStep]:
        self._check_open()
        return self._ordered(lambda s: s.session_id == session_id)

    async def message(self, queue_id: str) -> list[TraceStep]:
        self._check_open()
        ids = {s.session_id for s in self._steps if s.queue_id == queue_id}
        return _story(self._ordered(lambda s: s.session_id in ids), queue_id)

    async def sessions(
        self,
        client_ip: str,
        since: float,
        until: float,
        rejected_only: bool = False,
        limit: int = 20,
    ) -> list[TraceStep]:
        self._check_open()
        newest: dict[str, float] = {}
        for s in self._steps:
            matches = not client_ip or s.client_ip == client_ip
            if since <= s.at < until and matches and (not rejected_only or s.action == "reject"):
                newest[s.session_id] = max(newest.get(s.session_id, s.at), s.at)
        chosen = set(sorted(newest, key=lambda k: newest[k], reverse=True)[:limit])
        return self._ordered(lambda s: s.session_id in chosen)

    async def prune(self, before: float) -> int:
        self._check_open()
        kept = [s for s in self._steps if s.at >= before]
        pruned = len(self._steps) - len(kept)
        self._steps = kept
        return pruned
