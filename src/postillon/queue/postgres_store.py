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

**Group commit.** Writes do not each take their own transaction. A caller hands its
operation to an inbox and awaits a future; a writer task takes everything that arrived
while the previous batch was being committed and runs it inside ONE transaction, so N
concurrent SMTP sessions pay one COMMIT (one WAL flush at the server) between them. The
commits of a batch go in as three statements (messages, records, bodies as
``unnest()`` arrays) inside one savepoint, and the outcomes of a batch as one UPDATE;
if that fails (a duplicate queue id), they are retried one savepoint each so the bad
one fails alone. Every other operation (claims, operator commands) runs in its own
savepoint (none when it is alone in its batch): one that raises fails only its own
caller. Each statement is a round trip to the server, and under load those, not the
server's work, decide the throughput. If the COMMIT fails, or the connection is lost,
every caller of the batch gets a ``StoreError`` and nothing of the batch is visible.
Writes go in two lanes, each with ``WRITERS`` writer task(s) (default one: on a small
machine that makes the biggest batches): message commits in one, everything else
(claims, outcomes, operator commands, history) in the other, so a ``250`` never waits
behind the runner's bookkeeping (measured: a lone message's DATA → 250 went from
12 ms to 3 ms when the two shared one lane).
A deadlock between two batches (PostgreSQL aborts one) re-runs the aborted batch.

**Durability of bookkeeping.** A batch that commits a message or runs an operator
command (hold, release, delete, flush, bounce) waits for its WAL flush
(``synchronous_commit = on``: the 250 depends on it). A batch of only claims, outcomes,
released leases and history events commits with ``synchronous_commit = off``: it returns without
waiting for the flush, which the next message commit (or the WAL writer, within
``wal_writer_delay``) does anyway. If the database server crashes in between, the last
few outcomes or claims are lost, so a delivery is repeated (a duplicate, SMTP's
at-least-once) but never lost; this halves the fsyncs per relayed message. Fencing does
not depend on it: tokens are checked inside the database either way.

**Large bodies stream.** A message over ``_BULK_BODY_LIMIT`` does not join a batch: it
is written in its own transaction, chunk by chunk, read from the spool file in a thread,
so neither its size nor its upload time holds up the small messages' group commit.

**Work sharing.** ``claim_due`` selects expired leases first, then due records in
``next_try`` order, with ``FOR UPDATE SKIP LOCKED``: nodes claiming at the same moment
never wait for each other and never get the same record. Each claimed record gets a
fresh random lease token; ``record_outcomes`` applies an outcome only while the token
still matches (fencing), in one set-based UPDATE, so a node that comes back after its
lease expired cannot record a stale outcome over the newer holder's.

**Bodies stream.** ``read_body`` is an async generator: each chunk is one query on the
pool, like the SQLite store's one short read per chunk; no transaction stays open while
a slow peer takes the data.

**Health.** ``available`` turns False as soon as an operation loses its database
connection (or a periodic ``SELECT 1`` fails) and True again when the probe succeeds.
Listeners consult it: a node without its database answers ``421 4.3.0`` instead of
accepting mail it could not commit (never a 250 it cannot keep). After a connection
error the pool's connections are all replaced, so no dead socket is handed out after
the database comes back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import IO, Any, Final, TypeAlias, TypeVar

import asyncpg

from postillon.core.reply import Reply
from postillon.queue.codec import (
    encode_mail_params,
    encode_reply,
    message_from_row,
    record_from_row,
    record_rows,
)
from postillon.queue.postgres_schema import check_schema, migrate
from postillon.queue.store import (
    DeliveryRecord,
    DeliveryState,
    EventCount,
    MessageInfo,
    NewMessage,
    OutcomeUpdate,
    QueueEvent,
    StoreError,
)

__all__ = ["CHUNK_SIZE", "WRITERS", "PostgresStore"]

T = TypeVar("T")

log = logging.getLogger(__name__)

