"""The MTA-STS policy cache in the queue store (store.py step 6), against every store.

Run with the contract suite's store factories (memory, SQLite, a real PostgreSQL), so
the three behave the same: the cache survives reopening (SQLite), a save never rolls a
policy back to an older fetch (two nodes refreshing at once), domains are case-blind.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_store_contract import STORE_FACTORIES, T0

from postillon.core.sts import CachedPolicy, StsPolicy
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import QueueStore

ENFORCE = StsPolicy("enforce", 86400, ("mx1.example.net", "*.mx.example.net"))
TESTING = StsPolicy("testing", 600, ("mx.example.net",))


@pytest.fixture(
    params=[factory for _, factory in STORE_FACTORIES], ids=[n for n, _ in STORE_FACTORIES]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    s: QueueStore = request.param(tmp_path, request)
    yield s
    await s.close()


async def test_saved_policy_reads_back_whole(store: QueueStore) -> None:
    assert await store.sts_policy("example.net") is None
    entry = CachedPolicy("example.net", "20260101", ENFORCE, T0, T0 + 5, "")
    await store.save_sts_policy(entry)
    assert await store.sts_policy("example.net") == entry
    assert await store.sts_policy("EXAMPLE.Net") == entry  # domains are case-blind
    assert await store.sts_policies() == [entry]


async def test_newer_fetch_replaces_older_never_the_reverse(store: QueueStore) -> None:
    old = CachedPolicy("example.net", "id1", ENFORCE, T0)
    new = CachedPolicy("example.net", "id2", TESTING, T0 + 100, T0 + 100)
    await store.save_sts_policy(old)
    await store.save_sts_policy(new)
    assert await store.sts_policy("example.net") == new
    await store.save_sts_policy(old)  # a slow node finishing an older fetch
    assert await store.sts_policy("example.net") == new
    # The same fetch, seen again with a failed refresh noted: kept.
    noted = CachedPolicy("example.net", "id2", TESTING, T0 + 100, T0 + 200, "HTTP 500")
    await store.save_sts_policy(noted)
    assert await store.sts_policy("example.net") == noted


async def test_policies_are_listed_by_domain(store: QueueStore) -> None:
    for domain in ("b.example", "a.example", "c.example"):
        await store.save_sts_policy(CachedPolicy(domain, "x1", TESTING, T0))
    assert [e.domain for e in await store.sts_policies()] == ["a.example", "b.example", "c.example"]


def test_expiry_is_fetch_time_plus_max_age() -> None:
    entry = CachedPolicy("example.net", "id", TESTING, T0)
    assert entry.expires_at == T0 + 600
    assert entry.fresh(T0 + 599) and not entry.fresh(T0 + 600)


async def test_sqlite_cache_survives_reopening(tmp_path: Path) -> None:
    """A restart keeps the policy (what lets an unreachable policy host not matter)."""
    entry = CachedPolicy("example.net", "id1", ENFORCE, T0, T0)
    store = SqliteStore(tmp_path / "queue.db")
    await store.save_sts_policy(entry)
    await store.close()
    store = SqliteStore(tmp_path / "queue.db")
    try:
        assert await store.sts_policy("example.net") == entry
    finally:
        await store.close()


async def test_version_3_queue_gains_the_policy_cache(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    await SqliteStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE sts_policies")
    conn.execute("DROP TABLE tls_results")  # version 5's (TLS reports)
    conn.execute("DROP TABLE tls_report_claims")
    for statement in (  # version 6's (shaping, record priority)
        "DROP TABLE suspensions",
        "DROP TABLE shaping_buckets",
        "DROP INDEX records_due_priority",
        "ALTER TABLE records DROP COLUMN priority",
    ):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    try:
        await store.save_sts_policy(CachedPolicy("example.net", "id1", TESTING, T0))
        assert (await store.sts_policy("example.net")) is not None
    finally:
        await store.close()
