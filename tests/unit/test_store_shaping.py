"""Store contract steps 8 and 9 (queue/store.py) against every store: suspensions,
rate buckets and the claim order by priority. PostgreSQL runs against a real server."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_store_contract import T0, message, store  # noqa: F401  (the fixture)

from postillon.core.reply import Reply
from postillon.queue.shaping_state import Suspension, bucket_take
from postillon.queue.store import DeliveryState, OutcomeUpdate, QueueStore


async def test_suspend_lists_and_resume(store: QueueStore) -> None:  # noqa: F811
    s = Suspension("mx:.provider.example", T0, T0 + 60, "mx1 said 421 slow down", 1, False)
    await store.shaping.suspend(s)
    await store.shaping.suspend(Suspension("example.org", T0, T0 + 10, "operator", 0, True))
    assert [x.destination for x in await store.shaping.suspensions(T0)] == [
        "example.org",
        "mx:.provider.example",
    ]
    assert await store.shaping.suspensions(T0 + 30) == [s]  # example.org has ended
    assert await store.shaping.last_suspension("example.org") is not None  # kept for its level
    again = replace(s, until=T0 + 180, level=2)
    await store.shaping.suspend(again)  # replaces
    assert await store.shaping.last_suspension(s.destination) == again
    assert await store.shaping.resume(s.destination)
    assert not await store.shaping.resume(s.destination)
    assert await store.shaping.suspensions(T0) == [
        Suspension("example.org", T0, T0 + 10, "operator", 0, True)
    ]


async def test_bucket_spaces_tokens_at_the_rate(store: QueueStore) -> None:  # noqa: F811
    take = store.shaping.take
    first = await take("rate:a", rate=2.0, burst=1.0, now=T0, max_wait=1.0)
    assert first.granted and first.wait == 0
    second = await take("rate:a", rate=2.0, burst=1.0, now=T0, max_wait=1.0)
    assert second.granted and second.wait == pytest.approx(0.5)
    third = await take("rate:a", rate=2.0, burst=1.0, now=T0, max_wait=1.0)
    assert third.granted and third.wait == pytest.approx(1.0)
    fourth = await take("rate:a", rate=2.0, burst=1.0, now=T0, max_wait=1.0)
    assert not fourth.granted and fourth.wait == pytest.approx(0.5)
    later = await take("rate:a", rate=2.0, burst=1.0, now=T0 + 1.5, max_wait=1.0)
    assert later.granted and later.wait == pytest.approx(0.0)
    other = await take("rate:b", rate=2.0, burst=1.0, now=T0, max_wait=1.0)
    assert other.granted and other.wait == 0  # buckets are independent


def test_bucket_step_never_exceeds_the_burst() -> None:
    grant, after = bucket_take(0.0, T0, rate=1.0, burst=3.0, now=T0 + 100, max_wait=0)
    assert grant.granted and after == 2.0


async def test_claim_takes_the_highest_priority_first(store: QueueStore) -> None:  # noqa: F811
    bulk = [message(received_at=T0 + i) for i in range(20)]
    for m in bulk:
        await store.commit(m)
    urgent = replace(message(received_at=T0 + 50), priority=3)
    await store.commit(urgent)
    claimed = await store.claim_due(T0 + 100, 1, 60, "me")
    assert [r.queue_id for r in claimed] == [urgent.queue_id]
    # The rest come in next_try order.
    claimed = await store.claim_due(T0 + 100, 3, 60, "me")
    assert [r.queue_id for r in claimed] == [m.queue_id for m in bulk[:3]]


async def test_a_retry_goes_ahead_of_the_bulk_backlog(store: QueueStore) -> None:  # noqa: F811
    old = message(received_at=T0)
    await store.commit(old)
    (record,) = await store.claim_due(T0, 1, 60, "me")
    assert record.lease_token is not None
    reply = Reply.of(451, "4.4.1", "try later")
    await store.record_outcomes(
        [
            OutcomeUpdate(
                record.record_id,
                record.lease_token,
                DeliveryState.DEFERRED,
                reply,
                T0 + 600,
                T0 + 1,
            )
        ]
    )
    for i in range(10):  # a backlog that arrived meanwhile, all due before the retry
        await store.commit(message(received_at=T0 + 10 + i))
    claimed = await store.claim_due(T0 + 700, 1, 60, "me")
    assert [r.queue_id for r in claimed] == [old.queue_id]
