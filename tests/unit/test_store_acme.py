"""The ACME certificate and renewal lease (store.py step 8) against every store.

With the contract suite's factories (memory, SQLite, a real PostgreSQL): one holder at a
time, a dead holder's lease taken over once expired, a certificate shared by name set
and never rolled back to one expiring earlier; and two PostgreSQL store objects on one
database (two nodes) race for the lease and only one wins.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_store_contract import STORE_FACTORIES, T0

from postillon.queue.store import QueueStore, SharedCertificate

NAMES = ("mx.example.org", "mta-sts.example.org")


def cert(not_after: float, tag: bytes = b"a") -> SharedCertificate:
    return SharedCertificate(NAMES, b"CHAIN " + tag, b"KEY " + tag, not_after, T0)


@pytest.fixture(
    params=[factory for _, factory in STORE_FACTORIES], ids=[n for n, _ in STORE_FACTORIES]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    s: QueueStore = request.param(tmp_path, request)
    yield s
    await s.close()


async def test_lease_one_holder_at_a_time(store: QueueStore) -> None:
    acme = store.acme
    assert await acme.take_lease("node-a", T0, T0 + 600)
    assert not await acme.take_lease("node-b", T0 + 1, T0 + 601)
    assert await acme.take_lease("node-a", T0 + 2, T0 + 602)  # the holder extends it
    await acme.release_lease("node-b")  # not the holder: no effect
    assert not await acme.take_lease("node-b", T0 + 3, T0 + 603)
    await acme.release_lease("node-a")
    assert await acme.take_lease("node-b", T0 + 4, T0 + 604)


async def test_expired_lease_is_taken_over(store: QueueStore) -> None:
    acme = store.acme
    assert await acme.take_lease("dead-node", T0, T0 + 600)
    assert not await acme.take_lease("node-b", T0 + 599, T0 + 1200)
    assert await acme.take_lease("node-b", T0 + 601, T0 + 1200)


async def test_certificate_shared_by_names_never_rolled_back(store: QueueStore) -> None:
    acme = store.acme
    assert await acme.certificate(NAMES) is None
    await acme.save_certificate(cert(T0 + 1000, b"first"))
    got = await acme.certificate(tuple(reversed(NAMES)))  # any order of the names
    assert got is not None and got.chain_pem == b"CHAIN first" and got.key_pem == b"KEY first"
    await acme.save_certificate(cert(T0 + 500, b"older"))
    got = await acme.certificate(NAMES)
    assert got is not None and got.chain_pem == b"CHAIN first"
    await acme.save_certificate(cert(T0 + 2000, b"newer"))
    got = await acme.certificate(NAMES)
    assert got is not None and got.chain_pem == b"CHAIN newer" and got.not_after == T0 + 2000
    assert await acme.certificate(("other.example.org",)) is None


async def test_two_postgres_nodes_race_for_the_lease(postgres_dsn: str) -> None:
    from postillon.queue.postgres_store import PostgresStore

    a = PostgresStore(postgres_dsn, create_schema=True, health_interval=0)
    b = PostgresStore(postgres_dsn, create_schema=True, health_interval=0)
    try:
        await a.open()
        await b.open()
        won = await asyncio.gather(
            *(s.acme.take_lease(name, T0, T0 + 600) for s, name in ((a, "a"), (b, "b")) * 3)
        )
        assert sorted(set(won)) == [False, True] and won.count(True) == 3  # one node, 3 times
        await a.acme.save_certificate(cert(T0 + 1000))
        shared = await b.acme.certificate(NAMES)
        assert shared is not None and shared.chain_pem == b"CHAIN a"
    finally:
        await a.close()
        await b.close()