CHUNK_SIZE: Final = 256 * 1024  # body bytes per row (as in SQLite)
WRITERS: Final = 1  # batches in flight at once (one gives the biggest batches)
_BULK_BODY_LIMIT: Final = 1024 * 1024  # bodies up to this join a group commit
_MAX_BATCH: Final = 500  # operations per transaction
_DEADLOCK_RETRIES: Final = 5
_HEALTH_INTERVAL: Final = 1.0
_HEALTH_TIMEOUT: Final = 2.0
_CONNECT_TIMEOUT: Final = 5.0
# No wait on the database is unbounded: a connection that went half-dead while
# the server restarted must fail its operation (and be replaced), not hang it.
# The acquire timeout also bounds the release (asyncpg resets or closes the
# connection then); the command timeout bounds every statement.
_ACQUIRE_TIMEOUT: Final = 10.0
_COMMAND_TIMEOUT: Final = 30.0
_OUTCOME_STATES: Final = frozenset(
    {DeliveryState.DELIVERED, DeliveryState.DEFERRED, DeliveryState.FAILED}
)

_RECORD_COLUMNS: Final = (
    "record_id, queue_id, recipient, original_recipient, rcpt_params, state, attempts,"
    " next_try, last_reply, lease_token, lease_owner, lease_expires, updated_at"
)
_MESSAGE_COLUMNS: Final = "queue_id, sender, mail_params, size, received_at, client, source"

# Errors that mean "the database is not reachable", as opposed to a bad statement.
_CONNECTION_ERRORS: Final = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # asyncpg's own state machine gives up when the socket dies mid-operation
    # ("cannot switch to state ..."): treat it as a lost connection.
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)
_RETRY_BATCH: Final = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)

_INSERT_MESSAGES: Final = (
    f"INSERT INTO messages ({_MESSAGE_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],"
    " $5::float8[], $6::text[], $7::text[])"
)
_INSERT_RECORDS: Final = (
    "INSERT INTO records (queue_id, recipient, original_recipient, rcpt_params,"
    " state, attempts, next_try, updated_at)"
    " SELECT q, r, o, p, 'pending', 0, t, u FROM unnest($1::text[], $2::text[], $3::text[],"
    " $4::text[], $5::float8[], $6::float8[]) WITH ORDINALITY AS x(q, r, o, p, t, u, n)"
    " ORDER BY n"
)
_INSERT_BODIES: Final = (
    "INSERT INTO bodies (queue_id, seq, data)"
    " SELECT * FROM unnest($1::text[], $2::integer[], $3::bytea[])"
)
_APPLY_OUTCOMES: Final = """
WITH u AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::float8[], $5::text[],
                         $6::float8[], $7::boolean[])
        AS u(record_id, token, state, next_try, reply, now, attempted)
)
UPDATE records r SET
    state = CASE WHEN r.state = 'leased' OR u.state IN ('delivered', 'failed')
                 THEN u.state ELSE 'held' END,
    attempts = r.attempts + CASE WHEN u.attempted THEN 1 ELSE 0 END,
    next_try = CASE WHEN NOT u.attempted OR u.state = 'deferred' THEN u.next_try
                    ELSE u.now END,
    last_reply = CASE WHEN u.attempted THEN u.reply ELSE r.last_reply END,
    lease_token = NULL, lease_owner = NULL, lease_expires = NULL, updated_at = u.now
FROM u
WHERE r.record_id = u.record_id AND r.lease_token = u.token
  AND r.state IN ('leased', 'held')
RETURNING r.queue_id, r.record_id
"""
# A record that is HELD but still carries a running lease has a delivery in flight.
_IN_FLIGHT: Final = "(lease_token IS NOT NULL AND lease_expires > $1)"

Conn: TypeAlias = asyncpg.Connection
_OpFn = Callable[[Conn], Awaitable[Any]]


