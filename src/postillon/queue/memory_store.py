"""An in-memory ``QueueStore`` for tests: the same semantics, no durability.

It follows ``SqliteStore`` rule for rule (the contract tests run against both):
claims take expired leases first, then due records by ``next_try``; outcomes
are fenced by the lease token; a held record keeps a running lease so its
delivery in flight still lands; complete messages are removed with their
bodies. Every method runs without awaiting, so each is atomic on its event
loop, as a transaction would be.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

from postillon.core.reply import Reply
from postillon.core.sts import CachedPolicy
from postillon.queue.acme_state import MemoryAcmeState
from postillon.queue.policy_state import MemoryPolicyState
from postillon.queue.queue_shape import QueueShape, shape_of
from postillon.queue.shaping_state import MemoryShapingState
from postillon.queue.store import (
    HEALTHY,
    DeliveryRecord,
    DeliveryState,
    EventCount,
    MessageInfo,
    NewMessage,
    OutcomeUpdate,
    QueueEvent,
    StoreError,
    StoreHealth,
)
from postillon.queue.tls_reports import MemoryTlsReports
from postillon.queue.traces import MemoryTraces

__all__ = ["MemoryStore"]

_CHUNK_SIZE = 256 * 1024
_CLAIMABLE = (DeliveryState.PENDING, DeliveryState.DEFERRED)
_RANDOM = random.Random()  # postpone_domain's spread
_OUTCOME_STATES = frozenset({DeliveryState.DELIVERED, DeliveryState.DEFERRED, DeliveryState.FAILED})


@dataclass(slots=True)
class _Message:
    info: MessageInfo  # records left empty; they live in MemoryStore._records
    chunks: list[bytes]
    record_ids: list[int]


def _unleased(rec: DeliveryRecord, now: float) -> DeliveryRecord:
    """Back to PENDING (never tried) or DEFERRED, without a lease."""
    state = DeliveryState.DEFERRED if rec.attempts > 0 else DeliveryState.PENDING
    return replace(
        rec, state=state, lease_token=None, lease_owner=None, lease_expires=None, updated_at=now
    )


def _in_flight(rec: DeliveryRecord, now: float) -> bool:
    return rec.lease_token is not None and rec.lease_expires is not None and rec.lease_expires > now


class MemoryStore:
    def __init__(self, *, clock_now: Callable[[], float] = time.time) -> None:
        self._now = clock_now
        self._messages: dict[str, _Message] = {}
        self._records: dict[int, DeliveryRecord] = {}
        self._next_record_id = 1
        self._events: list[QueueEvent] = []
        self._closed = False
        self._heartbeats: dict[str, float] = {}  # lease owner -> last heartbeat
        self._sts: dict[str, CachedPolicy] = {}  # MTA-STS policy cache by domain
        self.tls_reports = MemoryTlsReports(self._check_open)  # store.py step 7
        self.acme = MemoryAcmeState()  # store.py step 8
        self.traces = MemoryTraces(self._check_open)  # store.py step 9
        self.policy_state = MemoryPolicyState(self._check_open)  # store.py step 10
        self.shaping = MemoryShapingState(self._check_open)  # store.py step 11
        self._priority: dict[int, int] = {}  # record id -> claim priority (highest first)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    async def commit(self, message: NewMessage) -> None:
        self._check_open()
        if not message.recipients:
            raise ValueError("a message needs at least one recipient")
        if message.queue_id in self._messages:
            raise StoreError(f"duplicate queue id {message.queue_id}")
        body = message.body
        if body.seekable():
            body.seek(0)
        chunks = []
        while data := body.read(_CHUNK_SIZE):
            chunks.append(bytes(data))
        now = self._now()
        ids = []
        for r in message.recipients:
            rid = self._next_record_id
            self._next_record_id += 1
            self._priority[rid] = message.priority
            self._records[rid] = DeliveryRecord(
                record_id=rid,
                queue_id=message.queue_id,
                recipient=r.address,
                original_recipient=r.original,
                rcpt_params=r.params,
                state=DeliveryState.HELD if message.held else DeliveryState.PENDING,
                attempts=0,
                next_try=message.received_at,
                last_reply=None,
                lease_token=None,
                lease_owner=None,
                lease_expires=None,
                updated_at=now,
            )
            ids.append(rid)
        info = MessageInfo.envelope_of(message)
        self._messages[message.queue_id] = _Message(info, chunks, ids)

    async def claim_due(
        self, now: float, limit: int, lease_seconds: float, owner: str
    ) -> list[DeliveryRecord]:
        self._check_open()
        if limit <= 0:
            return []
        expired = sorted(
            (
                r
                for r in self._records.values()
                if r.state is DeliveryState.LEASED
                and r.lease_expires is not None
                and r.lease_expires <= now
            ),
            key=lambda r: (r.lease_expires, r.record_id),
        )[:limit]
        due = sorted(
            (r for r in self._records.values() if r.state in _CLAIMABLE and r.next_try <= now),
            key=lambda r: (-self._priority.get(r.record_id, 0), r.next_try, r.record_id),
        )[: limit - len(expired)]
        claimed = []
        for rec in [*expired, *due]:
            new = replace(
                rec,
                state=DeliveryState.LEASED,
                lease_token=secrets.token_hex(8),
                lease_owner=owner,
                lease_expires=now + lease_seconds,
                updated_at=now,
            )
            self._records[rec.record_id] = new
            claimed.append(new)
        return claimed

    async def record_outcomes(self, updates: Sequence[OutcomeUpdate]) -> list[str]:
        self._check_open()
        for u in updates:
            if u.state not in _OUTCOME_STATES:
                raise ValueError(f"not an outcome state: {u.state}")
        touched: set[str] = set()
        for u in updates:
            rec = self._records.get(u.record_id)
            if rec is None or rec.lease_token != u.lease_token:
                continue  # fenced
            if rec.state is DeliveryState.LEASED or (
                rec.state is DeliveryState.HELD and u.state.is_final
            ):
                state = u.state
            elif rec.state is DeliveryState.HELD:
                state = DeliveryState.HELD
            else:
                continue
            if not u.attempted:
                self._records[u.record_id] = replace(
                    rec,
                    state=state,
                    next_try=u.next_try,
                    lease_token=None,
                    lease_owner=None,
                    lease_expires=None,
                    updated_at=u.now,
                )
                touched.add(rec.queue_id)
                continue
            # A retry goes ahead of a bulk backlog (delivery/priority.py).
            self._priority[u.record_id] = max(self._priority.get(u.record_id, 0), 1)
            self._records[u.record_id] = replace(
                rec,
                state=state,
                attempts=rec.attempts + 1,
                next_try=u.next_try if u.state is DeliveryState.DEFERRED else u.now,
                last_reply=u.reply,
                lease_token=None,
                lease_owner=None,
                lease_expires=None,
                updated_at=u.now,
            )
            touched.add(rec.queue_id)
        completed = []
        for queue_id in sorted(touched):
            msg = self._messages[queue_id]
            if all(self._records[rid].state.is_final for rid in msg.record_ids):
                self._remove(queue_id)
                completed.append(queue_id)
        return completed

    async def release_leases(self, owner: str) -> int:
        self._check_open()
        now = self._now()
        count = 0
        for rid, rec in list(self._records.items()):
            if rec.lease_owner != owner:
                continue
            if rec.state is DeliveryState.LEASED:
                self._records[rid] = _unleased(rec, now)
                count += 1
            elif rec.state is DeliveryState.HELD:
                self._records[rid] = replace(
                    rec, lease_token=None, lease_owner=None, lease_expires=None
                )
        return count

    async def heartbeat(self, owner: str, now: float) -> None:
        self._check_open()
        self._heartbeats[owner] = now

    async def release_dead_owners(self, now: float, timeout: float) -> int:
        self._check_open()
        dead = [o for o, at in self._heartbeats.items() if at < now - timeout]
        released = 0
        for owner in dead:
            del self._heartbeats[owner]
            released += await self.release_leases(owner)
        return released

    async def next_due(self) -> float | None:
        self._check_open()
        times = [
            r.next_try
            if r.state in _CLAIMABLE
            else r.lease_expires
            if r.state is DeliveryState.LEASED
            else None
            for r in self._records.values()
        ]
        present = [t for t in times if t is not None]
        return min(present) if present else None

    async def read_body(self, queue_id: str) -> AsyncIterator[bytes]:
        self._check_open()
        msg = self._messages.get(queue_id)
        if msg is None:
            raise KeyError(queue_id)
        for chunk in list(msg.chunks):
            yield chunk

    async def get_message(self, queue_id: str) -> MessageInfo | None:
        self._check_open()
        msg = self._messages.get(queue_id)
        return None if msg is None else self._info(msg)

    async def list_messages(
        self, state: DeliveryState | None = None, limit: int = 1000
    ) -> list[MessageInfo]:
        self._check_open()
        out: list[MessageInfo] = []
        for queue_id in sorted(self._messages):
            if len(out) >= limit:
                break
            info = self._info(self._messages[queue_id])
            if state is None or any(r.state is state for r in info.records):
                out.append(info)
        return out

    async def hold(self, queue_id: str, now: float) -> int:
        self._check_open()
        count = 0
        for rec in self._records_of(queue_id):
            if rec.state in (DeliveryState.PENDING, DeliveryState.DEFERRED, DeliveryState.LEASED):
                self._records[rec.record_id] = replace(
                    rec, state=DeliveryState.HELD, updated_at=now
                )
                count += 1
        return count

    async def release(self, queue_id: str, now: float) -> int:
        self._check_open()
        count = 0
        for rec in self._records_of(queue_id):
            if rec.state is not DeliveryState.HELD:
                continue
            if _in_flight(rec, now):
                new = replace(rec, state=DeliveryState.LEASED, updated_at=now)
            else:
                new = replace(_unleased(rec, now), next_try=now)
            self._records[rec.record_id] = new
            count += 1
        return count

    async def delete(self, queue_id: str) -> bool:
        self._check_open()
        if queue_id not in self._messages:
            return False
        self._remove(queue_id)
        return True

    async def postpone_domain(
        self,
        domain: str,
        now: float,
        until: float,
        *,
        spread: float,
        expire_before: float,
        reply: Reply,
        limit: int,
    ) -> int:
        self._check_open()
        count = 0
        suffix = "@" + domain.lower()
        for rid, rec in list(self._records.items()):
            if count >= limit or rec.state not in _CLAIMABLE or rec.next_try > until:
                continue
            if not rec.recipient.lower().endswith(suffix):
                continue
            if self._messages[rec.queue_id].info.received_at <= expire_before:
                continue
            later = until + spread * _RANDOM.random()
            last = rec.last_reply or reply
            self._records[rid] = replace(
                rec, state=DeliveryState.DEFERRED, next_try=later, last_reply=last, updated_at=now
            )
            count += 1
        return count

    async def flush(self, now: float, queue_id: str | None = None) -> int:
        self._check_open()
        count = 0
        for rid, rec in list(self._records.items()):
            if queue_id is not None and rec.queue_id != queue_id:
                continue
            if rec.state is DeliveryState.DEFERRED:
                self._records[rid] = replace(rec, next_try=min(rec.next_try, now), updated_at=now)
                count += 1
        return count

    async def fail_held(self, queue_id: str, reply: Reply, now: float) -> list[DeliveryRecord]:
        self._check_open()
        failed = []
        for rec in self._records_of(queue_id):
            if rec.state is not DeliveryState.HELD or _in_flight(rec, now):
                continue
            new = replace(
                rec,
                state=DeliveryState.FAILED,
                last_reply=reply,
                next_try=now,
                lease_token=None,
                lease_owner=None,
                lease_expires=None,
                updated_at=now,
            )
            self._records[rec.record_id] = new
            failed.append(new)
        if failed and all(r.state.is_final for r in self._records_of(queue_id)):
            self._remove(queue_id)
        return failed

    async def add_events(self, events: Sequence[QueueEvent]) -> None:
        self._check_open()
        self._events.extend(events)

    async def events(self, queue_id: str, limit: int = 500) -> list[QueueEvent]:
        self._check_open()
        mine = [e for e in self._events if e.queue_id == queue_id]
        mine.sort(key=lambda e: e.at)  # stable: equal times keep insertion order
        return mine[-limit:] if limit > 0 else []

    async def event_counts(self, since: float, bucket: float) -> list[EventCount]:
        self._check_open()
        if bucket <= 0:
            raise ValueError("bucket must be positive")
        counts: dict[tuple[int, str], int] = {}
        for e in self._events:
            if e.at >= since:
                key = (int((e.at - since) // bucket), e.event)
                counts[key] = counts.get(key, 0) + 1
        return [
            EventCount(since + k * bucket, event, n) for (k, event), n in sorted(counts.items())
        ]

    async def prune_events(self, before: float) -> int:
        self._check_open()
        kept = [e for e in self._events if e.at >= before]
        dropped = len(self._events) - len(kept)
        self._events = kept
        return dropped

    async def count_by_state(self) -> dict[str, int]:
        self._check_open()
        counts = {s.value: 0 for s in DeliveryState}
        for rec in self._records.values():
            counts[rec.state.value] += 1
        return counts

    async def shape(self, now: float, buckets_minutes: Sequence[float]) -> QueueShape:
        self._check_open()
        messages = (
            (
                qid,
                m.info.received_at,
                [self._records[i] for i in m.record_ids if i in self._records],
            )
            for qid, m in sorted(self._messages.items())
        )
        return shape_of(messages, now, buckets_minutes)

    async def sts_policy(self, domain: str) -> CachedPolicy | None:
        self._check_open()
        return self._sts.get(domain.lower())

    async def save_sts_policy(self, entry: CachedPolicy) -> None:
        self._check_open()
        key = entry.domain.lower()
        old = self._sts.get(key)
        if old is None or entry.fetched_at >= old.fetched_at:  # never an older fetch
            self._sts[key] = replace(entry, domain=key)

    async def sts_policies(self) -> list[CachedPolicy]:
        self._check_open()
        return [self._sts[d] for d in sorted(self._sts)]

    def health(self) -> StoreHealth:
        if self._closed:
            return StoreHealth(False, "store is closed", recoverable=False)
        return HEALTHY

    async def close(self) -> None:
        self._closed = True

    # ------------------------------------------------------------ helpers

    def _records_of(self, queue_id: str) -> list[DeliveryRecord]:
        msg = self._messages.get(queue_id)
        return [] if msg is None else [self._records[rid] for rid in msg.record_ids]

    def _info(self, msg: _Message) -> MessageInfo:
        return replace(msg.info, records=tuple(self._records[rid] for rid in msg.record_ids))

    def _remove(self, queue_id: str) -> None:
        msg = self._messages.pop(queue_id)
        for rid in msg.record_ids:
            del self._records[rid]
            self._priority.pop(rid, None)
