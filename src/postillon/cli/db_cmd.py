"""``postillon db ...``: the shared PostgreSQL queue's schema (``[queue] store = "postgresql"``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from postillon.config.model import Config
from postillon.core.credentials import redact, url_password
from postillon.queue.postgres_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SchemaError,
    applied_version,
    migrate,
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    db = sub.add_parser(
        "db",
        help="create and migrate the shared PostgreSQL queue's schema",
        description='For [queue] store = "postgresql": the schema changes only through '
        "these versioned migrations, never silently when a node starts.",
    )
    dsub = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    dsub.add_parser(
        "migrate",
        help="apply every migration not yet applied (safe to run from several nodes)",
    )
    dsub.add_parser("status", help="show the schema version of the database and of postillon")


def run(args: argparse.Namespace, config: Config) -> int:
    if config.queue.store != "postgresql" or not config.queue.dsn:
        print(
            'postillon: db commands need [queue] store = "postgresql" and [queue] dsn',
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_run(args, config.queue.dsn))


async def _run(args: argparse.Namespace, dsn: str) -> int:
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except (OSError, asyncpg.PostgresError, ValueError, TimeoutError) as exc:
        # asyncpg may quote the DSN, or the piece of it it could not parse.
        reason = "the URL does not parse"
        if not isinstance(exc, ValueError):
            reason = redact(str(exc), *url_password(dsn))
        print(f"postillon: cannot connect to [queue] dsn: {reason}", file=sys.stderr)
        return 1
    try:
        if args.db_command == "status":
            version = await applied_version(conn)
            state = "up to date" if version == SCHEMA_VERSION else "run `postillon db migrate`"
            if version > SCHEMA_VERSION:
                state = "newer than this postillon: upgrade it"
            print(f"database schema version {version}; postillon needs {SCHEMA_VERSION} ({state})")
            return 0 if version == SCHEMA_VERSION else 1
        before = await applied_version(conn)
        applied = await migrate(conn)
        for migration in applied:
            print(f"applied migration {migration.version}: {migration.name}")
        if not applied:
            print(f"schema already at version {before} (latest {MIGRATIONS[-1].version})")
        return 0
    except SchemaError as exc:
        print(f"postillon: {exc}", file=sys.stderr)
        return 1
    except asyncpg.PostgresError as exc:
        print(f"postillon: migration failed, nothing of it applied: {exc}", file=sys.stderr)
        return 1
    finally:
        await conn.close()
