"""The embedded store's schema, its migrations and its connections.

Design note
-----------
The schema version lives in ``PRAGMA user_version``. ``init_database`` creates the
file (mode 0600: it holds mail) and brings the schema to ``SCHEMA_VERSION`` inside
one ``BEGIN IMMEDIATE`` transaction, so two processes opening a new file at once
agree on one schema; a file of a newer version is refused. Each version's
statements are a tuple here; a new version appends one and a step in
``init_database``, never edits a shipped one.

Every connection runs with ``synchronous = FULL`` and waits up to
``BUSY_TIMEOUT`` for another process's write lock. Readers come from ``ReadPool``:
separate read-only connections that WAL lets run beside the writer.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

from postillon.queue.acme_state import SQLITE_TABLES as ACME_TABLES
from postillon.queue.policy_state import SQLITE_TABLES as POLICY_STATE_TABLES
from postillon.queue.shaping_state import SQLITE_TABLES as SHAPING_TABLES
from postillon.queue.store import StoreError
from postillon.queue.sts_cache import SQLITE_TABLE
from postillon.queue.tls_reports import SQLITE_TABLES as TLS_REPORT_TABLES
from postillon.queue.traces import SQLITE_TABLES as TRACE_TABLES

__all__ = [
    "BUSY_TIMEOUT",
    "MESSAGE_COLUMNS",
    "RECORD_COLUMNS",
    "SCHEMA_VERSION",
    "ReadPool",
    "connect",
    "init_database",
]

T = TypeVar("T")

SCHEMA_VERSION: Final = 9  # PRAGMA user_version
BUSY_TIMEOUT: Final = 10.0  # seconds a connection waits for another writer
_MAX_IDLE_READERS: Final = 4

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

# Version 3 adds the runners' heartbeats (the same table as in PostgreSQL, so that
# every store takes over a dead owner's leases the same way).
_SCHEMA_V3: Final = (
    """CREATE TABLE nodes (
        owner TEXT PRIMARY KEY,
        heartbeat REAL NOT NULL
    ) WITHOUT ROWID""",
)

# Version 4 adds the MTA-STS policy cache (RFC 8461; see sts_cache.py).
_SCHEMA_V4: Final = (SQLITE_TABLE,)
# Version 5: the SMTP TLS reporting counters (RFC 8460; see tls_reports.py).
_SCHEMA_V5: Final = TLS_REPORT_TABLES
# Version 6: the ACME certificate and renewal lease (issue 17; see acme_state.py).
_SCHEMA_V6: Final = ACME_TABLES
# Version 7: the checks' decision trace (postillon explain; see traces.py).
_SCHEMA_V7: Final = TRACE_TABLES
# Version 8: greylisting, shared rate counters, DMARC report counters (policy_state.py).
_SCHEMA_V8: Final = POLICY_STATE_TABLES
# Version 9: traffic shaping (suspensions, rate buckets; see shaping_state.py) and
# the delivery priority of each record (claimed highest first, then by next_try).
_SCHEMA_V9: Final = (
    *SHAPING_TABLES,
    "ALTER TABLE records ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX IF NOT EXISTS records_due_priority ON records(priority DESC, next_try)"
    " WHERE state IN ('pending', 'deferred')",
)

RECORD_COLUMNS: Final = (
    "record_id, queue_id, recipient, original_recipient, rcpt_params, state, attempts,"
    " next_try, last_reply, lease_token, lease_owner, lease_expires, updated_at"
)
MESSAGE_COLUMNS: Final = "queue_id, sender, mail_params, size, received_at, client, source"


def connect(
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


def init_database(path: Path) -> None:
    """Create the file (mode 0600: it holds mail) and the schema; idempotent and race-safe."""
    created = False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
        created = True
    conn = connect(path)
    try:
        mode = _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: cannot switch to WAL mode (got {mode!r})")
        _retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            steps_by_version = (
                _SCHEMA,
                _SCHEMA_V2,
                _SCHEMA_V3,
                _SCHEMA_V4,
                _SCHEMA_V5,
                _SCHEMA_V6,
                _SCHEMA_V7,
                _SCHEMA_V8,
                _SCHEMA_V9,
            )
            if 0 <= version < SCHEMA_VERSION:
                steps = steps_by_version[version:]
                for statement in (s for step in steps for s in step):
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


class ReadPool:
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
        conn = connect(self._path)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` on an idle connection, in one read snapshot (blocking: a reader thread)."""
        conn = self.acquire()
        try:
            conn.execute("BEGIN")  # one snapshot for all the queries of fn
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        finally:
            self.release(conn)

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
