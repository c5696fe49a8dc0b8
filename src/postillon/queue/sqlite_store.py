"""The embedded queue store: one SQLite file, WAL mode, group commit.

Design note
-----------
**Durability.** The database runs in WAL mode with ``synchronous=FULL``: every
COMMIT appends to the write-ahead log and fsyncs it, so when ``commit()``
returns the message survives ``kill -9`` and power loss (DESIGN principle 3,
"250 means durable").

**Group commit.** One dedicated writer thread owns the only write connection.
Async callers hand it operations (plain callables taking the connection) and
await a future. The thread takes every operation that arrived while it was
busy, runs them all inside ONE transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``)
and so pays one fsync for the whole batch; then it resolves the callers'
futures with one ``loop.call_soon_threadsafe`` per event loop. Each operation
runs inside its own SAVEPOINT: one that raises is rolled back alone and fails
only its own caller. If the COMMIT itself fails, every caller of the batch gets
a ``StoreError`` and nothing of the batch is visible. The commits of a batch
(bodies up to 1 MiB) go in together as three multi-row INSERTs, under one
savepoint; if that fails, they are retried one savepoint each, so the bad one
is found and fails alone. Fewer statements matter beyond their own cost: every
SQLite call releases the GIL, and winning it back from a busy event loop can
take a switch interval (5 ms).

**Bodies live inside SQLite**, as rows of ``bodies(queue_id, seq, data)`` of
up to 256 KiB, copied from ``NewMessage.body`` by the writer thread. The
alternative, one spool file per message (write tmp, fsync, rename, fsync the
directory), costs two extra fsyncs *per message* that no batching can share,
while an in-database body rides on the batch's single WAL fsync. Measured on
the 2-core development VM with 4 KiB bodies: the spool files *alone* top out at
1,400-3,000 bodies/s (20 threads, before any database commit), while whole
in-database commits reach 10,000-13,000 messages/s (``bench/store_bench.py``,
20 committers, about 1.1 fsyncs per batch of 10-14; ``--spool-baseline`` times
the spool files). The price is a bigger WAL and a database file that does not
shrink (freed pages are reused); both are fine for a queue, whose contents are
transient.

**Readers** use a small pool of separate read connections (WAL lets readers
run beside the writer and see only committed data); the async read methods run
on a dedicated two-thread executor. ``read_body`` reads chunk by chunk, each in
its own short read, so a slow delivery never pins a WAL snapshot (which would
stop checkpoints and let the WAL grow without bound).

**Several processes** may open the same file (``postillon queue hold`` while
the server runs): every connection waits up to ``BUSY_TIMEOUT`` for the write
lock, and schema creation is an idempotent ``BEGIN IMMEDIATE`` transaction
guarded by ``PRAGMA user_version``, so two processes opening a new file at once
agree on one schema. From synchronous code use the same API through
``asyncio.run(...)``.

**Claiming** uses two partial indexes instead of one on ``(state, next_try)``:
``records(next_try) WHERE state IN ('pending','deferred')`` walks the due
records in ``next_try`` order without sorting (a ``(state, next_try)`` index
needs a sort to merge its two states, over the whole due backlog), and
``records(lease_expires) WHERE state = 'leased'`` finds expired leases.

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
import contextlib
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final, TypeAlias, TypeVar

from postillon.core.reply import Reply
from postillon.queue.codec import (
    encode_mail_params,
    encode_reply,
    message_from_row,
    record_from_row,
    record_rows,
)
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

__all__ = ["BUSY_TIMEOUT", "CHUNK_SIZE", "SCHEMA_VERSION", "SqliteStore"]

T = TypeVar("T")

log = logging.getLogger(__name__)

CHUNK_SIZE: Final = 256 * 1024  # body bytes per row
SCHEMA_VERSION: Final = 2  # PRAGMA user_version
BUSY_TIMEOUT: Final = 10.0  # seconds a connection waits for another writer
_READ_THREADS: Final = 2
_MAX_IDLE_READERS: Final = 4
_WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
_BULK_BODY_LIMIT: Final = 1024 * 1024  # bodies up to this join multi-row INSERTs
_MAX_VARIABLES: Final = 32_000  # SQLITE_MAX_VARIABLE_NUMBER is 32766 (since 3.32)

_PENDING = DeliveryState.PENDING.value
_LEASED = DeliveryState.LEASED.value
_DEFERRED = DeliveryState.DEFERRED.value
_HELD = DeliveryState.HELD.value
_OUTCOME_STATES = frozenset({DeliveryState.DELIVERED, DeliveryState.DEFERRED, DeliveryState.FAILED})

_SCHEMA: Final = (
    """CREATE TABLE messages (
        queue_id TEXT PRIMARY KEY,
        sender TEXT NOT NULL,
        mail_params TEXT NOT NULL,  -- JSON, defaults left out
        size INTEGER NOT NULL,
        received_at REAL NOT NULL,
        client TEXT NOT NULL,
        source TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE records (
        record_id INTEGER PRIMARY KEY,
        queue_id TEXT NOT NULL,
        recipient TEXT NOT NULL,
        original_recipient TEXT,
        rcpt_params TEXT NOT NULL,  -- JSON, defaults left out
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_try REAL NOT NULL,
        last_reply TEXT,  -- JSON {"code", "status", "lines"}
        lease_token TEXT,
        lease_owner TEXT,
        lease_expires REAL,
        updated_at REAL NOT NULL
    )""",
    "CREATE INDEX records_by_message ON records(queue_id)",
    "CREATE INDEX records_due ON records(next_try) WHERE state IN ('pending', 'deferred')",
    "CREATE INDEX records_leased ON records(lease_expires) WHERE state = 'leased'",
    # A rowid table (not WITHOUT ROWID): its rows are large, mostly overflow pages.
    """CREATE TABLE bodies (
        queue_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (queue_id, seq)
    )""",
)

# Version 2 adds the message history (kept apart from messages: it outlives them).
_SCHEMA_V2: Final = (
    """CREATE TABLE events (
        event_id INTEGER PRIMARY KEY,
        queue_id TEXT NOT NULL,
        at REAL NOT NULL,
        event TEXT NOT NULL,
        fields TEXT NOT NULL  -- JSON object
    )""",
    "CREATE INDEX events_by_message ON events(queue_id, at)",
    "CREATE INDEX events_by_time ON events(at)",
)

_RECORD_COLUMNS: Final = (
    "record_id, queue_id, recipient, original_recipient, rcpt_params, state, attempts,"
    " next_try, last_reply, lease_token, lease_owner, lease_expires, updated_at"
)
_MESSAGE_COLUMNS: Final = "queue_id, sender, mail_params, size, received_at, client, source"

# A record that is HELD but still carries a running lease has a delivery in flight.
_IN_FLIGHT: Final = "(lease_token IS NOT NULL AND lease_expires > :now)"


# ---------------------------------------------------------------- connections


def _connect(
    path: Path, factory: type[sqlite3.Connection] = sqlite3.Connection
) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions, we issue BEGIN/COMMIT ourselves.
    # timeout= is SQLite's busy timeout: wait for another process's write lock.
    conn = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT,
        isolation_level=None,
        check_same_thread=False,
        factory=factory,
    )
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def _retry_locked(fn: Callable[[], T]) -> T:
    """Run ``fn``, retrying while SQLite reports the database locked (up to BUSY_TIMEOUT).

    Changing the journal mode needs an exclusive lock and does not always go
    through the busy handler, so two processes creating the file at the same
    moment can see ``database is locked`` here.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    delay = 0.001
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _init_database(path: Path) -> None:
    """Create the file (mode 0600: it holds mail) and the schema; idempotent and race-safe."""
    created = False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        created = True
    conn = _connect(path)
    try:
        mode = _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: cannot switch to WAL mode (got {mode!r})")
        _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version in (0, 1):
                for statement in (_SCHEMA if version == 0 else ()) + _SCHEMA_V2:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StoreError(
                    f"{path}: queue schema version {version}, this postillon knows {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    if created:
        # The new directory entry must be durable too, or the whole queue can vanish.
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class _ReadPool:
    """Idle read connections; each is used by one thread at a time."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> sqlite3.Connection:
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            if self._idle:
                return self._idle.pop()
        conn = _connect(self._path)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def release(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:  # an abandoned iterator, an error: never reuse a snapshot
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        with self._lock:
            if not self._closed and len(self._idle) < _MAX_IDLE_READERS:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


# ---------------------------------------------------------------- the writer


_INSERT_MESSAGE: Final = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES "
_MESSAGE_VALUES: Final = "(?, ?, ?, ?, ?, ?, ?)"
_INSERT_RECORD: Final = (
    "INSERT INTO records (queue_id, recipient, original_recipient, rcpt_params,"
    " state, attempts, next_try, updated_at) VALUES "
)
_RECORD_VALUES: Final = f"(?, ?, ?, ?, '{_PENDING}', 0, ?, ?)"
_INSERT_BODY: Final = "INSERT INTO bodies (queue_id, seq, data) VALUES "
_BODY_VALUES: Final = "(?, ?, ?)"


class _Commit:
    """One message's rows, prepared on the event loop; the body is read in the writer."""

    __slots__ = ("chunks", "message", "message_row", "record_rows")

    def __init__(self, message: NewMessage, updated_at: float) -> None:
        self.message = message
        self.message_row = (
            message.queue_id,
            message.sender,
            encode_mail_params(message.mail_params),
            message.size,
            message.received_at,
            message.client,
            message.source,
        )
        self.record_rows = record_rows(message, updated_at)
        self.chunks: list[bytes] | None = None  # set once read for a multi-row insert

    @property
    def small(self) -> bool:
        return self.message.size <= _BULK_BODY_LIMIT

    def read_body(self) -> list[bytes]:
        if self.chunks is None:
            self.chunks = list(_read_chunks(self.message.body))
        return self.chunks

    def body_rows(self) -> Iterable[tuple[str, int, bytes]]:
        queue_id = self.message.queue_id
        chunks = self.chunks if self.chunks is not None else _read_chunks(self.message.body)
        return ((queue_id, seq, data) for seq, data in enumerate(chunks))

    def insert(self, conn: sqlite3.Connection) -> None:
        """The commit on its own (a batch of one, or isolating a failure)."""
        try:
            conn.execute(_INSERT_MESSAGE + _MESSAGE_VALUES, self.message_row)
        except sqlite3.IntegrityError as e:
            raise StoreError(f"duplicate queue id {self.message.queue_id}") from e
        conn.executemany(_INSERT_RECORD + _RECORD_VALUES, self.record_rows)
        conn.executemany(_INSERT_BODY + _BODY_VALUES, self.body_rows())


def _read_chunks(body: IO[bytes]) -> Iterator[bytes]:
    """Runs in the writer thread: the body in CHUNK_SIZE pieces, from the start."""
    if body.seekable():
        body.seek(0)  # a retried commit must not store an empty body
    while data := body.read(CHUNK_SIZE):
        yield data


def _insert_rows(
    conn: sqlite3.Connection, head: str, values: str, rows: Sequence[Sequence[Any]]
) -> None:
    """Insert ``rows`` with as few multi-row INSERT statements as SQLite allows."""
    per_statement = max(1, _MAX_VARIABLES // values.count("?"))
    for start in range(0, len(rows), per_statement):
        part = rows[start : start + per_statement]
        conn.execute(head + ", ".join([values] * len(part)), [v for row in part for v in row])


class _Op:
    __slots__ = ("commit", "fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        commit: _Commit | None,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop
        self.commit = commit  # set for commit(): it may join the batch's multi-row INSERTs


_STOP: Final = object()

# (the caller's future, the result, the exception or None)
_Result: TypeAlias = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _hand_back(results: list[_Result]) -> None:
    """Runs in the event loop: each waiting caller gets its result or exception, unless
    it gave up (cancelled) meanwhile."""
    for future, result, exc in results:
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


class SqliteStore:
    """The embedded ``QueueStore`` (see the module docstring)."""

    def __init__(self, path: Path | str, *, clock_now: Callable[[], float] = time.time) -> None:
        self._path = Path(path)
        self._now = clock_now
        _init_database(self._path)
        self._reads = _ReadPool(self._path)
        self._read_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=_READ_THREADS, thread_name_prefix="postillon-store-read"
        )
        self._inbox: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _closed, _writer and _inbox puts
        self._closed = False
        self._writer: threading.Thread | None = None  # started by the first write
        # Tests replace this (before the first write) to inject failures.
        self._writer_factory: type[sqlite3.Connection] = sqlite3.Connection
        self._stats = {"batches": 0, "ops": 0, "failed_ops": 0, "failed_batches": 0}

    @property
    def path(self) -> Path:
        return self._path

    def stats(self) -> dict[str, int]:
        """Group-commit counters: batches (= COMMITs = WAL fsyncs), ops, failures."""
        return dict(self._stats)

    # ------------------------------------------------------------ plumbing

    async def _write(
        self, fn: Callable[[sqlite3.Connection], T], commit: _Commit | None = None
    ) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._writer_main, name="postillon-store-writer", daemon=True
                )
                self._writer.start()
            self._inbox.put(_Op(fn, future, loop, commit))
        return await future

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_executor, self._run_read, fn)

    def _run_read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._reads.acquire()
        try:
            conn.execute("BEGIN")  # one snapshot for all the queries of fn
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        finally:
            self._reads.release(conn)

    def _writer_main(self) -> None:
        conn: sqlite3.Connection | None = None
        pending: list[_Op] = []
        try:
            conn = _connect(self._path, self._writer_factory)
            # After a checkpoint has recycled the WAL, truncate a WAL file that a
            # burst has grown beyond this, instead of keeping it at its peak size.
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
            while True:
                items = [self._inbox.get()]
                while True:
                    try:
                        items.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                pending = [item for item in items if isinstance(item, _Op)]
                if pending:
                    self._run_batch(conn, pending)
                pending = []
                if any(item is _STOP for item in items):
                    return
        except BaseException as e:  # a bug or a failed connect: never leave callers hanging
            with self._lock:
                self._closed = True
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Op):
                    pending.append(item)
            log.exception("queue writer thread failed; the store is closed")
            self._deliver([(op, None, StoreError(f"queue writer failed: {e!r}")) for op in pending])
        finally:
            if conn is not None:
                conn.close()

    def _run_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        """One transaction, one fsync, for every op of the batch."""
        self._stats["batches"] += 1
        self._stats["ops"] += len(ops)
        results: list[tuple[_Op, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self._stats["failed_batches"] += 1
            self._deliver([(op, None, self._batch_error("begin", e)) for op in ops])
            return
        try:
            if len(ops) == 1:
                # No savepoint needed: the op's failure is the transaction's failure.
                op = ops[0]
                try:
                    results.append((op, op.fn(conn), None))
                except Exception as e:
                    results.append((op, None, e))
            else:
                alone = ops
                bulk = [op for op in ops if op.commit is not None and op.commit.small]
                if len(bulk) > 1:
                    handled, _ = self._bulk_commit(conn, bulk)
                    results.extend(handled)
                    done = {id(op) for op, _, _ in handled}
                    alone = [op for op in ops if id(op) not in done]
                for op in alone:
                    conn.execute("SAVEPOINT op")
                    try:
                        value = op.fn(conn)
                    except Exception as e:
                        if not conn.in_transaction:
                            # SQLite rolled the whole transaction back (I/O error, disk
                            # full): the ops before this one are lost as well.
                            raise
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        results.append((op, None, e))
                    else:
                        conn.execute("RELEASE op")
                        results.append((op, value, None))
            if all(error is not None for _, _, error in results):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            else:
                conn.execute("COMMIT")
        except Exception as e:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._stats["failed_batches"] += 1
            self._deliver([(op, None, self._batch_error("commit", e)) for op in ops])
            return
        self._stats["failed_ops"] += sum(1 for _, _, error in results if error is not None)
        self._deliver(results)

    @staticmethod
    def _bulk_commit(
        conn: sqlite3.Connection, ops: list[_Op]
    ) -> tuple[list[tuple[_Op, Any, BaseException | None]], list[_Op]]:
        """Insert several commits with three multi-row INSERTs instead of a few
        statements each: fewer round trips into SQLite, and far fewer GIL
        hand-offs between this thread and a busy event loop (each statement
        releases the GIL, and getting it back can cost a switch interval, 5 ms).

        Returns the ops it settled and those to run one by one (all of them if
        the multi-row INSERT failed: one of them is bad, and only running them
        alone tells which).
        """
        settled: list[tuple[_Op, Any, BaseException | None]] = []
        ready: list[_Op] = []
        commits: list[_Commit] = []
        for op in ops:
            if op.commit is None:
                continue
            try:
                op.commit.read_body()
            except Exception as e:
                settled.append((op, None, e))
            else:
                ready.append(op)
                commits.append(op.commit)
        if len(ready) < 2:
            return settled, ready
        conn.execute("SAVEPOINT bulk")
        try:
            _insert_rows(conn, _INSERT_MESSAGE, _MESSAGE_VALUES, [c.message_row for c in commits])
            _insert_rows(
                conn, _INSERT_RECORD, _RECORD_VALUES, [r for c in commits for r in c.record_rows]
            )
            _insert_rows(
                conn, _INSERT_BODY, _BODY_VALUES, [r for c in commits for r in c.body_rows()]
            )
        except sqlite3.Error:
            if not conn.in_transaction:
                raise
            conn.execute("ROLLBACK TO bulk")
            conn.execute("RELEASE bulk")
            return settled, ready
        conn.execute("RELEASE bulk")
        settled.extend((op, None, None) for op in ready)
        return settled, []

    @staticmethod
    def _batch_error(stage: str, cause: BaseException) -> StoreError:
        error = StoreError(f"queue {stage} failed: {cause}")
        error.__cause__ = cause
        return error

    @staticmethod
    def _deliver(results: list[tuple[_Op, Any, BaseException | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Result]] = {}
        for op, value, error in results:
            by_loop.setdefault(op.loop, []).append((op.future, value, error))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_hand_back, items)

    # ------------------------------------------------------------ writes

    async def commit(self, message: NewMessage) -> None:
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        prepared = _Commit(message, self._now())
        await self._write(prepared.insert, prepared)

    async def claim_due(
        self, now: float, limit: int, lease_seconds: float, owner: str
    ) -> list[DeliveryRecord]:
        if limit <= 0:
            return []
        expires = now + lease_seconds

        def op(conn: sqlite3.Connection) -> list[DeliveryRecord]:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT record_id FROM records WHERE state = 'leased' AND lease_expires <= ?"
                    " ORDER BY lease_expires LIMIT ?",
                    (now, limit),
                )
            ]
            if len(ids) < limit:
                ids += [
                    row[0]
                    for row in conn.execute(
                        "SELECT record_id FROM records"
                        " WHERE state IN ('pending', 'deferred') AND next_try <= ?"
                        " ORDER BY next_try LIMIT ?",
                        (now, limit - len(ids)),
                    )
                ]
            if not ids:
                return []
            conn.executemany(
                "UPDATE records SET state = 'leased', lease_token = ?, lease_owner = ?,"
                " lease_expires = ?, updated_at = ? WHERE record_id = ?",
                [(secrets.token_hex(8), owner, expires, now, rid) for rid in ids],
            )
            return _records_by_id(conn, ids)

        return await self._write(op)

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

        return await self._write(op)

    async def release_leases(self, owner: str) -> int:
        now = self._now()

        def op(conn: sqlite3.Connection) -> int:
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

        return await self._write(op)

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
            failed = _records_by_id(conn, ids)
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

        await self._write(op)

    async def prune_events(self, before: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute("DELETE FROM events WHERE at < ?", (before,)).rowcount)

        return await self._write(op)

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
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                return None
            records = conn.execute(
                f"SELECT {_RECORD_COLUMNS} FROM records WHERE queue_id = ? ORDER BY record_id",
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
                f"SELECT {_MESSAGE_COLUMNS} FROM messages m{where} ORDER BY queue_id LIMIT ?",
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
                    f"SELECT {_RECORD_COLUMNS} FROM records WHERE queue_id IN ({marks})"
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
            counts = {s.value: 0 for s in DeliveryState}
            for state, count in conn.execute("SELECT state, COUNT(*) FROM records GROUP BY state"):
                counts[state] = count
            return counts

        return await self._read(fn)

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Finish every operation already submitted, then stop the writer and readers."""
        with self._lock:
            if self._closed and self._writer is None:
                return
            self._closed = True
            writer, self._writer = self._writer, None
            if writer is not None:
                self._inbox.put(_STOP)
        loop = asyncio.get_running_loop()
        if writer is not None:
            await loop.run_in_executor(None, writer.join)
        await loop.run_in_executor(None, self._read_executor.shutdown, True)
        self._reads.close()


def _records_by_id(conn: sqlite3.Connection, ids: Sequence[int]) -> list[DeliveryRecord]:
    """The records ``ids`` in that order."""
    by_id: dict[int, DeliveryRecord] = {}
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        marks = ", ".join("?" * len(part))
        for row in conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM records WHERE record_id IN ({marks})", part
        ):
            by_id[row[0]] = record_from_row(row)
    return [by_id[i] for i in ids]


def _delete_message(conn: sqlite3.Connection, queue_id: str) -> bool:
    conn.execute("DELETE FROM bodies WHERE queue_id = ?", (queue_id,))
    conn.execute("DELETE FROM records WHERE queue_id = ?", (queue_id,))
    return bool(conn.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,)).rowcount)
