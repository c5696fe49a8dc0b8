"""The PostgreSQL store's group-commit writers.

Design note
-----------
Writes do not each take their own transaction. A caller hands its operation to an
inbox (``submit``) and awaits a future; a writer task takes everything that arrived
while the previous batch was being committed and runs it inside ONE transaction, so
N concurrent SMTP sessions pay one COMMIT (one WAL flush at the server) between them.
The commits of a batch go in as three statements (messages, records, bodies as
``unnest()`` arrays) inside one savepoint, and the outcomes of a batch as one UPDATE;
if that fails (a duplicate queue id), they are retried one savepoint each so the bad
one fails alone. Every other operation runs in its own savepoint (none when it is
alone in its batch). If the COMMIT fails, or the connection is lost, every caller of
the batch gets a ``StoreError`` and nothing of the batch is visible. A deadlock
between two batches (PostgreSQL aborts one) re-runs the aborted batch.

Two lanes, each with ``WRITERS`` writer task(s): message commits in one, everything
else in the other, so a ``250`` never waits behind the runner's bookkeeping.
``durable=False`` marks bookkeeping (see "Durability of bookkeeping" in
``postgres_store.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import IO, Any, Final

import asyncpg

from postillon.queue.codec import encode_mail_params, encode_reply, record_rows
from postillon.queue.postgres_connection import ACQUIRE_TIMEOUT, CONNECTION_ERRORS, Conn, Database
from postillon.queue.store import NewMessage, OutcomeUpdate, StoreError

__all__ = ["CHUNK_SIZE", "WRITERS", "BatchWriter", "Commit", "OpFn"]

log = logging.getLogger("postillon.queue.postgres_store")

CHUNK_SIZE: Final = 256 * 1024  # body bytes per row (as in SQLite)
WRITERS: Final = 1  # batches in flight at once (one gives the biggest batches)
_BULK_BODY_LIMIT: Final = 1024 * 1024  # bodies up to this join a group commit
_MAX_BATCH: Final = 500  # operations per transaction
_DEADLOCK_RETRIES: Final = 5
_MESSAGE_COLUMNS: Final = "queue_id, sender, mail_params, size, received_at, client, source"

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
    " state, attempts, next_try, updated_at, priority)"
    " SELECT q, r, o, p, s, 0, t, u, y FROM unnest($1::text[], $2::text[], $3::text[],"
    " $4::text[], $5::text[], $6::float8[], $7::float8[], $8::integer[])"
    " WITH ORDINALITY AS x(q, r, o, p, s, t, u, y, n)"
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
    -- a retry goes ahead of a bulk backlog (delivery/priority.py)
    priority = CASE WHEN u.attempted THEN GREATEST(r.priority, 1) ELSE r.priority END,
    lease_token = NULL, lease_owner = NULL, lease_expires = NULL, updated_at = u.now
FROM u
WHERE r.record_id = u.record_id AND r.lease_token = u.token
  AND r.state IN ('leased', 'held')
RETURNING r.queue_id, r.record_id
"""

OpFn = Callable[[Conn], Awaitable[Any]]


class Commit:
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


async def _insert_commits(conn: Conn, commits: Sequence[Commit]) -> None:
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
    rec_columns: list[list[Any]] = [[] for _ in range(8)]
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
        fn: OpFn | None,
        future: asyncio.Future[Any],
        commit: Commit | None = None,
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


class BatchWriter:
    """The writer tasks of both lanes (see the module docstring)."""

    def __init__(self, db: Database, writers: int = WRITERS) -> None:
        self._db = db
        self._writers_wanted = writers
        # Two lanes: message commits (a 250 waits on them) never queue behind the
        # runner's bookkeeping, and vice versa; each lane batches on its own.
        self._inbox: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._commit_inbox: asyncio.Queue[_Op | None] = asyncio.Queue()
        self._writers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._writers = [
            asyncio.create_task(self._write_loop(inbox), name=f"pg-writer-{lane}-{n}")
            for lane, inbox in (("commit", self._commit_inbox), ("work", self._inbox))
            for n in range(self._writers_wanted)
        ]

    def problem(self) -> str | None:
        """Why a writer task is gone while the store is open (a bug), or None."""
        for task in self._writers:
            if task.done():
                return f"queue writer task {task.get_name()} ended"
        return None

    async def close(self) -> None:
        """Finish every operation already submitted, then stop the writer tasks."""
        for _ in range(self._writers_wanted):
            self._inbox.put_nowait(None)
            self._commit_inbox.put_nowait(None)
        if self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)

    async def submit(
        self,
        fn: OpFn | None,
        commit: Commit | None = None,
        outcomes: Sequence[OutcomeUpdate] | None = None,
        *,
        durable: bool = True,
    ) -> Any:
        """Queue one operation for the next batch of its lane; its result or error."""
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
        pool = self._db.pool
        assert pool is not None
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                    if any(op.durable for op in batch):
                        # A 250 (or an operator's command) waits on this COMMIT: it
                        # must wait for the WAL flush whatever the server's default.
                        await conn.execute(self._db.durable_statement)
                    else:
                        # Only queue bookkeeping (claims, outcomes, released leases):
                        # see "Durability of bookkeeping" in postgres_store.py.
                        await conn.execute("SET LOCAL synchronous_commit = off")
                    results = await self._apply(conn, batch)
            except _RETRY_BATCH as e:
                if attempt + 1 < _DEADLOCK_RETRIES:
                    log.info("queue batch aborted (%s); running it again", e)
                    continue
                self._fail(batch, e, "commit")
                return
            except CONNECTION_ERRORS as e:
                self._db.lost_connection(e)
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
            except (*CONNECTION_ERRORS, *_RETRY_BATCH):
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
            except (*CONNECTION_ERRORS, *_RETRY_BATCH):
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
            except (*CONNECTION_ERRORS, *_RETRY_BATCH):
                raise  # the whole transaction is gone
            except Exception as e:
                results[i] = (None, e)
            else:
                results[i] = (value, None)
        return [results[i] for i in range(len(batch))]

    async def commit_streaming(self, prepared: Commit) -> None:
        """A large message: its own transaction, the body uploaded chunk by chunk."""
        pool = await self._db.ready()
        body = prepared.message.body
        queue_id = prepared.message.queue_id
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn, conn.transaction():
                await conn.execute(self._db.durable_statement)
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
        except CONNECTION_ERRORS as e:
            self._db.lost_connection(e)
            raise StoreError(f"queue commit failed (database connection lost): {e}") from e
        except asyncpg.PostgresError as e:
            raise StoreError(f"queue commit failed: {e}") from e