class _Commit:
    """One message's rows, prepared on the event loop."""

    __slots__ = ("chunks", "message", "record_rows")

    def __init__(self, message: NewMessage, updated_at: float) -> None:
        self.message = message
        self.record_rows = record_rows(message, updated_at)
        self.chunks: list[bytes] = []

    @property
    def small(self) -> bool:
        return self.message.size <= _BULK_BODY_LIMIT

    def message_row(self) -> tuple[Any, ...]:
        m = self.message
        return (
            m.queue_id,
            m.sender,
            encode_mail_params(m.mail_params),
            m.size,
            m.received_at,
            m.client,
            m.source,
        )

    def read_small_body(self) -> None:
        """Read a small body now (it is in memory or page cache: no thread hop)."""
        self.chunks = list(_read_chunks(self.message.body))


def _read_chunks(body: IO[bytes]) -> Iterator[bytes]:
    if body.seekable():
        body.seek(0)  # a retried commit must not store an empty body
    while data := body.read(CHUNK_SIZE):
        yield data


async def _insert_commits(conn: Conn, commits: Sequence[_Commit]) -> None:
    """Insert small messages with three statements, whatever their number."""
    columns: list[list[Any]] = [[] for _ in range(7)]
    for c in commits:
        for column, value in zip(columns, c.message_row(), strict=True):
            column.append(value)
    try:
        await conn.execute(_INSERT_MESSAGES, *columns)
    except asyncpg.exceptions.UniqueViolationError as e:
        ids = ", ".join(c.message.queue_id for c in commits[:3])
        raise StoreError(f"duplicate queue id ({ids}{', ...' if len(commits) > 3 else ''})") from e
    rec_columns: list[list[Any]] = [[] for _ in range(6)]
    body_columns: list[list[Any]] = [[], [], []]
    for c in commits:
        for row in c.record_rows:
            for column, value in zip(rec_columns, row, strict=True):
                column.append(value)
        for seq, data in enumerate(c.chunks):
            body_columns[0].append(c.message.queue_id)
            body_columns[1].append(seq)
            body_columns[2].append(data)
    await conn.execute(_INSERT_RECORDS, *rec_columns)
    if body_columns[0]:
        await conn.execute(_INSERT_BODIES, *body_columns)


async def _apply_outcomes(conn: Conn, groups: Sequence[Sequence[OutcomeUpdate]]) -> list[list[str]]:
    """Apply the fenced outcomes of several callers with one UPDATE; remove the messages
    now complete. Returns, per caller, the completed queue ids among its records."""
    updates = [u for group in groups for u in group]
    rows = await conn.fetch(
        _APPLY_OUTCOMES,
        [u.record_id for u in updates],
        [u.lease_token for u in updates],
        [u.state.value for u in updates],
        [u.next_try for u in updates],
        [encode_reply(u.reply) for u in updates],
        [u.now for u in updates],
        [u.attempted for u in updates],
    )
    queue_of = {row[1]: row[0] for row in rows}  # record id -> queue id, applied ones only
    touched = sorted(set(queue_of.values()))
    completed: set[str] = set()
    if touched:
        done = await conn.fetch(
            "SELECT q.queue_id FROM unnest($1::text[]) AS q(queue_id)"
            " WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.queue_id = q.queue_id"
            " AND r.state NOT IN ('delivered', 'failed'))",
            touched,
        )
        completed = {row[0] for row in done}
        if completed:
            # records and bodies go with it (ON DELETE CASCADE)
            await conn.execute("DELETE FROM messages WHERE queue_id = ANY($1)", sorted(completed))
    return [
        sorted({queue_of[u.record_id] for u in group if u.record_id in queue_of} & completed)
        for group in groups
    ]


