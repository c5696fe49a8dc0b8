"""MemoryStore and SqliteStore side by side: random operation sequences must give
the same answers and leave the same state (the contract tests pin single rules;
this catches two stores drifting apart in combinations nobody wrote down)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pytest

from postillon.core.envelope import MailParams
from postillon.core.reply import Reply
from postillon.queue.memory_store import MemoryStore
from postillon.queue.postgres_store import PostgresStore
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import (
    DeliveryRecord,
    DeliveryState,
    NewMessage,
    NewRecipient,
    OutcomeUpdate,
    QueueStore,
)

T0 = 1_800_000_000.0
REPLIES = {
    DeliveryState.DELIVERED: Reply.of(250, "2.0.0", "Ok"),
    DeliveryState.DEFERRED: Reply.of(451, "4.4.1", "Later"),
    DeliveryState.FAILED: Reply.of(550, "5.1.1", "No such user"),
}

Key = tuple[str, str]  # (queue id, recipient): record ids may differ between stores


def norm(rec: DeliveryRecord) -> tuple[Any, ...]:
    return (
        rec.queue_id,
        rec.recipient,
        rec.state,
        rec.attempts,
        rec.next_try,
        rec.last_reply,
        rec.lease_owner,
        rec.lease_expires,
        rec.lease_token is not None,
    )


class Side:
    """One store plus what its runner knows: the lease it was handed per record."""

    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self.leases: dict[Key, list[DeliveryRecord]] = {}  # every lease ever handed out

    async def snapshot(self) -> tuple[Any, ...]:
        messages = await self.store.list_messages(limit=10_000)
        return (
            [(m.queue_id, [norm(r) for r in m.records]) for m in messages],
            await self.store.count_by_state(),
            await self.store.next_due(),
        )


async def apply(side: Side, op: tuple[Any, ...]) -> Any:
    s = side.store
    kind = op[0]
    if kind == "commit":
        _, qid, rcpts, received_at = op
        body = qid.encode() * 3
        await s.commit(
            NewMessage(
                queue_id=qid,
                sender="s@example.org",
                mail_params=MailParams(),
                recipients=[NewRecipient(r) for r in rcpts],
                body=io.BytesIO(body),
                size=len(body),
                received_at=received_at,
            )
        )
        return None
    if kind == "claim":
        _, now, limit, lease, owner = op
        claimed = await s.claim_due(now, limit, lease, owner)
        for rec in claimed:
            side.leases.setdefault((rec.queue_id, rec.recipient), []).append(rec)
        return [norm(r) for r in claimed]
    if kind == "outcome":
        _, picks, now = op
        updates = []
        for key, generation, state, delay in picks:
            leases = side.leases.get(key, [])
            if not leases:
                continue
            rec = leases[min(generation, len(leases) - 1)]  # possibly a stale lease
            updates.append(
                OutcomeUpdate(
                    rec.record_id, rec.lease_token or "", state, REPLIES[state], now + delay, now
                )
            )
        return await s.record_outcomes(updates)
    if kind == "release_leases":
        return await s.release_leases(op[1])
    if kind == "hold":
        return await s.hold(op[1], op[2])
    if kind == "release":
        return await s.release(op[1], op[2])
    if kind == "delete":
        return await s.delete(op[1])
    if kind == "flush":
        return await s.flush(op[1])
    raise AssertionError(kind)


def random_ops(rng: random.Random, count: int) -> list[tuple[Any, ...]]:
    ops: list[tuple[Any, ...]] = []
    now = T0
    qids: list[str] = []
    keys: list[Key] = []
    for n in range(count):
        now += rng.choice([0, 0, 1, 5, 30, 90])
        roll = rng.random()
        if roll < 0.25 or not qids:
            qid = f"Q{n:04d}"
            rcpts = [f"r{i}@example.net" for i in range(rng.randint(1, 3))]
            qids.append(qid)
            keys += [(qid, r) for r in rcpts]
            ops.append(("commit", qid, rcpts, now + rng.choice([-10, 0, 0, 20])))
        elif roll < 0.45:
            ops.append(("claim", now, rng.randint(1, 4), rng.choice([30, 60]), rng.choice("ab")))
        elif roll < 0.70:
            picks = [
                (
                    rng.choice(keys),
                    rng.choice([0, 1, 5]),
                    rng.choice(list(REPLIES)),
                    rng.choice([10, 60, 300]),
                )
                for _ in range(rng.randint(1, 4))
            ]
            ops.append(("outcome", picks, now))
        elif roll < 0.76:
            ops.append(("release_leases", rng.choice("ab")))
        elif roll < 0.84:
            ops.append(("hold", rng.choice(qids), now))
        elif roll < 0.92:
            ops.append(("release", rng.choice(qids), now))
        elif roll < 0.96:
            ops.append(("delete", rng.choice(qids)))
        else:
            ops.append(("flush", now))
    return ops


@pytest.mark.parametrize("seed", range(25))
async def test_memory_and_sqlite_agree(seed: int, tmp_path: Path) -> None:
    memory = Side(MemoryStore(clock_now=lambda: T0))
    sqlite = Side(SqliteStore(tmp_path / "queue.db", clock_now=lambda: T0))
    try:
        for step, op in enumerate(random_ops(random.Random(seed), 120)):
            got_memory = await apply(memory, op)
            got_sqlite = await apply(sqlite, op)
            context = f"seed {seed}, step {step}: {op}"
            assert got_memory == got_sqlite, context
            assert await memory.snapshot() == await sqlite.snapshot(), context
        # the bodies that are left are the same too
        for info in await memory.store.list_messages(limit=10_000):
            want = b"".join([c async for c in memory.store.read_body(info.queue_id)])
            assert b"".join([c async for c in sqlite.store.read_body(info.queue_id)]) == want
    finally:
        await memory.store.close()
        await sqlite.store.close()


@pytest.mark.parametrize("seed", range(8))
async def test_memory_and_postgresql_agree(seed: int, postgres_dsn: str) -> None:
    """The same random sequences against the PostgreSQL store (a real server)."""
    memory = Side(MemoryStore(clock_now=lambda: T0))
    postgres = Side(
        PostgresStore(postgres_dsn, clock_now=lambda: T0, create_schema=True, health_interval=0)
    )
    try:
        for step, op in enumerate(random_ops(random.Random(seed), 120)):
            got_memory = await apply(memory, op)
            got_postgres = await apply(postgres, op)
            context = f"seed {seed}, step {step}: {op}"
            assert got_memory == got_postgres, context
            assert await memory.snapshot() == await postgres.snapshot(), context
        for info in await memory.store.list_messages(limit=10_000):
            want = b"".join([c async for c in memory.store.read_body(info.queue_id)])
            got = b"".join([c async for c in postgres.store.read_body(info.queue_id)])
            assert got == want
    finally:
        await memory.store.close()
        await postgres.store.close()
