"""The embedded queue store: one SQLite file, WAL mode, group commit.

Design note
-----------
**Durability.** The database runs in WAL mode with ``synchronous=FULL``: every COMMIT
appends to the write-ahead log and fsyncs it, so when ``commit()`` returns the message
survives ``kill -9`` and power loss (DESIGN principle 3, "250 means durable").

**Three files.** ``sqlite_schema.py``: schema, migrations, connections; ``sqlite_writer.py``:
the group-commit writer thread; this file: the queries (writer operations or reads).

**Group commit** (``sqlite_writer.py``). One dedicated writer thread owns the only
write connection and runs every operation that arrived while it was busy inside ONE
transaction, so concurrent callers share one fsync; each operation has its own
SAVEPOINT, so one that raises fails only its own caller. Fewer statements matter
beyond their own cost: every SQLite call releases the GIL, and winning it back from
a busy event loop can take a switch interval (5 ms).

**Bodies live inside SQLite**, as rows of ``bodies(queue_id, seq, data)`` of
up to 256 KiB, copied from ``NewMessage.body`` by the writer thread. The
alternative, one spool file per message (write tmp, fsync, rename, fsync the
directory), costs two extra fsyncs *per message* that no batching can share,
while an in-database body rides on the batch's single WAL fsync. Measured on
the 2-core VM with 4 KiB bodies: spool files *alone* top out at 1,400-3,000 bodies/s
(20 threads, before any commit), in-database commits reach 10,000-13,000 messages/s
(``bench/store_bench.py``, 20 committers, ~1.1 fsyncs per batch of 10-14). The price
is a bigger WAL and a file that does not shrink (freed pages are reused): fine for a queue.

**Readers** use a small pool of separate read connections (WAL lets readers run beside
the writer and see only committed data), on a dedicated two-thread executor. ``read_body``
reads chunk by chunk, each in its own short read, so a slow delivery never pins a WAL
snapshot (which would stop checkpoints and let the WAL grow without bound).

**Several processes** may open the same file (``postillon queue hold`` while
the server runs): every connection waits up to ``BUSY_TIMEOUT`` for the write
lock, and schema creation is an idempotent ``BEGIN IMMEDIATE`` transaction
guarded by ``PRAGMA user_version``, so two processes opening a new file at once
agree on one schema. From synchronous code use the same API through
``asyncio.run(...)``.

**Claiming** (``claims.py``) seeks ``records(priority DESC, next_try) WHERE state IN
('pending', 'deferred')`` once per distinct priority, never walking the records that
are not due yet; ``records(lease_expires) WHERE state = 'leased'`` finds expired
leases. Priority first: see core/priority.py.

**Leases and holds.** A claimed record is LEASED with a fresh random token;
``record_outcomes`` applies an outcome only when the token still matches
(fencing). ``hold`` also holds LEASED records but keeps their lease, so the
delivery in flight still lands: a final outcome is recorded as usual, a
deferral leaves the record HELD. ``release`` puts a record whose lease is still
running back to LEASED (its delivery is still in flight) and every other
held record back to PENDING/DEFERRED, due now.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

from postillon.core.reply import Reply
from postillon.core.sts import CachedPolicy
from postillon.queue import acme_state, policy_state, sts_cache
from postillon.queue.claims import records_by_id, sqlite_claim_due
from postillon.queue.codec import encode_reply, message_from_row, record_from_row
from postillon.queue.postpone import sqlite_postpone
from postillon.queue.queue_shape import QueueShape, sqlite_shape
from postillon.queue.shaping_state import SqliteShapingState
from postillon.queue.sqlite_schema import (
    BUSY_TIMEOUT,
    MESSAGE_COLUMNS,
    RECORD_COLUMNS,
    SCHEMA_VERSION,
    ReadPool,
    init_database,
)
from postillon.queue.sqlite_writer import CHUNK_SIZE, Commit, GroupCommitWriter
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
from postillon.queue.tls_reports import SqliteTlsReports
from postillon.queue.traces import SqliteTraces

__all__ = ["BUSY_TIMEOUT", "CHUNK_SIZE", "SCHEMA_VERSION", "SqliteStore"]

T = TypeVar("T")

_READ_THREADS: Final = 2
_PENDING = DeliveryState.PENDING.value
_LEASED = DeliveryState.LEASED.value
_DEFERRED = DeliveryState.DEFERRED.value
_HELD = DeliveryState.HELD.value
_OUTCOME_STATES = frozenset({DeliveryState.DELIVERED, DeliveryState.DEFERRED, DeliveryState.FAILED})

# A record that is HELD but still carries a running lease has a delivery in flight.
_IN_FLIGHT: Final = "(lease_token IS NOT NULL AND lease_expires > :now)"


class SqliteStore:
    """The embedded ``QueueStore`` (see the module docstring)."""

    def __init__(self, path: Path | str, *, clock_now: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._now = clock_now
        init_database(self._path)
        self._reads = ReadPool(self._path)
        self._read_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=_READ_THREADS, thread_name_prefix="postillon-store-read"
        )
        self._writer = GroupCommitWriter(self._path)
        self._write = self._writer.submit
        self.tls_reports = SqliteTlsReports(self._read, self._writer.submit_lazy)  # step 7
        self.acme = acme_state.SqliteAcmeState(self._read, self._write)  # step 8 (durable)
        self.traces = SqliteTraces(self._read, self._writer.submit_lazy)  # step 9
        self.policy_state = policy_state.SqlitePolicyState(self._read, self._writer.submit_lazy)
        self.shaping = SqliteShapingState(self._read, self._writer.submit_lazy)  # step 11

    @property
    def path(self) -> Path:
        return self._path

    def stats(self) -> dict[str, int]:
        """Group-commit counters: batches (= COMMITs = WAL fsyncs), ops, failures."""
        return self._writer.stats()

    # ------------------------------------------------------------ plumbing
    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer.closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_executor, self._reads.run, fn)

    # ------------------------------------------------------------ writes

    async def commit(self, message: NewMessage) -> None:
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        prepared = Commit(message, self._now())
        await self._write(prepared.insert, prepared)

    async def claim_due(
        self, now: float, limit: int, lease_seconds: float, owner: str
    ) -> list[DeliveryRecord]:
        if limit <= 0:
            return []
        expires = now + lease_seconds

        def op(conn: sqlite3.Connection) -> list[DeliveryRecord]:
            return sqlite_claim_due(conn, now, limit, expires, owner)

        return await self._write(op, durable=False)

    async def record_outcomes(self, updates: Sequence[OutcomeUpdate]) -> list[str]:
        for u in updates:
            if u.state not in _OUTCOME_STATES:
                raise ValueError(f"not an outcome state: {u.state}")
        if not updates:
            return []

        def op(conn: sqlite3.Connection) -> list[str]:
            touched: set[str] = set()
            for u in updates:
                row = conn.execute(
                    "SELECT queue_id, state FROM records WHERE record_id = ? AND lease_token = ?",
                    (u.record_id, u.lease_token),
                ).fetchone()
                if row is None:  # fenced: re-leased, released or deleted meanwhile
                    continue
                queue_id, state = row
                if state == _LEASED or (state == _HELD and u.state.is_final):
                    new_state = u.state.value
                elif state == _HELD:  # a deferral of a delivery that was in flight at hold
                    new_state = _HELD
                else:
                    continue
                if not u.attempted:
                    conn.execute(
                        "UPDATE records SET state = ?, next_try = ?, lease_token = NULL,"
                        " lease_owner = NULL, lease_expires = NULL, updated_at = ?"
                        " WHERE record_id = ?",
                        (new_state, u.next_try, u.now, u.record_id),
                    )
                    touched.add(queue_id)
                    continue
                conn.execute(
                    "UPDATE records SET state = ?, attempts = attempts + 1, next_try = ?,"
                    " priority = MAX(priority, 1),"  # a retry: ahead of bulk (priority.py)
                    " last_reply = ?, lease_token = NULL, lease_owner = NULL,"
                    " lease_expires = NULL, updated_at = ? WHERE record_id = ?",
                    (
                        new_state,
                        u.next_try if u.state is DeliveryState.DEFERRED else u.now,
                        encode_reply(u.reply),
                        u.now,
                        u.record_id,
                    ),
                )
                touched.add(queue_id)
            completed = []
            for queue_id in sorted(touched):
                unfinished = conn.execute(
                    "SELECT 1 FROM records WHERE queue_id = ?"
                    " AND state NOT IN ('delivered', 'failed') LIMIT 1",
                    (queue_id,),
                ).fetchone()
                if unfinished is None:
                    _delete_message(conn, queue_id)
                    completed.append(queue_id)
            return completed

        return await self._write(op, durable=False)

    async def release_leases(self, owner: str) -> int:
        now = self._now()

        def op(conn: sqlite3.Connection) -> int:
            return _release(conn, owner, now)

        return await self._write(op, durable=False)

    async def heartbeat(self, owner: str, now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO nodes (owner, heartbeat) VALUES (?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET heartbeat = excluded.heartbeat",
                (owner, now),
            )

        await self._write(op, durable=False)

    async def release_dead_owners(self, now: float, timeout: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            dead = [
                row[0]
                for row in conn.execute(
                    "DELETE FROM nodes WHERE heartbeat < ? RETURNING owner", (now - timeout,)
                )
            ]
            return sum(_release(conn, owner, now) for owner in dead)

        return await self._write(op, durable=False)

    async def hold(self, queue_id: str, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute(
                    "UPDATE records SET state = 'held', updated_at = ?"
                    " WHERE queue_id = ? AND state IN ('pending', 'deferred', 'leased')",
                    (now, queue_id),
                ).rowcount
            )

        return await self._write(op)

    async def release(self, queue_id: str, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(
                conn.execute(
                    "UPDATE records SET"
                    f" state = CASE WHEN {_IN_FLIGHT} THEN '{_LEASED}'"
                    f"  WHEN attempts > 0 THEN '{_DEFERRED}' ELSE '{_PENDING}' END,"
                    f" next_try = CASE WHEN {_IN_FLIGHT} THEN next_try ELSE :now END,"
                    f" lease_owner = CASE WHEN {_IN_FLIGHT} THEN lease_owner END,"
                    f" lease_expires = CASE WHEN {_IN_FLIGHT} THEN lease_expires END,"
                    # (every CASE reads the row as it was before this UPDATE)
                    f" lease_token = CASE WHEN {_IN_FLIGHT} THEN lease_token END,"
                    " updated_at = :now"
                    " WHERE queue_id = :queue_id AND state = 'held'",
                    {"now": now, "queue_id": queue_id},
                ).rowcount
            )

        return await self._write(op)

    async def delete(self, queue_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return _delete_message(conn, queue_id)

        return await self._write(op)

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
        return await self._write(lambda conn: sqlite_postpone(conn, *args))

    async def flush(self, now: float, queue_id: str | None = None) -> int:
        def op(conn: sqlite3.Connection) -> int:
            if queue_id is not None:
                return int(
                    conn.execute(
                        "UPDATE records SET next_try = MIN(next_try, ?), updated_at = ?"
                        " WHERE queue_id = ? AND state = 'deferred'",
                        (now, now, queue_id),
                    ).rowcount
                )
            return int(
                conn.execute(
                    "UPDATE records SET next_try = MIN(next_try, ?), updated_at = ?"
                    " WHERE state = 'deferred'",
                    (now, now),
                ).rowcount
            )

        return await self._write(op)

    async def fail_held(self, queue_id: str, reply: Reply, now: float) -> list[DeliveryRecord]:
        def op(conn: sqlite3.Connection) -> list[DeliveryRecord]:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT record_id FROM records WHERE queue_id = :queue_id"
                    f" AND state = 'held' AND NOT {_IN_FLIGHT} ORDER BY record_id",
                    {"queue_id": queue_id, "now": now},
                )
            ]
            if not ids:
                return []
            conn.executemany(
                "UPDATE records SET state = 'failed', last_reply = ?, next_try = ?,"
                " lease_token = NULL, lease_owner = NULL, lease_expires = NULL, updated_at = ?"
                " WHERE record_id = ?",
                [(encode_reply(reply), now, now, rid) for rid in ids],
            )
            failed = records_by_id(conn, ids)
            unfinished = conn.execute(
                "SELECT 1 FROM records WHERE queue_id = ?"
                " AND state NOT IN ('delivered', 'failed') LIMIT 1",
                (queue_id,),
            ).fetchone()
            if unfinished is None:
                _delete_message(conn, queue_id)
            return failed

        return await self._write(op)

    async def add_events(self, events: Sequence[QueueEvent]) -> None:
        if not events:
            return
        batch = list(events)

        def op(conn: sqlite3.Connection) -> None:
            # Encoded here, in the writer thread: the event loop only hands the batch over.
            rows = [
                (e.queue_id, e.at, e.event, json.dumps(dict(e.fields), default=str)) for e in batch
            ]
            conn.executemany(
                "INSERT INTO events (queue_id, at, event, fields) VALUES (?, ?, ?, ?)", rows
            )

        await self._write(op, durable=False)

    async def prune_events(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute("DELETE FROM events WHERE at < ?", (before,)).rowcount)

        return await self._write(op, durable=False)

    # ------------------------------------------------------------ reads

    async def next_due(self) -> float | None:
        """The earliest due time of a pending/deferred record or lease expiry."""

        def fn(conn: sqlite3.Connection) -> float | None:
            (due,) = conn.execute(
                "SELECT MIN(next_try) FROM records WHERE state IN ('pending', 'deferred')"
            ).fetchone()
            (lease,) = conn.execute(
                "SELECT MIN(lease_expires) FROM records WHERE state = 'leased'"
            ).fetchone()
            candidates = [t for t in (due, lease) if t is not None]
            return float(min(candidates)) if candidates else None

        return await self._read(fn)

    async def read_body(self, queue_id: str) -> AsyncIterator[bytes]:
        """Yield the body in chunks; raises KeyError (at the first chunk) if unknown.

        Each chunk is one short read on the reader threads. No read transaction
        (and no connection) is held between chunks: a delivery to a slow peer
        can take minutes, and a reader pinning its WAL snapshot that long would
        stop checkpoints from recycling the WAL, which then grows without bound.
        Bodies are immutable, so chunk-by-chunk reads are consistent; if the
        message is deleted meanwhile, the next chunk raises ``StoreError``
        (never a silently truncated body).
        """

        def first(conn: sqlite3.Connection) -> tuple[list[int], bytes | None]:
            known = conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,))
            if known.fetchone() is None:
                raise KeyError(queue_id)
            seqs = [
                row[0]
                for row in conn.execute(
                    "SELECT seq FROM bodies WHERE queue_id = ? ORDER BY seq", (queue_id,)
                )
            ]
            if not seqs:
                return seqs, None
            row = conn.execute(
                "SELECT data FROM bodies WHERE queue_id = ? AND seq = ?", (queue_id, seqs[0])
            ).fetchone()
            return seqs, row[0]

        def chunk(seq: int) -> Callable[[sqlite3.Connection], bytes | None]:
            def fn(conn: sqlite3.Connection) -> bytes | None:
                row = conn.execute(
                    "SELECT data FROM bodies WHERE queue_id = ? AND seq = ?", (queue_id, seq)
                ).fetchone()
                return None if row is None else bytes(row[0])

            return fn

        seqs, data = await self._read(first)
        if data is not None:
            yield data
        for seq in seqs[1:]:
            data = await self._read(chunk(seq))
            if data is None:
                raise StoreError(f"message {queue_id} was deleted while its body was read")
            yield data

    async def get_message(self, queue_id: str) -> MessageInfo | None:
        def fn(conn: sqlite3.Connection) -> MessageInfo | None:
            row = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                return None
            records = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM records WHERE queue_id = ? ORDER BY record_id",
                (queue_id,),
            )
            return message_from_row(row, map(record_from_row, records))

        return await self._read(fn)

    async def list_messages(
        self, state: DeliveryState | None = None, limit: int = 1000
    ) -> list[MessageInfo]:
        """Messages in queue id order (= arrival order), those with a record in ``state``."""

        def fn(conn: sqlite3.Connection) -> list[MessageInfo]:
            where = ""
            params: tuple[str, ...] = ()
            if state is not None:
                where = (
                    " WHERE EXISTS (SELECT 1 FROM records r"
                    " WHERE r.queue_id = m.queue_id AND r.state = ?)"
                )
                params = (state.value,)
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages m{where} ORDER BY queue_id LIMIT ?",
                (*params, max(limit, 0)),
            ).fetchall()
            if not rows:
                return []
            by_message: dict[str, list[DeliveryRecord]] = {row[0]: [] for row in rows}
            ids = list(by_message)
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                marks = ", ".join("?" * len(part))
                for rec in conn.execute(
                    f"SELECT {RECORD_COLUMNS} FROM records WHERE queue_id IN ({marks})"
                    " ORDER BY record_id",
                    part,
                ):
                    by_message[rec[1]].append(record_from_row(rec))
            return [message_from_row(row, by_message[row[0]]) for row in rows]

        return await self._read(fn)

    async def events(self, queue_id: str, limit: int = 500) -> list[QueueEvent]:
        def fn(conn: sqlite3.Connection) -> list[QueueEvent]:
            rows = conn.execute(
                "SELECT queue_id, at, event, fields FROM events WHERE queue_id = ?"
                " ORDER BY at DESC, event_id DESC LIMIT ?",
                (queue_id, max(limit, 0)),
            ).fetchall()
            return [QueueEvent(r[0], r[1], r[2], json.loads(r[3])) for r in reversed(rows)]

        return await self._read(fn)

    async def event_counts(self, since: float, bucket: float) -> list[EventCount]:
        if bucket <= 0:
            raise ValueError("bucket must be positive")

        def fn(conn: sqlite3.Connection) -> list[EventCount]:
            rows = conn.execute(
                "SELECT CAST((at - :since) / :bucket AS INTEGER) AS k, event, COUNT(*)"
                " FROM events WHERE at >= :since GROUP BY k, event ORDER BY k, event",
                {"since": since, "bucket": bucket},
            )
            return [EventCount(since + k * bucket, event, n) for k, event, n in rows]

        return await self._read(fn)

    async def count_by_state(self) -> dict[str, int]:
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT state, COUNT(*) FROM records GROUP BY state")
            return {s.value: 0 for s in DeliveryState} | dict(rows.fetchall())

        return await self._read(fn)

    async def shape(self, now: float, buckets_minutes: Sequence[float]) -> QueueShape:
        return await self._read(lambda conn: sqlite_shape(conn, now, buckets_minutes))

    async def sts_policy(self, domain: str) -> CachedPolicy | None:  # store.py step 6
        return await self._read(lambda conn: sts_cache.sqlite_get(conn, domain))

    async def save_sts_policy(self, entry: CachedPolicy) -> None:
        await self._write(lambda conn: sts_cache.sqlite_put(conn, entry))

    async def sts_policies(self) -> list[CachedPolicy]:
        return await self._read(sts_cache.sqlite_all)

    # ------------------------------------------------------------ lifecycle

    def health(self) -> StoreHealth:
        """Unhealthy for good once the writer thread is gone: nothing restarts it
        (a restart of the process does, with the same file)."""
        problem = self._writer.problem()
        if problem is not None:
            return StoreHealth(False, problem, recoverable=False)
        return HEALTHY

    async def close(self) -> None:
        """Finish every operation already submitted, then stop the writer and readers."""
        if not await self._writer.close():
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._read_executor.shutdown, True)
        self._reads.close()


def _delete_message(conn: sqlite3.Connection, queue_id: str) -> bool:
    conn.execute("DELETE FROM bodies WHERE queue_id = ?", (queue_id,))
    conn.execute("DELETE FROM records WHERE queue_id = ?", (queue_id,))
    return bool(conn.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,)).rowcount)


def _release(conn: sqlite3.Connection, owner: str, now: float) -> int:
    """Hand ``owner``'s leased records back; how many."""
    count = conn.execute(
        "UPDATE records SET"
        f" state = CASE WHEN attempts > 0 THEN '{_DEFERRED}' ELSE '{_PENDING}' END,"
        " lease_token = NULL, lease_owner = NULL, lease_expires = NULL, updated_at = ?"
        " WHERE state = 'leased' AND lease_owner = ?",
        (now, owner),
    ).rowcount
    # Held records keep a lease only while their delivery is in flight; it is not.
    conn.execute(
        "UPDATE records SET lease_token = NULL, lease_owner = NULL, lease_expires = NULL"
        " WHERE state = 'held' AND lease_owner = ?",
        (owner,),
    )
    return int(count)