class _Op:
    """One caller's operation: a message commit, outcomes, or any other function.

    Commits and outcomes of one batch are merged into a few set-based statements
    (every statement is a round trip to the server, and those add up under load).
    """

    __slots__ = ("commit", "durable", "fn", "future", "outcomes")

    def __init__(
        self,
        fn: _OpFn | None,
        future: asyncio.Future[Any],
        commit: _Commit | None = None,
        outcomes: Sequence[OutcomeUpdate] | None = None,
        durable: bool = True,
    ):
        self.fn = fn
        self.future = future
        self.commit = commit
        self.outcomes = outcomes
        # False: bookkeeping whose loss in a database crash only repeats a delivery.
        self.durable = durable

    async def run_alone(self, conn: Conn) -> Any:
        if self.commit is not None:
            await _insert_commits(conn, [self.commit])
            return None
        if self.outcomes is not None:
            return (await _apply_outcomes(conn, [self.outcomes]))[0]
        assert self.fn is not None
        return await self.fn(conn)


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
        health_interval: float = _HEALTH_INTERVAL,
    ) -> None:
        self._dsn = dsn
        self._now = clock_now
        self._pool_size = max(pool_size, writers + 2)
        self._writers_wanted = writers
        self._create_schema = create_schema
        self._health_interval = health_interval
        self._pool: asyncpg.Pool | None = None
        self._open_lock: asyncio.Lock | None = None
        # Two lanes: message commits (a 250 waits on them) never queue behind the
        # runner's bookkeeping, and vice versa; each lane batches on its own.
        self._inbox: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._commit_inbox: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writers: list[asyncio.Task[None]] = []
        self._health: asyncio.Task[None] | None = None
        self._expiring: asyncio.Future[None] | None = None
        self._closed = False
        self.available = True  # see "Health" in the module docstring

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> PostgresStore:
        """Connect, check (or create) the schema, start the writers. Idempotent."""
        if self._closed:
            raise StoreError("store is closed")
        if self._pool is not None:
            return self
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._pool is None:
                await self._connect()
        return self

    async def _connect(self) -> None:
        """Create the pool, check (or create) the schema, start the writers."""
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=_CONNECT_TIMEOUT,
                command_timeout=_COMMAND_TIMEOUT,
            )
        except _CONNECTION_ERRORS as e:
            self.available = False
            raise StoreError(f"cannot connect to the queue database: {e}") from e
        except (asyncpg.PostgresError, ValueError) as e:
            raise StoreError(f"cannot open the queue database ([queue] dsn): {e}") from e
        try:
            async with pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
                if self._create_schema:
                    await migrate(conn)
                await check_schema(conn)
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self.available = True
        self._writers = [
            asyncio.create_task(self._write_loop(inbox), name=f"pg-writer-{lane}-{n}")
            for lane, inbox in (("commit", self._commit_inbox), ("work", self._inbox))
            for n in range(self._writers_wanted)
        ]
        if self._health_interval > 0:
            self._health = asyncio.create_task(self._watch_health(), name="pg-health")

    async def _ready(self) -> asyncpg.Pool:
        if self._closed:
            raise StoreError("store is closed")
        if self._pool is None:
            await self.open()
        assert self._pool is not None
        return self._pool

    async def close(self) -> None:
        """Finish every operation already submitted, then close the connections."""
        if self._closed:
            return
        self._closed = True
        for _ in range(self._writers_wanted):
            self._inbox.put_nowait(None)
            self._commit_inbox.put_nowait(None)
        if self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 10)
            except (TimeoutError, *_CONNECTION_ERRORS):
                self._pool.terminate()

    # ------------------------------------------------------------ health

    def _lost_connection(self, error: BaseException) -> None:
        if self.available:
            log.warning("queue database unreachable: %s", error)
        self.available = False
        if self._pool is not None and self._expiring is None:
            # Dead sockets must not be handed out again once the server is back.
            self._expiring = asyncio.ensure_future(self._pool.expire_connections())
            self._expiring.add_done_callback(self._expired)

    def _expired(self, task: asyncio.Future[None]) -> None:
        self._expiring = None
        if not task.cancelled():
            task.exception()  # retrieved: expiring cannot really fail

    async def _probe(self) -> bool:
        assert self._pool is not None
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT):
                async with self._pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
                    await conn.fetchval("SELECT 1")
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as e:
            self._lost_connection(e)
            return False
        if not self.available:
            log.warning("queue database reachable again")
        self.available = True
        return True

    async def _watch_health(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._health_interval)
            try:
                await self._probe()
            except Exception as e:  # the watch must outlive any surprise
                log.exception("queue database health probe failed")
                self._lost_connection(e)

    # ------------------------------------------------------------ the writers

    async def _write(
        self,
        fn: _OpFn | None,
        commit: _Commit | None = None,
        outcomes: Sequence[OutcomeUpdate] | None = None,
        *,
        durable: bool = True,
    ) -> Any:
        await self._ready()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        inbox = self._commit_inbox if commit is not None else self._inbox
        inbox.put_nowait(_Op(fn, future, commit, outcomes, durable))
        return await future

    async def _write_loop(self, inbox: asyncio.Queue[_Op | None]) -> None:
        while True:
            op = await inbox.get()
            if op is None:
                return
            batch = [op]
            while len(batch) < _MAX_BATCH:
                try:
                    more = inbox.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if more is None:  # close(): finish this batch, then stop
                    inbox.put_nowait(None)
                    break
                batch.append(more)
            await self._run_batch([o for o in batch if not o.future.done()])

    async def _run_batch(self, batch: list[_Op]) -> None:
        if not batch:
            return
        pool = self._pool
        assert pool is not None
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                async with pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn, conn.transaction():
                    if not any(op.durable for op in batch):
                        # Only queue bookkeeping (claims, outcomes, operator commands):
                        # see "Durability of bookkeeping" in the module docstring.
                        await conn.execute("SET LOCAL synchronous_commit = off")
                    results = await self._apply(conn, batch)
            except _RETRY_BATCH as e:
                if attempt + 1 < _DEADLOCK_RETRIES:
                    log.info("queue batch aborted (%s); running it again", e)
                    continue
                self._fail(batch, e, "commit")
                return
            except _CONNECTION_ERRORS as e:
                self._lost_connection(e)
                self._fail(batch, e, "commit (database connection lost)")
                return
            except Exception as e:
                self._fail(batch, e, "commit")
                return
            for op, (value, error) in zip(batch, results, strict=True):
                if op.future.done():
                    continue
                if error is not None:
                    op.future.set_exception(error)
                else:
                    op.future.set_result(value)
            return

    @staticmethod
    def _fail(batch: list[_Op], cause: BaseException, stage: str) -> None:
        for op in batch:
            if not op.future.done():
                error = StoreError(f"queue {stage} failed: {cause}")
                error.__cause__ = cause
                op.future.set_exception(error)

    async def _apply(self, conn: Conn, batch: list[_Op]) -> list[tuple[Any, BaseException | None]]:
        """Run a batch's operations inside its transaction; per-op errors are kept apart."""
        if len(batch) == 1:
            # Alone in its transaction: no savepoint needed to keep its error apart.
            try:
                return [(await batch[0].run_alone(conn), None)]
            except (*_CONNECTION_ERRORS, *_RETRY_BATCH):
                raise
            except Exception as e:
                return [(None, e)]
        results: dict[int, tuple[Any, BaseException | None]] = {}
        commits = [(i, op.commit) for i, op in enumerate(batch) if op.commit is not None]
        if len(commits) > 1:
            try:
                async with conn.transaction():
                    await _insert_commits(conn, [c for _, c in commits])
            except (asyncpg.exceptions.UniqueViolationError, StoreError):
                pass  # one of them is bad: find it below, one savepoint each
            else:
                results.update((i, (None, None)) for i, _ in commits)
        outcomes = [(i, op.outcomes) for i, op in enumerate(batch) if op.outcomes is not None]
        if len(outcomes) > 1:
            try:
                async with conn.transaction():
                    completed = await _apply_outcomes(conn, [o for _, o in outcomes])
            except (*_CONNECTION_ERRORS, *_RETRY_BATCH):
                raise
            except Exception:
                pass  # run them one savepoint each below, to find the bad one
            else:
                results.update(
                    (i, (done, None)) for (i, _), done in zip(outcomes, completed, strict=True)
                )
        for i, op in enumerate(batch):
            if i in results:
                continue
            try:
                async with conn.transaction():
                    value = await op.run_alone(conn)
            except (*_CONNECTION_ERRORS, *_RETRY_BATCH):
                raise  # the whole transaction is gone
            except Exception as e:
                results[i] = (None, e)
            else:
                results[i] = (value, None)
        return [results[i] for i in range(len(batch))]

    # ------------------------------------------------------------ writes

    async def commit(self, message: NewMessage) -> None:
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        prepared = _Commit(message, self._now())
        if prepared.small:
            prepared.read_small_body()
            await self._write(None, prepared)
        else:
            await self._commit_streaming(prepared)

    async def _commit_streaming(self, prepared: _Commit) -> None:
        """A large message: its own transaction, the body uploaded chunk by chunk."""
        pool = await self._ready()
        body = prepared.message.body
        queue_id = prepared.message.queue_id
        try:
            async with pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn, conn.transaction():
                prepared.chunks = []
                await _insert_commits(conn, [prepared])  # envelope and records
                if body.seekable():
                    await asyncio.to_thread(body.seek, 0)
                seq = 0
                while data := await asyncio.to_thread(body.read, CHUNK_SIZE):
                    await conn.execute(
                        "INSERT INTO bodies (queue_id, seq, data) VALUES ($1, $2, $3)",
                        queue_id,
                        seq,
                        data,
                    )
                    seq += 1
        except StoreError:
            raise
        except _CONNECTION_ERRORS as e:
            self._lost_connection(e)
            raise StoreError(f"queue commit failed (database connection lost): {e}") from e
        except asyncpg.PostgresError as e:
            raise StoreError(f"queue commit failed: {e}") from e

    async def claim_due(
        self, now: float, limit: int, lease_seconds: float, owner: str
    ) -> list[DeliveryRecord]:
        if limit <= 0:
            return []
        expires = now + lease_seconds

        async def op(conn: Conn) -> list[DeliveryRecord]:
            ids: list[int] = [
                row[0]
                for row in await conn.fetch(
                    "SELECT record_id FROM records WHERE state = 'leased' AND lease_expires <= $1"
                    " ORDER BY lease_expires, record_id LIMIT $2 FOR UPDATE SKIP LOCKED",
                    now,
                    limit,
                )
            ]
            if len(ids) < limit:
                ids += [
                    row[0]
                    for row in await conn.fetch(
                        "SELECT record_id FROM records"
                        " WHERE state IN ('pending', 'deferred') AND next_try <= $1"
                        " ORDER BY next_try, record_id LIMIT $2 FOR UPDATE SKIP LOCKED",
                        now,
                        limit - len(ids),
                    )
                ]
            if not ids:
                return []
            tokens = [secrets.token_hex(8) for _ in ids]
            rows = await conn.fetch(
                f"UPDATE records r SET state = 'leased', lease_token = t.token,"
                f" lease_owner = $3, lease_expires = $4, updated_at = $5"
                f" FROM unnest($1::bigint[], $2::text[]) AS t(id, token)"
                f" WHERE r.record_id = t.id"
                f" RETURNING {', '.join('r.' + c for c in _RECORD_COLUMNS.split(', '))}",
                ids,
                tokens,
                owner,
                expires,
                now,
            )
            by_id = {row[0]: record_from_row(row) for row in rows}
            return [by_id[i] for i in ids]

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
            status = await conn.execute(
                "UPDATE records SET"
                " state = CASE WHEN attempts > 0 THEN 'deferred' ELSE 'pending' END,"
                " lease_token = NULL, lease_owner = NULL, lease_expires = NULL, updated_at = $1"
                " WHERE state = 'leased' AND lease_owner = $2",
                now,
                owner,
            )
            # Held records keep a lease only while their delivery is in flight; it is not.
            await conn.execute(
                "UPDATE records SET lease_token = NULL, lease_owner = NULL, lease_expires = NULL"
                " WHERE state = 'held' AND lease_owner = $1",
                owner,
            )
            return _rowcount(status)

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
            async with pool.acquire(timeout=_ACQUIRE_TIMEOUT) as conn:
                return await fn(conn)
        except _CONNECTION_ERRORS as e:
            self._lost_connection(e)
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


def _rowcount(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3`` or ``DELETE 1``."""
    return int(status.rsplit(" ", 1)[-1])
