"""The TLS reporting counters (store.py step 7, RFC 8460) against every store.

Run with the contract suite's store factories (memory, SQLite, a real PostgreSQL), so
the three behave the same: adds add up (within a batch, across batches, across two
store objects on one database = two nodes), days and domains stay apart, a report is
claimed once, old days are pruned, and SQLite keeps the counts across reopening.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_store_contract import STORE_FACTORIES, T0

from postillon.core.tlsrpt import TlsResultCount
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import QueueStore

DAY = "2027-01-15"
TLSA = ("3 1 1 " + "ab" * 32,)


def ok(domain: str = "example.net", count: int = 1, day: str = DAY) -> TlsResultCount:
    return TlsResultCount(day, domain, "tlsa", TLSA, "success", count=count)


def failed(mx: str = "mx1.example.net", count: int = 1) -> TlsResultCount:
    return TlsResultCount(
        DAY,
        "example.net",
        "tlsa",
        TLSA,
        "validation-failure",
        mx,
        "192.0.2.1",
        "198.51.100.7",
        "tlsa-mismatch",
        count,
    )


@pytest.fixture(
    params=[factory for _, factory in STORE_FACTORIES], ids=[n for n, _ in STORE_FACTORIES]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    s: QueueStore = request.param(tmp_path, request)
    yield s
    await s.close()


async def test_counts_add_up_within_and_across_batches(store: QueueStore) -> None:
    reports = store.tls_reports
    assert await reports.day(DAY) == []
    await reports.add([ok(), ok(count=2), failed()])  # one counter named twice in a batch
    await reports.add([ok(count=4), failed(count=3), failed("mx2.example.net")])
    rows = await reports.day(DAY)
    assert sorted((r.result, r.mx_host, r.count) for r in rows) == [
        ("success", "", 7),
        ("validation-failure", "mx1.example.net", 4),
        ("validation-failure", "mx2.example.net", 1),
    ]
    # Every field comes back as written (policy strings, IPs, postillon's label).
    assert failed(count=4) in rows


async def test_days_and_domains_stay_apart_and_domains_are_case_blind(store: QueueStore) -> None:
    reports = store.tls_reports
    await reports.add([ok("Example.NET"), ok("other.example"), ok(day="2027-01-16")])
    assert [(r.policy_domain, r.count) for r in await reports.day(DAY)] == [
        ("example.net", 1),
        ("other.example", 1),
    ]
    assert await reports.day(DAY, "EXAMPLE.net") == [ok()]
    assert await reports.day("2027-01-16") == [ok(day="2027-01-16")]
    await reports.add([])  # nothing to do, no error
    await reports.add([ok(count=0)])  # a zero count creates nothing
    assert await reports.day(DAY, "example.net") == [ok()]


async def test_policy_strings_are_part_of_the_counter(store: QueueStore) -> None:
    """A TLSA rotation mid-day is two policies in the report (RFC 8460 §4.4: one
    entry per policy), so two counters; a large record (matching type 0) fits."""
    full = ("3 0 0 " + "cd" * 1500,)
    await store.tls_reports.add([ok(), TlsResultCount(DAY, "example.net", "tlsa", full, "success")])
    rows = await store.tls_reports.day(DAY)
    assert sorted(r.policy_strings for r in rows) == sorted([TLSA, full])


async def test_a_report_is_claimed_once(store: QueueStore) -> None:
    reports = store.tls_reports
    assert await reports.claim(DAY, "example.net", "node-a", T0)
    assert not await reports.claim(DAY, "EXAMPLE.net", "node-b", T0 + 1)
    assert await reports.claim(DAY, "other.example", "node-b", T0)
    assert await reports.claim("2027-01-16", "example.net", "node-a", T0)


async def test_concurrent_claims_have_one_winner(store: QueueStore) -> None:
    results = await asyncio.gather(
        *(store.tls_reports.claim(DAY, "example.net", f"node-{i}", T0) for i in range(8))
    )
    assert results.count(True) == 1


async def test_prune_drops_older_days_and_their_claims(store: QueueStore) -> None:
    reports = store.tls_reports
    await reports.add([ok(day="2027-01-14"), failed(), ok(day="2027-01-16")])
    await reports.claim("2027-01-14", "example.net", "n", T0)
    assert await reports.prune(DAY) == 1
    assert await reports.day("2027-01-14") == []
    assert len(await reports.day(DAY)) == 1
    assert len(await reports.day("2027-01-16")) == 1
    assert await reports.claim("2027-01-14", "example.net", "n", T0)  # its claim went too


async def test_two_nodes_on_one_sqlite_queue_add_to_the_same_counter(tmp_path: Path) -> None:
    """Two store objects on one file (two processes of a node, or a restart): counts
    add up and survive closing."""
    a = SqliteStore(tmp_path / "queue.db")
    b = SqliteStore(tmp_path / "queue.db")
    try:
        await asyncio.gather(a.tls_reports.add([ok(count=2)]), b.tls_reports.add([ok(count=3)]))
    finally:
        await a.close()
        await b.close()
    reopened = SqliteStore(tmp_path / "queue.db")
    try:
        assert await reopened.tls_reports.day(DAY) == [ok(count=5)]
    finally:
        await reopened.close()


async def test_two_postgres_nodes_add_to_the_same_counter(postgres_dsn: str) -> None:
    from postillon.queue.postgres_store import PostgresStore

    a = PostgresStore(postgres_dsn, create_schema=True, health_interval=0)
    b = PostgresStore(postgres_dsn, create_schema=True, health_interval=0)
    try:
        await a.open()
        await b.open()
        await asyncio.gather(
            *(s.tls_reports.add([ok(), failed()]) for s in (a, b) for _ in range(5))
        )
        rows = await a.tls_reports.day(DAY)
        assert sorted((r.result, r.count) for r in rows) == [
            ("success", 10),
            ("validation-failure", 10),
        ]
    finally:
        await a.close()
        await b.close()
