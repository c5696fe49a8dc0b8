"""The queue summary aggregated by the store (store.py step 13, queue/queue_shape.py)
equals the summary computed in Python from every message, as it was before, on a
mixed queue, on every store (PostgreSQL against a real server)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from test_store_contract import T0, message, outcome, store  # noqa: F401  (the fixture)

from postillon.admin.queue_ops import AGE_BUCKETS_MINUTES, summarize
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
