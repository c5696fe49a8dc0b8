"""The PostgreSQL store's connection pool and its health.

Design note
-----------
``Database`` owns the asyncpg pool: it opens it lazily (once, under a lock), checks
(or, for tests and ``queue import``, creates) the schema, and watches the database.

**Health.** ``available`` turns False as soon as an operation loses its database
connection (or a periodic ``SELECT 1`` fails) and True again when the probe succeeds.
Listeners consult it: a node without its database answers ``421 4.3.0`` instead of
accepting mail it could not commit (never a 250 it cannot keep). After a connection
error the pool's connections are all replaced, so no dead socket is handed out after
the database comes back.

**Durability.** A COMMIT that a ``250`` waits on must wait for the WAL flush, whatever
the server's default says: every such transaction starts with ``SET LOCAL
synchronous_commit = on`` (``remote_apply`` if the server asks for that), and opening
the pool warns when the effective setting is weaker than ``on``.

No wait on the database is unbounded: a connection that went half-dead while the
server restarted must fail its operation (and be replaced), not hang it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, TypeAlias

import asyncpg

from postillon.core.credentials import redact, url_password
from postillon.queue.postgres_schema import check_schema, migrate
from postillon.queue.store import StoreError

__all__ = ["ACQUIRE_TIMEOUT", "CONNECTION_ERRORS", "Conn", "Database"]

log = logging.getLogger("postillon.queue.postgres_store")

Conn: TypeAlias = asyncpg.Connection

# synchronous_commit levels that do not wait for this server's WAL flush (off) or
# for a synchronous standby's (local, remote_write) before a COMMIT returns.
_WEAKER_THAN_ON: Final = frozenset({"off", "local", "remote_write"})
HEALTH_INTERVAL: Final = 1.0
_HEALTH_TIMEOUT: Final = 2.0
_CONNECT_TIMEOUT: Final = 5.0
# The acquire timeout also bounds the release (asyncpg resets or closes the
# connection then); the command timeout bounds every statement.
ACQUIRE_TIMEOUT: Final = 10.0
_COMMAND_TIMEOUT: Final = 30.0

# Errors that mean "the database is not reachable", as opposed to a bad statement.
CONNECTION_ERRORS: Final = (
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


class Database:
    """The pool, opened on first use, and the health watch (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int,
        create_schema: bool = False,
        health_interval: float = HEALTH_INTERVAL,
    ) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._create_schema = create_schema
        self._health_interval = health_interval
        self.pool: asyncpg.Pool | None = None
        self._open_lock: asyncio.Lock | None = None
        self._health: asyncio.Task[None] | None = None
        self._expiring: asyncio.Future[None] | None = None
        self.closed = False
        self.available = True
        # Issued first in every transaction a 250 or an operator waits on (see
        # "Durability" in the module docstring); raised at open to remote_apply
        # where the server asks for that, never lowered below the server's level.
        self.durable_statement = "SET LOCAL synchronous_commit = on"

    def _safe(self, error: BaseException) -> str:
        """``error``'s message without the password of ``[queue] dsn``."""
        return redact(str(error), *url_password(self._dsn))

    async def open(self) -> bool:
        """Connect and check (or create) the schema. True if this call opened the pool."""
        if self.closed:
            raise StoreError("store is closed")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self.pool is None:  # (another caller may have opened it meanwhile)
                await self._connect()
                return True
        return False

    async def _connect(self) -> None:
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=_CONNECT_TIMEOUT,
                command_timeout=_COMMAND_TIMEOUT,
            )
        except CONNECTION_ERRORS as e:
            self.available = False
            raise StoreError(f"cannot connect to the queue database: {self._safe(e)}") from None
        except ValueError:
            # asyncpg's message for a DSN it cannot parse quotes the piece it
            # choked on, which may be part of the password: say nothing of it.
            raise StoreError(
                "cannot open the queue database: [queue] dsn does not parse "
                "(percent-encode '/', '?', '#' and '@' in the password)"
            ) from None
        except asyncpg.PostgresError as e:
            raise StoreError(
                f"cannot open the queue database ([queue] dsn): {self._safe(e)}"
            ) from None
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                if self._create_schema:
                    await migrate(conn)
                await check_schema(conn)
                await self._check_durability(conn)
        except BaseException:
            await pool.close()
            raise
        self.pool = pool
        self.available = True
        if self._health_interval > 0:
            self._health = asyncio.create_task(self._watch_health(), name="pg-health")

    async def ready(self) -> asyncpg.Pool:
        """The pool, opened if need be."""
        if self.closed:
            raise StoreError("store is closed")
        if self.pool is None:
            await self.open()
        assert self.pool is not None
        return self.pool

    async def close(self) -> None:
        """Stop the health watch and close the connections (the writers are done)."""
        self.closed = True
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        if self.pool is not None:
            try:
                await asyncio.wait_for(self.pool.close(), 10)
            except (TimeoutError, *CONNECTION_ERRORS):
                self.pool.terminate()

    async def _check_durability(self, conn: Conn) -> None:
        setting = str(await conn.fetchval("SHOW synchronous_commit"))
        if setting == "remote_apply":
            self.durable_statement = "SET LOCAL synchronous_commit = remote_apply"
        elif setting in _WEAKER_THAN_ON:
            log.warning(
                "queue database: synchronous_commit is %r, weaker than 'on'; postillon sets"
                " it to 'on' for every message commit and operator command, but check the"
                " server's configuration (postgresql.conf, ALTER DATABASE/ROLE ... SET)",
                setting,
            )

    # ------------------------------------------------------------ health

    def lost_connection(self, error: BaseException) -> None:
        if self.available:
            log.warning("queue database unreachable: %s", error)
        self.available = False
        if self.pool is not None and self._expiring is None:
            # Dead sockets must not be handed out again once the server is back.
            self._expiring = asyncio.ensure_future(self.pool.expire_connections())
            self._expiring.add_done_callback(self._expired)

    def _expired(self, task: asyncio.Future[None]) -> None:
        self._expiring = None
        if not task.cancelled():
            task.exception()  # retrieved: expiring cannot really fail

    async def probe(self) -> bool:
        assert self.pool is not None
        try:
            async with asyncio.timeout(_HEALTH_TIMEOUT):
                async with self.pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                    await conn.fetchval("SELECT 1")
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as e:
            self.lost_connection(e)
            return False
        if not self.available:
            log.warning("queue database reachable again")
        self.available = True
        return True

    async def _watch_health(self) -> None:
        while not self.closed:
            await asyncio.sleep(self._health_interval)
            try:
                await self.probe()
            except Exception as e:  # the watch must outlive any surprise
                log.exception("queue database health probe failed")
                self.lost_connection(e)
