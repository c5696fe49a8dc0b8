"""The queue summary aggregated by the store (store.py step 13, queue/queue_shape.py)
equals the summary computed in Python from every message, as it was before, on a
mixed queue, on every store (PostgreSQL against a real server)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from test_store_contract import T0, TRY_LATER, message, outcome, store  # noqa: F401  (the fixture)

from postillon.admin.queue_ops import AGE_BUCKETS_MINUTES, summarize
from postillon.core.reply import Reply
from postillon.queue.queue_shape import QUEUED_STATES, age_bucket
from postillon.queue.store import DeliveryState, MessageInfo, QueueStore

NOW = T0 + 3 * 86400


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


@dataclass
class _Shape:
    total: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    by_age: list[int] = field(default_factory=lambda: [0] * len(AGE_BUCKETS_MINUTES))
    oldest: float | None = None


def reference_summary(
    messages: list[MessageInfo], counts: dict[str, int], now: float
) -> dict[str, Any]:
    """The summary as postillon computed it before step 13: every message in Python."""
    domains: dict[str, _Shape] = {}
    oldest: MessageInfo | None = None
    queued_recipients = 0
    for info in messages:
        queued = [r for r in info.records if r.state in QUEUED_STATES]
        if not queued:
            continue
        if oldest is None or info.received_at < oldest.received_at:
            oldest = info
        bucket = age_bucket(now - info.received_at, AGE_BUCKETS_MINUTES)
        for r in queued:
            queued_recipients += 1
            shape = domains.setdefault(_domain_of(r.recipient) or "(local)", _Shape())
            shape.total += 1
            shape.by_state[r.state.value] = shape.by_state.get(r.state.value, 0) + 1
            shape.by_age[bucket] += 1
            if shape.oldest is None or info.received_at < shape.oldest:
                shape.oldest = info.received_at
    rows = sorted(domains.items(), key=lambda item: (-item[1].total, item[0]))
    return {
        "messages": len(messages),
        "queued_recipients": queued_recipients,
        "by_state": counts,
        "oldest_age_seconds": round(now - oldest.received_at, 3) if oldest else None,
        "oldest_queue_id": oldest.queue_id if oldest else None,
        "age_buckets_minutes": list(AGE_BUCKETS_MINUTES),
        "by_domain": [
            {
                "domain": name,
                "total": shape.total,
                "by_state": shape.by_state,
                "by_age": shape.by_age,
                "oldest_age_seconds": round(now - shape.oldest, 3) if shape.oldest else None,
            }
            for name, shape in rows
        ],
    }


RECIPIENTS = (
    "a@example.net",
    "B@Example.NET",
    "c@ÉXAMPLE.org",
    "d@éxample.org",
    "postmaster",
    '"x@y"@quoted.example',
    "e@",
    "f@other.example",
)
# Ages in minutes that fall in every bucket, on a bucket's edge and just below it.
AGES = (0, 3, 5, 9.99, 10, 25, 40, 79.5, 200, 320, 700, 1280, 5000, 5000)


async def test_store_shape_equals_the_python_summary(store: QueueStore) -> None:  # noqa: F811
    ids = []
    for i, minutes in enumerate(AGES):
        rcpts = [RECIPIENTS[(i + k) % len(RECIPIENTS)] for k in range(1 + i % 4)]
        m = message(f"Q{i:04d}", rcpts=rcpts, received_at=NOW - minutes * 60)
        await store.commit(m)
        ids.append(m.queue_id)
    # Every state: some leased, deferred, delivered, failed, held.
    leased = await store.claim_due(NOW, 12, 60.0, "node")
    for n, rec in enumerate(leased):
        if n % 4 == 0:
            await store.record_outcomes([outcome(rec, DeliveryState.DEFERRED, next_try=NOW + 60)])
        elif n % 4 == 1:
            await store.record_outcomes([outcome(rec, DeliveryState.DELIVERED)])
        elif n % 4 == 2:
            await store.record_outcomes([outcome(rec, DeliveryState.FAILED)])
    await store.hold(ids[-2], T0 + 2)
    await store.hold(ids[5], T0 + 2)
    messages = await store.list_messages(limit=100_000)
    counts = await store.count_by_state()
    assert {s.value for s in QUEUED_STATES} <= {k for k, v in counts.items() if v}
    expected = reference_summary(messages, counts, NOW)
    shape = await store.shape(NOW, AGE_BUCKETS_MINUTES)
    assert summarize(shape, counts, NOW) == expected
    assert len(expected["by_domain"]) >= 5


async def test_empty_queue_shape(store: QueueStore) -> None:  # noqa: F811
    counts = await store.count_by_state()
    shape = await store.shape(NOW, AGE_BUCKETS_MINUTES)
    assert shape.messages == 0 and not shape.rows and shape.oldest_queue_id is None
    assert summarize(shape, counts, NOW) == reference_summary([], counts, NOW)


async def test_postpone_domain_moves_only_due_records_of_that_domain(
    store: QueueStore,  # noqa: F811
) -> None:
    """Store contract step 14 (queue/postpone.py)."""
    suspended = Reply.of(451, "4.4.5", "Deliveries to dead.example suspended")
    refused = Reply.of(451, "4.4.1", "Connection refused")
    for i in range(5):  # deferred after an attempt, due now
        await store.commit(message(f"D{i}", rcpts=[f"u{i}@Dead.Example"], received_at=NOW - 60))
    await store.commit(message("FRESH", rcpts=["v@dead.example", "w@live.example"]))
    await store.commit(message("OLD", rcpts=["x@dead.example"], received_at=NOW - 6 * 86400))
    await store.commit(message("LIKE", rcpts=["y@notdead.example", "z@dead_example"]))
    await store.commit(message("SOON", rcpts=["s@dead.example"]))  # due during the suspension
    await store.commit(message("LATER", rcpts=["l@dead.example"]))  # due after it
    claimed = await store.claim_due(NOW, 100, 60.0, "node")
    deferred = [r for r in claimed if r.queue_id.startswith("D")]
    for rec in deferred:
        update = outcome(rec, DeliveryState.DEFERRED, reply=refused, next_try=NOW - 1, now=NOW - 2)
        await store.record_outcomes([update])
    due = {"SOON": NOW + 50, "LATER": NOW + 500}
    for rec in claimed:  # the others back, not attempted: due now (or soon, or later)
        if not rec.queue_id.startswith("D"):
            update = outcome(rec, DeliveryState.DEFERRED, next_try=due.get(rec.queue_id, NOW - 1))
            await store.record_outcomes([dataclasses.replace(update, attempted=False)])
    again = await store.claim_due(NOW, 1, 60.0, "other")  # one in flight: left alone
    assert again and again[0].queue_id.startswith("D")
    kwargs = {"spread": 10.0, "expire_before": NOW - 5 * 86400, "reply": suspended}
    first = await store.postpone_domain("dead.example", NOW, NOW + 100, limit=3, **kwargs)
    rest = await store.postpone_domain("dead.example", NOW, NOW + 100, limit=3, **kwargs)
    last = await store.postpone_domain("dead.example", NOW, NOW + 100, limit=3, **kwargs)
    # 4 deferred + FRESH's v@ + SOON; not the leased one, OLD, LIKE, live, LATER
    assert (first, rest, last) == (3, 3, 0)
    records = {r.recipient: r for m in await store.list_messages() for r in m.records}
    for name, rec in records.items():
        moved = name.lower().endswith("@dead.example") and rec.state is not DeliveryState.LEASED
        moved = moved and not name.startswith(("x@", "l@"))
        assert (NOW + 100 <= rec.next_try <= NOW + 110) == moved, name
        if moved:
            assert rec.state is DeliveryState.DEFERRED
            assert rec.attempts == (1 if name.startswith("u") else 0), name
            assert rec.last_reply == (refused if name.startswith("u") else suspended), name
    assert records["x@dead.example"].next_try <= NOW  # expired: left due, to be bounced
