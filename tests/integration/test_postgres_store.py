"""The PostgreSQL queue store against a real PostgreSQL server: what the shared
contract tests (tests/unit/test_store_contract.py) cannot show on one store alone.

    node A store ─┐
                  ├── one PostgreSQL database (private cluster on loopback)
    node B store ─┘
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from postillon.core.envelope import MailParams
from postillon.core.reply import Reply
from postillon.queue.postgres_schema import SCHEMA_VERSION, SchemaError, applied_version, migrate
from postillon.queue.postgres_store import PostgresStore
from postillon.queue.store import (
    DeliveryState,
    NewMessage,
    NewRecipient,
    OutcomeUpdate,
    StoreError,
)
from support.postgres import PostgresServer

pytestmark = pytest.mark.integration

T0 = 1_800_000_000.0
LEASE = 60.0
OK_250 = Reply.of(250, "2.0.0", "Ok")


def message(queue_id: str, body: bytes = b"Subject: x\r\n\r\nhi\r\n", rcpts: int = 1) -> NewMessage:
    return NewMessage(
        queue_id=queue_id,
        sender="s@example.org",
        mail_params=MailParams(),
        recipients=[NewRecipient(f"r{i}@example.net") for i in range(rcpts)],
        body=io.BytesIO(body),
        size=len(body),
        received_at=T0,
    )


@pytest.fixture
async def two_nodes(postgres_dsn: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two postillon nodes would have."""
    a = PostgresStore(postgres_dsn, clock_now=lambda: T0, create_schema=True, health_interval=0)
    b = PostgresStore(postgres_dsn, clock_now=lambda: T0, health_interval=0)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


async def test_migrations_are_versioned_and_never_silent(postgres_dsn: str) -> None:
    store = PostgresStore(postgres_dsn, health_interval=0)
    with pytest.raises(SchemaError, match="postillon db migrate"):
        await store.open()  # an empty database: the node refuses to start
    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await applied_version(conn) == 0
        applied = await migrate(conn)
        assert [m.version for m in applied] == list(range(1, SCHEMA_VERSION + 1))
        assert await migrate(conn) == []  # idempotent
        assert await applied_version(conn) == SCHEMA_VERSION
        # A database migrated by a newer postillon is refused, not rewritten.
        await conn.execute("INSERT INTO postillon_schema (version, name) VALUES (999, 'future')")
        with pytest.raises(SchemaError, match="newer"):
            await PostgresStore(postgres_dsn, health_interval=0).open()
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_once(postgres_dsn: str) -> None:
    conns = [await asyncpg.connect(postgres_dsn) for _ in range(3)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        # Each migration runs in its own transaction under the advisory lock, so the
        # connections may share the work (with migration 4 they often do): what must
        # hold is that every migration is applied exactly once, each run in order.
        versions = [m.version for r in results for m in r]
        assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))
        assert all([m.version for m in r] == sorted(m.version for m in r) for r in results)
    finally:
        for c in conns:
            await c.close()


async def test_concurrent_commits_share_transactions(postgres_dsn: str) -> None:
    store = PostgresStore(postgres_dsn, create_schema=True, health_interval=0)
    try:
        await asyncio.gather(*(store.commit(message(f"QG{i:04d}")) for i in range(200)))
        conn = await asyncpg.connect(postgres_dsn)
        try:
            # Rows written by one (sub)transaction share its xmin: fewer distinct
            # xmins than messages means commits were batched together.
            transactions = await conn.fetchval("SELECT count(DISTINCT xmin::text) FROM messages")
            assert await conn.fetchval("SELECT count(*) FROM records") == 200
        finally:
            await conn.close()
        assert transactions < 50, transactions
    finally:
        await store.close()


