"""Claiming due work never reads the backlog (queue/claims.py).

The work of one claim is counted, not timed: SQLite's virtual machine steps
(``set_progress_handler``), PostgreSQL's rows read by every plan node (EXPLAIN
ANALYZE). A queue holding 20,000 retries that are not due yet (priority 1, ahead of
fresh mail) must cost a claim of fresh mail (priority 0) about what an empty queue
costs. Before the per-priority seek it read every one of the 20,000.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from postillon.queue.claims import postgres_claim_due, sqlite_claim_due
from postillon.queue.postgres_store import PostgresStore
from postillon.queue.sqlite_schema import init_database

T0 = 1_800_000_000.0
BACKLOG = 20_000
FRESH = 20


def _seed_sqlite(path: Path, backlog: int) -> None:
    init_database(path)
    conn = sqlite3.connect(path)
    rows = [
        (f"Q{i:06d}", f"r{i}@dead.example", "deferred", 1, T0 + 3600, 1) for i in range(backlog)
    ]
    rows += [(f"F{i:06d}", f"r{i}@live.example", "pending", 0, T0 - 1, 0) for i in range(FRESH)]
    conn.executemany(
        "INSERT INTO records (queue_id, recipient, rcpt_params, state, attempts, next_try,"
        " updated_at, priority) VALUES (?, ?, '{}', ?, ?, ?, 0, ?)",
        rows,
    )
    conn.commit()
    conn.close()


def _sqlite_claim_steps(path: Path) -> tuple[int, int]:
    """(VM steps of one claim of 10, records claimed)."""
    conn = sqlite3.connect(path, isolation_level=None)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.execute("BEGIN IMMEDIATE")
    conn.set_progress_handler(count, 10)
    claimed = sqlite_claim_due(conn, T0, 10, T0 + 60, "test")
    conn.set_progress_handler(None, 0)
    conn.execute("ROLLBACK")
    conn.close()
    return steps, len(claimed)


def test_sqlite_claim_cost_is_flat_with_a_backlog(tmp_path: Path) -> None:
    empty, backlog = tmp_path / "empty.db", tmp_path / "backlog.db"
    _seed_sqlite(empty, 0)
    _seed_sqlite(backlog, BACKLOG)
    steps_empty, claimed_empty = _sqlite_claim_steps(empty)
    steps_backlog, claimed_backlog = _sqlite_claim_steps(backlog)
    assert claimed_empty == claimed_backlog == 10
    # A backlog scan costs several steps per waiting record: 20,000 x >= 1 x 10.
    assert steps_backlog < steps_empty * 1.5 + 200, (steps_empty, steps_backlog)


def test_sqlite_claim_plan_never_scans(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    _seed_sqlite(path, 100)
    conn = sqlite3.connect(path)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    conn.execute("BEGIN IMMEDIATE")
    sqlite_claim_due(conn, T0, 10, T0 + 60, "test")
    conn.set_trace_callback(None)
    conn.execute("ROLLBACK")
    selects = {s for s in statements if s.lstrip().startswith(("SELECT", "WITH"))}
    assert selects
    for statement in selects:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + statement)]
        scans = [step for step in plan if step.startswith("SCAN records")]
        assert not scans, (statement, plan)
    conn.close()


class _Counting:
    """An asyncpg connection that runs EXPLAIN ANALYZE beside each SELECT and adds up
    the rows every plan node produced or filtered out."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.rows = 0

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        if sql.lstrip().startswith(("SELECT", "WITH")):
            explained = await self.conn.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.replace(" FOR UPDATE SKIP LOCKED", ""),
                *args,
            )
            plan = json.loads(explained)[0]["Plan"]
            self.rows += _plan_rows(plan)
        return await self.conn.fetch(sql, *args)


def _plan_rows(node: dict[str, Any]) -> int:
    loops = int(node.get("Actual Loops", 1))
    own = int(node.get("Actual Rows", 0)) + int(node.get("Rows Removed by Filter", 0))
    return own * max(loops, 1) + sum(_plan_rows(child) for child in node.get("Plans", ()))


async def _postgres_claim_rows(dsn: str, backlog: int) -> tuple[int, int]:
    store = PostgresStore(dsn, create_schema=True, health_interval=0)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE messages CASCADE")
        await conn.execute(
            "INSERT INTO messages SELECT 'Q' || i, 's@x', '{}', 10, $1, '', ''"
            " FROM generate_series(1, $2) i",
            T0,
            backlog + FRESH,
        )
        await conn.execute(
            "INSERT INTO records (queue_id, recipient, rcpt_params, state, attempts, next_try,"
            " updated_at, priority) SELECT 'Q' || i, 'r@dead.example', '{}', 'deferred', 1,"
            " $1, 0, 1 FROM generate_series(1, $2) i",
            T0 + 3600,
            backlog,
        )
        await conn.execute(
            "INSERT INTO records (queue_id, recipient, rcpt_params, state, attempts, next_try,"
            " updated_at, priority) SELECT 'Q' || i, 'r@live.example', '{}', 'pending', 0,"
            " $1, 0, 0 FROM generate_series($2 + 1, $2 + $3) i",
            T0 - 1,
            backlog,
            FRESH,
        )
        await conn.execute("ANALYZE records")
        counting = _Counting(conn)
        async with conn.transaction():
            claimed = await postgres_claim_due(counting, T0, 10, T0 + 60, "test")
        return counting.rows, len(claimed)
    finally:
        await conn.close()


@pytest.mark.parametrize("backlog", [BACKLOG])
async def test_postgres_claim_cost_is_flat_with_a_backlog(postgres_dsn: str, backlog: int) -> None:
    rows_empty, claimed_empty = await _postgres_claim_rows(postgres_dsn, 0)
    rows_backlog, claimed_backlog = await _postgres_claim_rows(postgres_dsn, backlog)
    assert claimed_empty == claimed_backlog == 10
    assert rows_backlog < rows_empty * 2 + 50, (rows_empty, rows_backlog)
