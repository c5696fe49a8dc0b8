"""The shared queue store: PostgreSQL through asyncpg, for several postillon nodes.

Design note
-----------
Same protocol and contract tests as the embedded SQLite store (``sqlite_store.py``);
this note covers what differs.

**Everything lives in PostgreSQL**, bodies included (``bodies(queue_id, seq, data)``
rows of 256 KiB, ``bytea`` stored out of line without compression), so the nodes share
nothing else: any node can deliver any message. The schema is created and changed only
by ``postillon db migrate`` (``postgres_schema.py``); a store refuses to open a
database that is not exactly at the schema version it knows.

**Files.** ``postgres_connection.py``: the pool and its health; ``postgres_writer.py``:
the group-commit writers (two lanes, so a ``250`` never waits behind the runner's
bookkeeping); ``postgres_schema.py``: the migrations; this file: the queries.

**Durability of bookkeeping.** A batch that commits a message or runs an operator
command (hold, release, delete, flush, bounce) waits for its WAL flush: it says ``SET
LOCAL synchronous_commit = on`` itself, so a server tuned to ``off`` cannot make a 250
go out before the flush (``postgres_connection.py``, "Durability"). A batch of only
claims, outcomes, released leases and history events commits with ``synchronous_commit =
off``: it returns without waiting for the flush, which the next message commit (or the
WAL writer, within ``wal_writer_delay``) does anyway. If the database server crashes in
between, the last few outcomes or claims are lost, so a delivery is repeated (a
duplicate, SMTP's at-least-once) but never lost; this halves the fsyncs per relayed
message. Fencing does not depend on it: tokens are checked inside the database.

**Large bodies stream.** A message over 1 MiB is written in its own transaction, chunk
by chunk, so it never holds up the small messages' group commit.

**Work sharing.** ``claim_due`` selects expired leases first, then due records in
``next_try`` order, with ``FOR UPDATE SKIP LOCKED``: nodes claiming at the same moment
never wait for each other and never get the same record. Each claimed record gets a
fresh random lease token; ``record_outcomes`` applies an outcome only while the token
still matches (fencing), in one set-based UPDATE, so a node that comes back after its
lease expired cannot record a stale outcome over the newer holder's.

**Bodies stream.** ``read_body`` is an async generator: each chunk is one query on the
pool, like the SQLite store's one short read per chunk; no transaction stays open while
a slow peer takes the data.

**Health.** See ``postgres_connection.py``: a node without its database answers
``421 4.3.0`` instead of accepting mail it could not commit.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import asyncpg

from postillon.core.reply import Reply
from postillon.core.sts import CachedPolicy
from postillon.queue import acme_state, policy_state, sts_cache
from postillon.queue.claims import postgres_claim_due
from postillon.queue.codec import encode_reply, message_from_row, record_from_row
from postillon.queue.postgres_connection import (
    ACQUIRE_TIMEOUT,
    CONNECTION_ERRORS,
    HEALTH_INTERVAL,
    Conn,
    Database,
)
from postillon.queue.postgres_writer import CHUNK_SIZE, WRITERS, BatchWriter, Commit, OpFn
from postillon.queue.postpone import postgres_postpone
from postillon.queue.queue_shape import QueueShape, postgres_shape
from postillon.queue.shaping_state import PostgresShapingState
from postillon.queue.store import (
    HEALTHY,
    DeliveryRecord,
    DeliveryState,
    EventCount,
    MessageInfo,
    NewMessage,
    OutcomeUpdate,
    QueueEvent,
    StoreError,
    StoreHealth,
)
from postillon.queue.tls_reports import PostgresTlsReports
from postillon.queue.traces import PostgresTraces

__all__ = ["CHUNK_SIZE", "WRITERS", "PostgresStore"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_OUTCOME_STATES: Final = frozenset(
    {DeliveryState.DELIVERED, DeliveryState.DEFERRED, DeliveryState.FAILED}
)
_RECORD_COLUMNS: Final = (
    "record_id, queue_id, recipient, original_recipient, rcpt_params, state, attempts,"
    " next_try, last_reply, lease_token, lease_owner, lease_expires, updated_at"
)
_MESSAGE_COLUMNS: Final = "queue_id, sender, mail_params, size, received_at, client, source"

# A record that is HELD but still carries a running lease has a delivery in flight.
_IN_FLIGHT: Final = "(lease_token IS NOT NULL AND lease_expires > $1)"


class PostgresStore:
    """The shared ``QueueStore`` (see the module docstring).

    Opens lazily on first use (the constructor does no I/O). ``create_schema=True``
    applies the migrations itself: for tests and ``queue import``; a server
    requires ``postillon db migrate`` to have been run.
    """

    def __init__(
        self,
        dsn: str,
        *,
        clock_now: Callable[[], float] = time.time,
        pool_size: int = 10,
        writers: int = WRITERS,
        create_schema: bool = False,
        health_interval: float = HEALTH_INTERVAL,
    ) -> None:
        self._now = clock_now
        self._db = Database(
            dsn,
            pool_size=max(pool_size, writers + 2),
            create_schema=create_schema,
            health_interval=health_interval,
        )
        self._writer = BatchWriter(self._db, writers)
        self._closed = False
        # store.py steps 7-11. Statistics and policy state need no durable wait (a lost
        # count is harmless); the ACME certificate does.
        lazy = lambda fn: self._write(fn, durable=False)  # noqa: E731
        self.tls_reports = PostgresTlsReports(self._read, lazy)
        self.acme = acme_state.PostgresAcmeState(self._read, self._write)
        self.traces = PostgresTraces(self._read, lazy)
        self.policy_state = policy_state.PostgresPolicyState(self._read, lazy)
        self.shaping = PostgresShapingState(self._read, lazy)

    @property
    def available(self) -> bool:
        """False while the database is unreachable (see "Health" in postgres_connection.py)."""
        return self._db.available

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> PostgresStore:
        """Connect, check (or create) the schema, start the writers. Idempotent."""
        if self._closed:
            raise StoreError("store is closed")
        if await self._db.open():
            self._writer.start()
        return self

    async def _ready(self) -> asyncpg.Pool:
        if self._closed:
            raise StoreError("store is closed")
        if self._db.pool is None:
            await self.open()
        return await self._db.ready()

    async def _write(
        self,
        fn: OpFn | None,
        commit: Commit | None = None,
        outcomes: Sequence[OutcomeUpdate] | None = None,
        *,
        durable: bool = True,
    ) -> Any:
        await self._ready()
        return await self._writer.submit(fn, commit, outcomes, durable=durable)

    def health(self) -> StoreHealth:
        if self._closed:
            return StoreHealth(False, "store is closed", recoverable=False)
        problem = self._writer.problem()
        if problem is not None:
            return StoreHealth(False, problem, recoverable=False)
        if not self._db.available:
            return StoreHealth(False, "queue database unreachable")
        return HEALTHY

    async def close(self) -> None:
        """Finish every operation already submitted, then close the connections."""
        if self._closed:
            return
        self._closed = True
        await self._writer.close()
        await self._db.close()

    # ------------------------------------------------------------ writes

    async def commit(self, message: NewMessage) -> None:
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        prepared = Commit(message, self._now())
        if prepared.small:
            prepared.read_small_body()
            await self._write(None, prepared)
        else:
            await self._ready()
            await self._writer.commit_streaming(prepared)

    async def claim_due(
        self, now: float, limit: int, lease_seconds: float, owner: str
    ) -> list[DeliveryRecord]:
        if limit <= 0:
            return []
        expires = now + lease_seconds

        async def op(conn: Conn) -> list[DeliveryRecord]:
            return await postgres_claim_due(conn, now, limit, expires, owner)

        result: list[DeliveryRecord] = await self._write(op, durable=False)
        return result

    async def record_outcomes(self, updates: Sequence[OutcomeUpdate]) -> list[str]:
        for u in updates:
            if u.state not in _OUTCOME_STATES:
                raise ValueError(f"not an outcome state: {u.state}")
        if not updates:
            return []
        result: list[str] = await self._write(None, outcomes=list(updates), durable=False)
        return result

    async def release_leases(self, owner: str) -> int:
        now = self._now()

        async def op(conn: Conn) -> int:
            return await _release(conn, [owner], now)

        result: int = await self._write(op, durable=False)
        return result

    async def heartbeat(self, owner: str, now: float) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO nodes (owner, heartbeat) VALUES ($1, $2)"
                " ON CONFLICT (owner) DO UPDATE SET heartbeat = EXCLUDED.heartbeat",
                owner,
                now,
            )

        # Bookkeeping: a heartbeat lost in a database crash is sent again in seconds.
        await self._write(op, durable=False)

    async def release_dead_owners(self, now: float, timeout: float) -> int:
        async def op(conn: Conn) -> int:
            # Deleting the rows first makes concurrent callers (every live node runs
            # this) take over each dead owner once; the row lock serialises them.
            dead = [
                row[0]
                for row in await conn.fetch(
                    "DELETE FROM nodes WHERE heartbeat < $1 RETURNING owner", now - timeout
                )
            ]
            return await _release(conn, dead, now) if dead else 0

        result: int = await self._write(op, durable=False)
        return result

    async def hold(self, queue_id: str, now: float) -> int:
        async def op(conn: Conn) -> int:
            return _rowcount(
                await conn.execute(
                    "UPDATE records SET state = 'held', updated_at = $1"
                    " WHERE queue_id = $2 AND state IN ('pending', 'deferred', 'leased')",
                    now,
                    queue_id,
                )
            )

        result: int = await self._write(op)
        return result

    async def release(self, queue_id: str, now: float) -> int:
        async def op(conn: Conn) -> int:
            return _rowcount(
                await conn.execute(
                    "UPDATE records SET"
                    f" state = CASE WHEN {_IN_FLIGHT} THEN 'leased'"
                    "  WHEN attempts > 0 THEN 'deferred' ELSE 'pending' END,"
                    f" next_try = CASE WHEN {_IN_FLIGHT} THEN next_try ELSE $1 END,"
                    f" lease_owner = CASE WHEN {_IN_FLIGHT} THEN lease_owner END,"
                    f" lease_expires = CASE WHEN {_IN_FLIGHT} THEN lease_expires END,"
                    # (every CASE reads the row as it was before this UPDATE)
                    f" lease_token = CASE WHEN {_IN_FLIGHT} THEN lease_token END,"
                    " updated_at = $1"
                    " WHERE queue_id = $2 AND state = 'held'",
                    now,
                    queue_id,
                )
            )

        result: int = await self._write(op)
        return result

    async def delete(self, queue_id: str) -> bool:
        async def op(conn: Conn) -> bool:
            status = await conn.execute("DELETE FROM messages WHERE queue_id = $1", queue_id)
            return _rowcount(status) > 0

        result: bool = await self._write(op)
        return result

    async def postpone_domain(
        self,
        domain: str,
        now: float,
        until: float,
        *,
        spread: float,
        expire_before: float,
        reply: Reply,
        limit: int,
    ) -> int:
        args = (domain, now, until, spread, expire_before, encode_reply(reply), limit)

        async def op(conn: Conn) -> int:
            return await postgres_postpone(conn, *args)

        result: int = await self._write(op, durable=False)  # lost: the records are tried
        return result

    async def flush(self, now: float, queue_id: str | None = None) -> int:
        async def op(conn: Conn) -> int:
            return _rowcount(
                await conn.execute(
                    "UPDATE records SET next_try = LEAST(next_try, $1), updated_at = $1"
                    " WHERE state = 'deferred' AND ($2::text IS NULL OR queue_id = $2)",
                    now,
                    queue_id,
                )
            )

        result: int = await self._write(op)
        return result

    async def fail_held(self, queue_id: str, reply: Reply, now: float) -> list[DeliveryRecord]:
        async def op(conn: Conn) -> list[DeliveryRecord]:
            rows = await conn.fetch(
                "UPDATE records SET state = 'failed', last_reply = $3, next_try = $1,"
                " lease_token = NULL, lease_owner = NULL, lease_expires = NULL, updated_at = $1"
                f" WHERE queue_id = $2 AND state = 'held' AND NOT {_IN_FLIGHT}"
                f" RETURNING {_RECORD_COLUMNS}",
                now,
                queue_id,
                encode_reply(reply),
            )
            if not rows:
                return []
            unfinished = await conn.fetchval(
                "SELECT 1 FROM records WHERE queue_id = $1"
                " AND state NOT IN ('delivered', 'failed') LIMIT 1",
                queue_id,
            )
            if unfinished is None:
                await conn.execute("DELETE FROM messages WHERE queue_id = $1", queue_id)
            return sorted(map(record_from_row, rows), key=lambda r: r.record_id)

        result: list[DeliveryRecord] = await self._write(op)
        return result

    async def add_events(self, events: Sequence[QueueEvent]) -> None:
        if not events:
            return
        columns = (
            [e.queue_id for e in events],
            [e.at for e in events],
            [e.event for e in events],
            [json.dumps(dict(e.fields), default=str) for e in events],
        )

        async def op(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO events (queue_id, at, event, fields)"
                " SELECT * FROM unnest($1::text[], $2::float8[], $3::text[], $4::text[])",
                *columns,
            )

        await self._write(op, durable=False)

    async def prune_events(self, before: float) -> int:
        async def op(conn: Conn) -> int:
            return _rowcount(await conn.execute("DELETE FROM events WHERE at < $1", before))

        result: int = await self._write(op, durable=False)
        return result

    # ------------------------------------------------------------ reads

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        pool = await self._ready()
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                return await fn(conn)
        except CONNECTION_ERRORS as e:
            self._db.lost_connection(e)
            raise StoreError(f"queue read failed (database connection lost): {e}") from e
        except asyncpg.PostgresError as e:
            raise StoreError(f"queue read failed: {e}") from e

    async def next_due(self) -> float | None:
        """The earliest due time of a pending/deferred record or lease expiry."""

        async def fn(conn: Conn) -> float | None:
            row = await conn.fetchrow(
                "SELECT (SELECT min(next_try) FROM records"
                "        WHERE state IN ('pending', 'deferred')),"
                "       (SELECT min(lease_expires) FROM records WHERE state = 'leased')"
            )
            assert row is not None
            candidates = [t for t in (row[0], row[1]) if t is not None]
            return float(min(candidates)) if candidates else None

        return await self._read(fn)

    async def read_body(self, queue_id: str) -> AsyncIterator[bytes]:
        """Yield the body in chunks; raises KeyError (at the first chunk) if unknown.

        Each chunk is its own short query: no transaction stays open while a slow
        peer takes the data. If the message is deleted while it is read, the next
        chunk raises ``StoreError`` (never a truncated body).
        """

        async def first(conn: Conn) -> tuple[list[int], bytes | None] | None:
            if await conn.fetchval("SELECT 1 FROM messages WHERE queue_id = $1", queue_id) is None:
                return None
            seqs = [
                r[0]
                for r in await conn.fetch(
                    "SELECT seq FROM bodies WHERE queue_id = $1 ORDER BY seq", queue_id
                )
            ]
            if not seqs:
                return seqs, None
            data = await conn.fetchval(
                "SELECT data FROM bodies WHERE queue_id = $1 AND seq = $2", queue_id, seqs[0]
            )
            return seqs, data

        def chunk(seq: int) -> Callable[[Conn], Awaitable[bytes | None]]:
            async def fn(conn: Conn) -> bytes | None:
                data = await conn.fetchval(
                    "SELECT data FROM bodies WHERE queue_id = $1 AND seq = $2", queue_id, seq
                )
                return None if data is None else bytes(data)

            return fn

        found = await self._read(first)
        if found is None:
            raise KeyError(queue_id)
        seqs, data = found
        if data is not None:
            yield bytes(data)
        for seq in seqs[1:]:
            piece = await self._read(chunk(seq))
            if piece is None:
                raise StoreError(f"message {queue_id} was deleted while its body was read")
            yield piece

    async def get_message(self, queue_id: str) -> MessageInfo | None:
        async def fn(conn: Conn) -> MessageInfo | None:
            row = await conn.fetchrow(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE queue_id = $1", queue_id
            )
            if row is None:
                return None
            records = await conn.fetch(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE queue_id = $1 ORDER BY record_id",
                queue_id,
            )
            return message_from_row(row, map(record_from_row, records))

        return await self._read(fn)

    async def list_messages(
        self, state: DeliveryState | None = None, limit: int = 1000
    ) -> list[MessageInfo]:
        """Messages in queue id order (= arrival order), those with a record in ``state``."""

        async def fn(conn: Conn) -> list[MessageInfo]:
            where = ""
            params: list[Any] = [max(limit, 0)]
            if state is not None:
                where = (
                    " WHERE EXISTS (SELECT 1 FROM records r"
                    " WHERE r.queue_id = m.queue_id AND r.state = $2)"
                )
                params.append(state.value)
            rows = await conn.fetch(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m{where}"
                ' ORDER BY queue_id COLLATE "C" LIMIT $1',
                *params,
            )
            if not rows:
                return []
            by_message: dict[str, list[DeliveryRecord]] = {row[0]: [] for row in rows}
            for rec in await conn.fetch(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE queue_id = ANY($1)"
                " ORDER BY record_id",
                list(by_message),
            ):
                by_message[rec[1]].append(record_from_row(rec))
            return [message_from_row(row, by_message[row[0]]) for row in rows]

        return await self._read(fn)

    async def events(self, queue_id: str, limit: int = 500) -> list[QueueEvent]:
        async def fn(conn: Conn) -> list[QueueEvent]:
            rows = await conn.fetch(
                "SELECT queue_id, at, event, fields FROM events WHERE queue_id = $1"
                " ORDER BY at DESC, event_id DESC LIMIT $2",
                queue_id,
                max(limit, 0),
            )
            return [QueueEvent(r[0], r[1], r[2], json.loads(r[3])) for r in reversed(rows)]

        return await self._read(fn)

    async def event_counts(self, since: float, bucket: float) -> list[EventCount]:
        if bucket <= 0:
            raise ValueError("bucket must be positive")

        async def fn(conn: Conn) -> list[EventCount]:
            rows = await conn.fetch(
                "SELECT floor((at - $1) / $2)::bigint AS k, event, count(*) FROM events"
                " WHERE at >= $1 GROUP BY k, event ORDER BY k, event",
                since,
                bucket,
            )
            return [EventCount(since + k * bucket, event, n) for k, event, n in rows]

        return await self._read(fn)

    async def count_by_state(self) -> dict[str, int]:
        async def fn(conn: Conn) -> dict[str, int]:
            counts = {s.value: 0 for s in DeliveryState}
            for state, count in await conn.fetch(
                "SELECT state, count(*) FROM records GROUP BY state"
            ):
                counts[state] = count
            return counts

        return await self._read(fn)

    async def shape(self, now: float, buckets_minutes: Sequence[float]) -> QueueShape:
        async def fn(conn: Conn) -> QueueShape:
            return await postgres_shape(conn, now, buckets_minutes)

        return await self._read(fn)

    # MTA-STS policy cache (store.py step 6; SQL in sts_cache.py)
    async def sts_policy(self, domain: str) -> CachedPolicy | None:
        return await self._read(lambda conn: sts_cache.pg_get(conn, domain))

    async def save_sts_policy(self, entry: CachedPolicy) -> None:
        # A cache: a row lost in a crash is fetched again, so no durable wait.
        await self._write(lambda conn: sts_cache.pg_put(conn, entry), durable=False)

    async def sts_policies(self) -> list[CachedPolicy]:
        return await self._read(sts_cache.pg_all)


def _rowcount(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3`` or ``DELETE 1``."""
    return int(status.rsplit(" ", 1)[-1])


async def _release(conn: Conn, owners: list[str], now: float) -> int:
    """Hand the leased records of ``owners`` back; how many."""
    status = await conn.execute(
        "UPDATE records SET"
        " state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'pending' END,"
        " lease_token = NULL, lease_owner = NULL, lease_expires = NULL, updated_at = $1"
        " WHERE state = 'leased' AND lease_owner = ANY($2)",
        now,
        owners,
    )
    # Held records keep a lease only while their delivery is in flight; it is not.
    await conn.execute(
        "UPDATE records SET lease_token = NULL, lease_owner = NULL, lease_expires = NULL"
        " WHERE state = 'held' AND lease_owner = ANY($1)",
        owners,
    )
    return _rowcount(status)