async def test_two_nodes_claim_disjoint_work(
    two_nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two_nodes
    await asyncio.gather(*(a.commit(message(f"QS{i:03d}", rcpts=2)) for i in range(50)))
    batches = await asyncio.gather(
        *(store.claim_due(T0, 7, LEASE, f"node{n}") for n in range(8) for store in (a, b))
    )
    ids = [r.record_id for batch in batches for r in batch]
    assert len(ids) == len(set(ids)) == 100


async def test_a_node_that_lost_its_lease_cannot_overwrite(
    two_nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two_nodes
    await a.commit(message("QFENCE"))
    (stale,) = await a.claim_due(T0, 10, LEASE, "node-a")  # then node A hangs
    (fresh,) = await b.claim_due(T0 + LEASE, 10, LEASE, "node-b")  # B takes over
    deferred = OutcomeUpdate(
        fresh.record_id, fresh.lease_token or "", DeliveryState.DEFERRED, OK_250, T0 + 900, T0
    )
    assert await b.record_outcomes([deferred]) == []
    late = OutcomeUpdate(
        stale.record_id, stale.lease_token or "", DeliveryState.FAILED, OK_250, T0, T0
    )
    assert await a.record_outcomes([late]) == []  # fenced out
    info = await b.get_message("QFENCE")
    assert info is not None and info.records[0].state is DeliveryState.DEFERRED


async def test_large_body_streams_in_its_own_transaction(
    two_nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = two_nodes
    big = os.urandom(5 * 1024 * 1024 + 17)
    await asyncio.gather(a.commit(message("QBIG", big)), a.commit(message("QSMALL")))
    read = b"".join([c async for c in b.read_body("QBIG")])  # the other node
    assert read == big


async def test_database_loss_is_noticed_and_recovered(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    store = PostgresStore(postgres_dsn, create_schema=True, health_interval=0.1)
    try:
        await store.commit(message("QBEFORE"))
        assert store.available
        await asyncio.to_thread(postgres_server.stop)
        with pytest.raises(StoreError):
            await store.commit(message("QDURING"))
        assert not store.available
        await asyncio.to_thread(postgres_server.start)
        for _ in range(200):
            if store.available:
                break
            await asyncio.sleep(0.05)
        assert store.available
        await store.commit(message("QAFTER"))
        listed = [m.queue_id for m in await store.list_messages()]
        assert listed == ["QAFTER", "QBEFORE"]  # the failed commit left nothing
    finally:
        postgres_server.start()
        await store.close()


async def test_message_commits_flush_the_wal_on_a_server_tuned_to_off(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 18, item 9: a server (here: the database) set to ``synchronous_commit =
    off`` must not make a 250 go out before the WAL flush. A trigger records the
    setting in force inside every transaction that inserts a message."""
    setup = PostgresStore(postgres_dsn, create_schema=True, health_interval=0)
    await setup.open()
    await setup.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        await conn.execute(
            """
            CREATE TABLE seen (setting text NOT NULL);
            CREATE FUNCTION note_setting() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO seen VALUES (current_setting('synchronous_commit'));
                RETURN NULL;
            END $$;
            CREATE TRIGGER note AFTER INSERT ON messages
                FOR EACH STATEMENT EXECUTE FUNCTION note_setting();
            """
        )
    finally:
        await conn.close()
    store = PostgresStore(postgres_dsn, clock_now=lambda: T0, health_interval=0)
    with caplog.at_level("WARNING", logger="postillon.queue.postgres_store"):
        await store.open()
    try:
        assert any("synchronous_commit" in r.getMessage() for r in caplog.records)
        await asyncio.gather(*(store.commit(message(f"QSMALL{i}")) for i in range(3)))
        await store.commit(message("QLARGE", os.urandom(2 * 1024 * 1024)))  # streamed alone
        claimed = await store.claim_due(T0, 10, LEASE, "n")  # bookkeeping stays cheap
        assert len(claimed) == 4
    finally:
        await store.close()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        seen = [row[0] for row in await conn.fetch("SELECT setting FROM seen")]
    finally:
        await conn.close()
    assert seen and set(seen) == {"on"}, seen
