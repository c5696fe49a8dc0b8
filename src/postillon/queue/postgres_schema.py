"""Versioned migrations of the PostgreSQL queue schema (``postillon db migrate``).

Design note
-----------
The schema of the shared queue only ever changes through a numbered migration in
``MIGRATIONS``, applied by ``postillon db migrate``: the server never changes a schema
by itself (a node of an older or newer release must not silently rewrite the queue
every other node uses). At start a node checks that the database is exactly at
``SCHEMA_VERSION`` and refuses to run otherwise, naming the command to run.

Each migration runs in its own transaction together with the row that records it in
``postillon_schema``, so a migration is applied completely or not at all. A
transaction-scoped advisory lock serialises two ``migrate`` runs started at once (two
nodes deployed together): the second waits, then finds nothing left to do.

Never edit a migration that has shipped; add the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from postillon.queue.acme_state import POSTGRES_TABLES as ACME_TABLES
from postillon.queue.policy_state import POSTGRES_TABLES as POLICY_STATE_TABLES
from postillon.queue.shaping_state import POSTGRES_TABLES as SHAPING_TABLES
from postillon.queue.sts_cache import POSTGRES_TABLE
from postillon.queue.tls_reports import POSTGRES_TABLES as TLS_REPORT_TABLES
from postillon.queue.traces import POSTGRES_TABLES as TRACE_TABLES

if TYPE_CHECKING:  # asyncpg only with the PostgreSQL store; SchemaError is imported by serve
    import asyncpg

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Migration",
    "SchemaError",
    "applied_version",
    "check_schema",
    "migrate",
]

_LOCK_KEY: Final = 0x706F_7374_696C  # "postil": any constant shared by every node


class SchemaError(Exception):
    """The database's queue schema is missing, older or newer than this postillon."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "queue: messages, per-recipient delivery records, bodies",
        (
            """CREATE TABLE messages (
                queue_id text PRIMARY KEY,
                sender text NOT NULL,
                mail_params text NOT NULL,  -- JSON, defaults left out (as in SQLite)
                size bigint NOT NULL,
                received_at double precision NOT NULL,
                client text NOT NULL,
                source text NOT NULL
            )""",
            """CREATE TABLE records (
                record_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                queue_id text NOT NULL REFERENCES messages ON DELETE CASCADE,
                recipient text NOT NULL,
                original_recipient text,
                rcpt_params text NOT NULL,
                state text NOT NULL CHECK (state IN
                    ('pending', 'leased', 'deferred', 'delivered', 'failed', 'held')),
                attempts integer NOT NULL,
                next_try double precision NOT NULL,
                last_reply text,
                lease_token text,
                lease_owner text,
                lease_expires double precision,
                updated_at double precision NOT NULL
            )""",
            "CREATE INDEX records_by_message ON records (queue_id)",
            # Partial indexes, as in the SQLite store: due work in next_try order,
            # expired leases in expiry order; neither needs a sort over the backlog.
            "CREATE INDEX records_due ON records (next_try, record_id)"
            " WHERE state IN ('pending', 'deferred')",
            "CREATE INDEX records_leased ON records (lease_expires) WHERE state = 'leased'",
            """CREATE TABLE bodies (
                queue_id text NOT NULL REFERENCES messages ON DELETE CASCADE,
                seq integer NOT NULL,
                data bytea NOT NULL,
                PRIMARY KEY (queue_id, seq)
            )""",
            # Mail is mostly compressed or encoded already: skip pglz, store out of line.
            "ALTER TABLE bodies ALTER COLUMN data SET STORAGE EXTERNAL",
        ),
    ),
    Migration(
        2,
        "message history (events), kept after the message leaves the queue",
        (
            """CREATE TABLE events (
                event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                queue_id text NOT NULL,  -- no foreign key: history outlives the message
                at double precision NOT NULL,
                event text NOT NULL,
                fields text NOT NULL  -- JSON object
            )""",
            "CREATE INDEX events_by_message ON events (queue_id, at)",
            "CREATE INDEX events_by_time ON events (at)",
        ),
    ),
    Migration(
        3,
        "node heartbeats: a dead node's leases are taken over after [queue] node_timeout",
        (
            """CREATE TABLE nodes (
                owner text PRIMARY KEY,  -- the runner's lease owner name, host:pid
                heartbeat double precision NOT NULL
            )""",
        ),
    ),
    Migration(4, "MTA-STS policy cache (RFC 8461), shared by every node", (POSTGRES_TABLE,)),
    Migration(5, "SMTP TLS reporting counters (RFC 8460), shared by every node", TLS_REPORT_TABLES),
    Migration(6, "ACME certificate and renewal lease, shared by every node", ACME_TABLES),
    Migration(
        7, "the checks' decision trace (postillon explain), shared by every node", TRACE_TABLES
    ),
    Migration(
        8,
        "greylisting, port-25 rate counters, DMARC report counters, shared by every node",
        POLICY_STATE_TABLES,
    ),
    Migration(
        9,
        "traffic shaping: suspensions and rate buckets shared by every node; record priority",
        (
            *SHAPING_TABLES,
            "ALTER TABLE records ADD COLUMN IF NOT EXISTS priority integer NOT NULL DEFAULT 0",
            "CREATE INDEX IF NOT EXISTS records_due_priority ON records (priority DESC, next_try)"
            " WHERE state IN ('pending', 'deferred')",
        ),
    ),
)

SCHEMA_VERSION: Final = MIGRATIONS[-1].version

_CREATE_VERSION_TABLE: Final = """CREATE TABLE IF NOT EXISTS postillon_schema (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def applied_version(conn: asyncpg.Connection) -> int:
    """The highest migration applied to this database (0 for none)."""
    exists = await conn.fetchval("SELECT to_regclass('postillon_schema') IS NOT NULL")
    if not exists:
        return 0
    version = await conn.fetchval("SELECT max(version) FROM postillon_schema")
    return int(version or 0)


async def check_schema(conn: asyncpg.Connection) -> None:
    """Raise ``SchemaError`` unless the database is exactly at ``SCHEMA_VERSION``."""
    version = await applied_version(conn)
    if version == SCHEMA_VERSION:
        return
    if version < SCHEMA_VERSION:
        raise SchemaError(
            f"the queue database is at schema version {version}, this postillon needs "
            f"{SCHEMA_VERSION}: run `postillon db migrate` (config [queue] dsn)"
        )
    raise SchemaError(
        f"the queue database is at schema version {version}, newer than this postillon "
        f"({SCHEMA_VERSION}): upgrade postillon on this node"
    )


async def migrate(conn: asyncpg.Connection) -> list[Migration]:
    """Apply every migration not yet applied, in order; return those applied now."""
    applied: list[Migration] = []
    for migration in MIGRATIONS:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            await conn.execute(_CREATE_VERSION_TABLE)
            version = await applied_version(conn)
            if version > SCHEMA_VERSION:
                raise SchemaError(
                    f"the queue database is at schema version {version}, newer than this "
                    f"postillon ({SCHEMA_VERSION}): upgrade postillon before migrating"
                )
            if migration.version <= version:
                continue
            for statement in migration.statements:
                await conn.execute(statement)
            await conn.execute(
                "INSERT INTO postillon_schema (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration)
    return applied
