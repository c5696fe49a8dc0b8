"""The embedded store's group-commit writer: one thread, one connection, one fsync per batch.

Design note
-----------
One dedicated thread owns the only write connection. Async callers hand it
operations (plain callables taking the connection) with ``submit`` and await a
future. The thread takes every operation that arrived while it was busy, runs
them all inside ONE transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) and so pays
one fsync for the whole batch; then it resolves the callers' futures with one
``loop.call_soon_threadsafe`` per event loop. Each operation runs inside its own
SAVEPOINT: one that raises is rolled back alone and fails only its own caller.
If the COMMIT itself fails, every caller of the batch gets a ``StoreError`` and
nothing of the batch is visible. Message commits of a batch (bodies up to
1 MiB) go in together as three multi-row INSERTs (see ``_bulk_commit``).

Durability of bookkeeping: ``submit(..., durable=False)`` marks an operation
whose loss in a crash only repeats work or loses a count (claims, delivery
outcomes, released leases, heartbeats, history events; with ``submit_lazy``
decision traces, report statistics, policy and shaping state; not the ACME
state), as the PostgreSQL store does with
``synchronous_commit = off``. A batch made only of such operations commits with
``PRAGMA synchronous = NORMAL``: in WAL mode that skips the WAL fsync of the
COMMIT (checkpoints still sync, so the file is never corrupted). Any batch with
one durable operation (every message commit, so every 250) commits with
``synchronous = FULL``, and its fsync of the WAL also makes every earlier frame
durable, the lazy ones included: frames are appended in order. A kill -9 loses
nothing either way (the frames are in the OS's page cache); a power loss may lose
the last outcomes, so a delivery is repeated (SMTP's at-least-once), never lost.
This halves the fsyncs per relayed message.

If the thread itself dies (a bug, a connection that cannot be opened), the
writer closes: every waiting and later caller gets a ``StoreError``, and
``failure`` says why, so the store's health check can report it and the server
can exit for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final, TypeAlias, TypeVar

from postillon.queue.codec import encode_mail_params, record_rows
from postillon.queue.sqlite_schema import MESSAGE_COLUMNS, connect
from postillon.queue.store import NewMessage, StoreError

__all__ = ["CHUNK_SIZE", "Commit", "GroupCommitWriter"]

T = TypeVar("T")

log = logging.getLogger("postillon.queue.sqlite_store")

CHUNK_SIZE: Final = 256 * 1024  # body bytes per row
_WAL_SIZE_LIMIT: Final = 64 * 1024 * 1024
_BULK_BODY_LIMIT: Final = 1024 * 1024  # bodies up to this join multi-row INSERTs
_MAX_VARIABLES: Final = 32_000  # SQLITE_MAX_VARIABLE_NUMBER is 32766 (since 3.32)

_INSERT_MESSAGE: Final = f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES "
_MESSAGE_VALUES: Final = "(?, ?, ?, ?, ?, ?, ?)"
_INSERT_RECORD: Final = (
    "INSERT INTO records (queue_id, recipient, original_recipient, rcpt_params,"
    " state, attempts, next_try, updated_at, priority) VALUES "
)
_RECORD_VALUES: Final = "(?, ?, ?, ?, ?, 0, ?, ?, ?)"
_INSERT_BODY: Final = "INSERT INTO bodies (queue_id, seq, data) VALUES "
_BODY_VALUES: Final = "(?, ?, ?)"


class Commit:
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
    __slots__ = ("commit", "durable", "fn", "future", "loop")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        commit: Commit | None,
        durable: bool,
    ) -> None:
        self.durable = durable  # False: bookkeeping, committed without the WAL fsync
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


class GroupCommitWriter:
    """The writer thread and its inbox (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._inbox: queue.SimpleQueue[_Op | object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards closed, _thread and _inbox puts
        self.closed = False
        self._thread: threading.Thread | None = None  # started by the first write
        # Tests replace this (before the first write) to inject failures.
        self.factory: type[sqlite3.Connection] = sqlite3.Connection
        # Why the thread died, if it did (None while it runs or after a clean close).
        self.failure: BaseException | None = None
        self._stats = {
            "batches": 0,
            "lazy_batches": 0,  # committed with synchronous = NORMAL: no WAL fsync
            "ops": 0,
            "failed_ops": 0,
            "failed_batches": 0,
        }
        self._synchronous_full = True  # what the connection's PRAGMA says now

    def problem(self) -> str | None:
        """Why the writer cannot write, or None while it can."""
        if self.failure is not None:
            return f"queue writer thread died: {self.failure!r}"
        if self.closed:
            return "store is closed"
        thread = self._thread
        if thread is not None and not thread.is_alive():
            return "queue writer thread ended"
        return None

    def stats(self) -> dict[str, int]:
        """Group-commit counters: batches (= COMMITs), lazy_batches (those without a WAL
        fsync: batches - lazy_batches = fsyncs), ops, failures."""
        return dict(self._stats)

    async def submit(
        self,
        fn: Callable[[sqlite3.Connection], T],
        commit: Commit | None = None,
        *,
        durable: bool = True,
    ) -> T:
        """Run ``fn`` in the writer's next batch. ``durable=False``: bookkeeping whose
        loss in a power cut only repeats work (see the module docstring)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self.closed:
                raise StoreError("store is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._main, name="postillon-store-writer", daemon=True
                )
                self._thread.start()
            self._inbox.put(_Op(fn, future, loop, commit, durable))
        return await future

    async def submit_lazy(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``submit(fn, durable=False)``: bookkeeping such as statistics, decision
        traces and policy state, whose loss in a power cut is harmless."""
        return await self.submit(fn, durable=False)

    async def close(self) -> bool:
        """Finish every operation already submitted, then stop the thread.
        False if it was closed already."""
        with self._lock:
            if self.closed and self._thread is None:
                return False
            self.closed = True
            thread, self._thread = self._thread, None
            if thread is not None:
                self._inbox.put(_STOP)
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        return True

    def _main(self) -> None:
        conn: sqlite3.Connection | None = None
        pending: list[_Op] = []
        try:
            conn = connect(self._path, self.factory)
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
                self.closed = True
            self.failure = e
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
        """One transaction, one fsync (none if every op is bookkeeping), for the batch."""
        self._stats["batches"] += 1
        self._stats["ops"] += len(ops)
        results: list[tuple[_Op, Any, BaseException | None]] = []
        try:
            self._set_synchronous(conn, full=any(op.durable for op in ops))
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

    def _set_synchronous(self, conn: sqlite3.Connection, *, full: bool) -> None:
        """FULL for a batch with a durable op, NORMAL (no WAL fsync at COMMIT) for
        bookkeeping only. Set between transactions, only when it changes."""
        if not full:
            self._stats["lazy_batches"] += 1
        if full != self._synchronous_full:
            conn.execute(f"PRAGMA synchronous = {'FULL' if full else 'NORMAL'}")
            self._synchronous_full = full

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
        commits: list[Commit] = []
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
