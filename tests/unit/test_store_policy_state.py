"""Greylisting, shared rate counters and DMARC report counters (store.py step 8) against
every store (memory, SQLite, a real PostgreSQL), plus two store objects on one database
(two nodes) for each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_store_contract import STORE_FACTORIES, T0

from postillon.core.dmarc import AuthResult, DmarcResultCount, PublishedPolicy
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import GreylistPolicy, QueueStore, RateRequest

POLICY = GreylistPolicy(delay=300, expiry=86400, auto_allow_after=2)
NET = "192.0.2.0/24"
DAY = "2027-01-15"


@pytest.fixture(
    params=[factory for _, factory in STORE_FACTORIES], ids=[n for n, _ in STORE_FACTORIES]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    s: QueueStore = request.param(tmp_path, request)
    yield s
    await s.close()


# -- greylisting ---------------------------------------------------------------


async def test_greylist_first_attempt_early_retry_then_pass(store: QueueStore) -> None:
    grey = store.policy_state.greylist
    assert (await grey.peek(NET, "a@example.net", "b@example.org", T0, POLICY)).status == "new"
    first = await grey.check(NET, "a@example.net", "b@example.org", T0, POLICY)
    assert (first.status, first.allowed, first.retry_in) == ("new", False, 300)
    early = await grey.check(NET, "A@example.net", "b@EXAMPLE.org", T0 + 100, POLICY)
    assert (early.status, early.retry_in) == ("early", 200)  # the clock did not restart
    peeked = await grey.peek(NET, "a@example.net", "b@example.org", T0 + 301, POLICY)
    assert peeked.status == "passed"  # what check would say; peek records nothing:
    passed = await grey.check(NET, "a@example.net", "b@example.org", T0 + 301, POLICY)
    assert passed.status == "passed" and passed.allowed
    again = await grey.check(NET, "a@example.net", "b@example.org", T0 + 5000, POLICY)
    assert again.status == "known"
    # Another triplet of the same client is still greylisted (one pass < auto_allow_after).
    other = await grey.check(NET, "a@example.net", "c@example.org", T0 + 5000, POLICY)
    assert other.status == "new"


async def test_greylist_auto_allows_a_client_after_n_passes_and_expires(store: QueueStore) -> None:
    grey = store.policy_state.greylist
    for rcpt in ("x@example.org", "y@example.org"):
        assert (await grey.check(NET, "", rcpt, T0, POLICY)).status == "new"
        assert (await grey.check(NET, "", rcpt, T0 + 300, POLICY)).status == "passed"
    fresh = await grey.check(NET, "", "z@example.org", T0 + 400, POLICY)
    assert fresh.status == "client-allowed"
    assert (await grey.check("198.51.100.0/24", "", "z@example.org", T0, POLICY)).status == "new"
    # Unseen for longer than expiry: the client and its triplets are forgotten.
    later = T0 + 400 + POLICY.expiry + 1
    assert (await grey.check(NET, "", "x@example.org", later, POLICY)).status == "new"
    assert await grey.prune(later) >= 1


async def test_greylist_recent_passes_are_read_only_and_old_ones_refresh(
    store: QueueStore,
) -> None:
    """A pass seen within refresh_after is answered without a write (last_seen stays),
    one seen longer ago is written again (last_seen moves), so expiry counts from it."""
    grey = store.policy_state.greylist
    policy = GreylistPolicy(delay=10, expiry=100, auto_allow_after=0)  # refresh after 10 s
    await grey.check(NET, "", "r@x.org", T0, policy)
    assert (await grey.check(NET, "", "r@x.org", T0 + 10, policy)).status == "passed"
    assert (await grey.check(NET, "", "r@x.org", T0 + 15, policy)).status == "known"  # read only
    # Seen last (in the store) at T0+10: at T0+105 it is under expiry (95 s) and refreshed ...
    assert (await grey.check(NET, "", "r@x.org", T0 + 105, policy)).status == "known"
    # ... so at T0+200 it is still known (95 s after the refresh), not new.
    assert (await grey.check(NET, "", "r@x.org", T0 + 200, policy)).status == "known"
    # Without a visit for longer than expiry it is new again.
    assert (await grey.check(NET, "", "r@x.org", T0 + 400, policy)).status == "new"


async def test_greylist_concurrent_first_attempts_agree(store: QueueStore) -> None:
    grey = store.policy_state.greylist
    results = await asyncio.gather(
        *(grey.check(NET, "s@example.net", "r@example.org", T0, POLICY) for _ in range(6))
    )
    assert {r.status for r in results} <= {"new", "early"}
    assert (await grey.check(NET, "s@example.net", "r@example.org", T0 + 300, POLICY)).allowed


# -- rate counters -------------------------------------------------------------


def req(counter: str, limit: int, amount: int = 1, window: int = 3600) -> RateRequest:
    return RateRequest(counter, window, amount, limit)


async def test_rate_counters_are_all_or_nothing_per_window(store: QueueStore) -> None:
    rates = store.policy_state.rates
    for _ in range(3):
        assert await rates.take([req("ip/a", 3), req("dom/x", 10)], T0) is None
    assert await rates.take([req("dom/x", 10), req("ip/a", 3)], T0) == 1  # ip/a is full
    assert await rates.used("dom/x", 3600, T0) == 3  # nothing counted for the refusal
    assert await rates.take([req("ip/a", 5, amount=3)], T0) == 0  # 3 + 3 > 5
    assert await rates.take([req("ip/a", 5, amount=2)], T0) is None  # 3 + 2 = 5: fits
    # The next window starts at zero; prune drops the ended one.
    nxt = T0 - T0 % 3600 + 3600
    assert await rates.take([req("ip/a", 3)], nxt) is None
    assert await rates.prune(nxt) == 2
    assert await rates.used("ip/a", 3600, nxt) == 1
    assert await rates.used("ip/a", 3600, T0) == 0  # pruned


# -- DMARC report counters -----------------------------------------------------


def dmarc_row(ip: str = "192.0.2.1", count: int = 1, day: str = DAY) -> DmarcResultCount:
    return DmarcResultCount(
        day,
        "Example.NET",
        PublishedPolicy("example.net", p="reject", sp="reject"),
        ip,
        "example.net",
        "example.net",
        "example.org",
        "reject",
        "fail",
        "pass",
        (AuthResult("example.net", "fail", "sel"),),
        (AuthResult("example.net", "pass", "mfrom"),),
        count,
    )


async def test_dmarc_counters_add_claim_and_prune(store: QueueStore) -> None:
    reports = store.policy_state.dmarc_reports
    await reports.add([dmarc_row(), dmarc_row(count=2), dmarc_row("192.0.2.9")])
    await reports.add([dmarc_row(count=4), dmarc_row(day="2027-01-14")])
    rows = await reports.day(DAY, "example.net")
    assert [(r.source_ip, r.count) for r in rows] == [("192.0.2.1", 7), ("192.0.2.9", 1)]
    assert rows[0].dkim_results == (AuthResult("example.net", "fail", "sel"),)
    assert rows[0].policy_domain == "example.net"
    assert await reports.claim(DAY, "example.net", "a", T0)
    assert not await reports.claim(DAY, "EXAMPLE.net", "b", T0)
    assert await reports.prune(DAY) == 1
    assert await reports.day("2027-01-14") == []


# -- two nodes -----------------------------------------------------------------


async def test_two_sqlite_store_objects_share_greylist_and_counters(tmp_path: Path) -> None:
    a = SqliteStore(tmp_path / "queue.db")
    b = SqliteStore(tmp_path / "queue.db")
    try:
        assert (await a.policy_state.greylist.check(NET, "", "r@x.org", T0, POLICY)).status == "new"
        assert (await b.policy_state.greylist.check(NET, "", "r@x.org", T0 + 300, POLICY)).allowed
        await asyncio.gather(
            *(s.policy_state.rates.take([req("ip/a", 100)], T0) for s in (a, b) for _ in range(5))
        )
        assert await a.policy_state.rates.used("ip/a", 3600, T0) == 10
    finally:
        await a.close()
        await b.close()


async def test_two_postgres_nodes_share_greylist_and_counters(postgres_dsn: str) -> None:
    from postillon.queue.postgres_store import PostgresStore

    a = PostgresStore(postgres_dsn, create_schema=True, health_interval=0)
    b = PostgresStore(postgres_dsn, create_schema=True, health_interval=0)
    try:
        await a.open()
        await b.open()
        assert (await a.policy_state.greylist.check(NET, "", "r@x.org", T0, POLICY)).status == "new"
        assert (await b.policy_state.greylist.check(NET, "", "r@x.org", T0 + 300, POLICY)).allowed
        refused = await asyncio.gather(
            *(s.policy_state.rates.take([req("ip/a", 7)], T0) for s in (a, b) for _ in range(5))
        )
        assert refused.count(None) == 7  # exactly the limit, across both nodes
        assert await b.policy_state.rates.used("ip/a", 3600, T0) == 7
    finally:
        await a.close()
        await b.close()
