"""The ACME certificate and the renewal lease, shared by every node of a cluster.

Design note
-----------
With ``[tls] acme = true`` on several nodes behind one name, one node renews at a time
and the others load its result: a CA rate-limits orders per name, and two nodes racing
for one order would each answer only the challenges that reach them. The node that
renews holds the row of ``acme_lease`` (taken only when free or expired, so a node that
dies mid-order frees it after ``expires``); the certificate it obtains goes to
``acme_certificates`` (one row per set of names), which every node reads on its next
check. A row is never replaced by one that expires earlier, so a slow node cannot roll
the shared certificate back. The key travels with the certificate: the store holds the
mail already, and a node cannot present a certificate without it.

The functions below hold the SQL for both stores; ``SqliteAcmeState``,
``PostgresAcmeState`` and ``MemoryAcmeState`` carry them out on each store's reader and
writer (see ``store.AcmeStateStore`` for the contract).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any, Final

from postillon.queue.store import SharedCertificate

Conn = Any  # an asyncpg connection (typed loosely, as in sts_cache.py)

# Self-contained: the schema step of either store may run them on any version.
SQLITE_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS acme_certificates (
        names TEXT PRIMARY KEY,  -- the names, sorted, comma-separated
        chain_pem TEXT NOT NULL,
        key_pem TEXT NOT NULL,
        not_after REAL NOT NULL,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS acme_lease (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        expires REAL NOT NULL
    )""",
)
POSTGRES_TABLES: Final = (
    """CREATE TABLE IF NOT EXISTS acme_certificates (
        names text PRIMARY KEY,
        chain_pem text NOT NULL,
        key_pem text NOT NULL,
        not_after double precision NOT NULL,
        updated_at double precision NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS acme_lease (
        id integer PRIMARY KEY CHECK (id = 1),
        holder text NOT NULL,
        expires double precision NOT NULL
    )""",
)

_COLUMNS: Final = "names, chain_pem, key_pem, not_after, updated_at"
_SAVE: Final = (
    " ON CONFLICT (names) DO UPDATE SET chain_pem = excluded.chain_pem,"
    " key_pem = excluded.key_pem, not_after = excluded.not_after,"
    " updated_at = excluded.updated_at WHERE excluded.not_after >= acme_certificates.not_after"
)
_LEASE: Final = (
    " ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, expires = excluded.expires"
    " WHERE acme_lease.holder = excluded.holder OR acme_lease.expires < {now}"
)


def names_key(names: tuple[str, ...]) -> str:
    return ",".join(sorted(n.lower() for n in names))


def _row(row: Any) -> SharedCertificate:
    return SharedCertificate(
        tuple(str(row[0]).split(",")),
        str(row[1]).encode(),
        str(row[2]).encode(),
        float(row[3]),
        float(row[4]),
    )


def _values(cert: SharedCertificate) -> tuple[Any, ...]:
    return (
        names_key(cert.names),
        cert.chain_pem.decode("ascii"),
        cert.key_pem.decode("ascii"),
        cert.not_after,
        cert.updated_at,
    )


SqliteOp = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]
PostgresOp = Callable[[Callable[[Conn], Awaitable[Any]]], Awaitable[Any]]


class SqliteAcmeState:
    """On a ``SqliteStore``'s reader pool and group-commit writer."""

    def __init__(self, read: SqliteOp, write: SqliteOp) -> None:
        self._read, self._write = read, write

    async def certificate(self, names: tuple[str, ...]) -> SharedCertificate | None:
        def fn(conn: sqlite3.Connection) -> SharedCertificate | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM acme_certificates WHERE names = ?", (names_key(names),)
            ).fetchone()
            return _row(row) if row is not None else None

        found: SharedCertificate | None = await self._read(fn)
        return found

    async def save_certificate(self, cert: SharedCertificate) -> None:
        await self._write(
            lambda conn: conn.execute(
                f"INSERT INTO acme_certificates ({_COLUMNS}) VALUES (?, ?, ?, ?, ?){_SAVE}",
                _values(cert),
            )
        )

    async def take_lease(self, holder: str, now: float, until: float) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            sql = "INSERT INTO acme_lease (id, holder, expires) VALUES (1, ?, ?)"
            cur = conn.execute(sql + _LEASE.format(now="?"), (holder, until, now))
            return cur.rowcount == 1

        taken: bool = await self._write(op)
        return taken

    async def release_lease(self, holder: str) -> None:
        await self._write(
            lambda conn: conn.execute("DELETE FROM acme_lease WHERE holder = ?", (holder,))
        )


class PostgresAcmeState:
    """On a ``PostgresStore``'s connections."""

    def __init__(self, read: PostgresOp, write: PostgresOp) -> None:
        self._read, self._write = read, write

    async def certificate(self, names: tuple[str, ...]) -> SharedCertificate | None:
        async def fn(conn: Conn) -> SharedCertificate | None:
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM acme_certificates WHERE names = $1", names_key(names)
            )
            return _row(row) if row is not None else None

        found: SharedCertificate | None = await self._read(fn)
        return found

    async def save_certificate(self, cert: SharedCertificate) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute(
                f"INSERT INTO acme_certificates ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5){_SAVE}",
                *_values(cert),
            )

        await self._write(op)

    async def take_lease(self, holder: str, now: float, until: float) -> bool:
        async def op(conn: Conn) -> bool:
            sql = "INSERT INTO acme_lease (id, holder, expires) VALUES (1, $1, $2)"
            status = await conn.execute(sql + _LEASE.format(now="$3"), holder, until, now)
            return str(status).endswith(" 1")

        taken: bool = await self._write(op)
        return taken

    async def release_lease(self, holder: str) -> None:
        async def op(conn: Conn) -> None:
            await conn.execute("DELETE FROM acme_lease WHERE holder = $1", holder)

        await self._write(op)


class MemoryAcmeState:
    """The same rules in dicts, for the in-memory store."""

    def __init__(self) -> None:
        self._certs: dict[str, SharedCertificate] = {}
        self._lease: tuple[str, float] | None = None

    async def certificate(self, names: tuple[str, ...]) -> SharedCertificate | None:
        return self._certs.get(names_key(names))

    async def save_certificate(self, cert: SharedCertificate) -> None:
        old = self._certs.get(names_key(cert.names))
        if old is None or cert.not_after >= old.not_after:
            self._certs[names_key(cert.names)] = cert

    async def take_lease(self, holder: str, now: float, until: float) -> bool:
        if self._lease is None or self._lease[0] == holder or self._lease[1] < now:
            self._lease = (holder, until)
            return True
        return False

    async def release_lease(self, holder: str) -> None:
        if self._lease is not None and self._lease[0] == holder:
            self._lease = None
