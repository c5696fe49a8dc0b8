"""The queue store contract (store.py), run against every store.

A new store joins by adding a factory to ``STORE_FACTORIES``. The PostgreSQL
store runs against a real server (``tests/support/postgres_fixtures.py``), one fresh
database per test; the fixture fails (not skips) when PostgreSQL is missing. Times are explicit
numbers near T0: no test sleeps or reads the clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from postillon.core.envelope import BodyType, DsnRet, MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.queue.memory_store import MemoryStore
from postillon.queue.postgres_store import PostgresStore
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import (
    DeliveryRecord,
    DeliveryState,
    EventCount,
    NewMessage,
    NewRecipient,
    OutcomeUpdate,
    QueueEvent,
    QueueStore,
)

T0 = 1_800_000_000.0
LEASE = 60.0
OK_250 = Reply.of(250, "2.0.0", "Ok: queued as X")
TRY_LATER = Reply.of(451, "4.4.1", "Try again later")
NO_SUCH_USER = Reply.of(550, "5.1.1", "No such user")


def _memory(tmp_path: Path, request: pytest.FixtureRequest) -> QueueStore:
    return MemoryStore(clock_now=lambda: T0)


def _sqlite(tmp_path: Path, request: pytest.FixtureRequest) -> QueueStore:
    return SqliteStore(tmp_path / "queue.db", clock_now=lambda: T0)


def _postgres(tmp_path: Path, request: pytest.FixtureRequest) -> QueueStore:
    dsn = request.getfixturevalue("postgres_dsn")
    return PostgresStore(dsn, clock_now=lambda: T0, create_schema=True, health_interval=0)


STORE_FACTORIES: list[tuple[str, Callable[[Path, pytest.FixtureRequest], QueueStore]]] = [
    ("memory", _memory),
    ("sqlite", _sqlite),
    ("postgresql", _postgres),
]


@pytest.fixture(
    params=[factory for _, factory in STORE_FACTORIES], ids=[n for n, _ in STORE_FACTORIES]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    s: QueueStore = request.param(tmp_path, request)
    yield s
    await s.close()


_counter = iter(range(1, 1_000_000))


def message(
    queue_id: str | None = None,
    *,
    rcpts: Sequence[str | NewRecipient] = ("rcpt@example.net",),
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    received_at: float = T0,
    sender: str = "sender@example.org",
    mail_params: MailParams | None = None,
) -> NewMessage:
    return NewMessage(
        queue_id=queue_id or f"Q{next(_counter):08d}",
        sender=sender,
        mail_params=mail_params or MailParams(),
        recipients=[r if isinstance(r, NewRecipient) else NewRecipient(r) for r in rcpts],
        body=io.BytesIO(body),
        size=len(body),
        received_at=received_at,
        client="mx.example.org (mx.example.org) [192.0.2.1]",
        source="smtp",
    )


async def body_of(store: QueueStore, queue_id: str) -> bytes:
    return b"".join([chunk async for chunk in store.read_body(queue_id)])


def outcome(
    rec: DeliveryRecord,
    state: DeliveryState,
    *,
    reply: Reply | None = None,
    next_try: float = 0.0,
    now: float = T0,
    token: str | None = None,
) -> OutcomeUpdate:
    if reply is None:
        reply = {DeliveryState.DELIVERED: OK_250, DeliveryState.DEFERRED: TRY_LATER}.get(
            state, NO_SUCH_USER
        )
    return OutcomeUpdate(
        record_id=rec.record_id,
        lease_token=token if token is not None else (rec.lease_token or ""),
        state=state,
        reply=reply,
        next_try=next_try,
        now=now,
    )


async def states(store: QueueStore, queue_id: str) -> list[DeliveryState]:
    info = await store.get_message(queue_id)
    assert info is not None
    return [r.state for r in info.records]


# ---------------------------------------------------------------- commit and read back


async def test_requiretls_flags_kept(store: QueueStore) -> None:
    """RFC 8689: a message's REQUIRETLS (and TLS-Required: No) stays with it in the
    queue, on every store, so a restart or another node relays it the same way."""
    for qid, params in [
        ("QRTLS1", MailParams(requiretls=True, smtputf8=True)),
        ("QRTLS2", MailParams(tls_required_no=True)),
        ("QRTLS3", MailParams()),
    ]:
        await store.commit(message(qid, mail_params=params, sender=""))
        info = await store.get_message(qid)
        assert info is not None
        assert info.mail_params == params


async def test_commit_then_get_message(store: QueueStore) -> None:
    params = MailParams(
        size=1234, body=BodyType.EIGHT_BIT_MIME, smtputf8=True, ret=DsnRet.HDRS, envid="env-1"
    )
    rcpts = [
        NewRecipient("a@example.net"),
        NewRecipient(
            "b@example.net",
            RcptParams(notify=frozenset({"FAILURE", "DELAY"}), orcpt="rfc822;B@example.net"),
            original="alias@example.net",
        ),
        NewRecipient("ü@exämple.net"),
    ]
    msg = message("QCOMMIT1", rcpts=rcpts, mail_params=params, sender="")
    await store.commit(msg)

    info = await store.get_message("QCOMMIT1")
    assert info is not None
    assert (info.queue_id, info.sender, info.mail_params) == ("QCOMMIT1", "", params)
    assert (info.size, info.received_at) == (msg.size, T0)
    assert (info.client, info.source) == (msg.client, msg.source)
    assert [r.recipient for r in info.records] == [
        "a@example.net",
        "b@example.net",
        "ü@exämple.net",
    ]
    b = info.records[1]
    assert b.original_recipient == "alias@example.net"
    assert b.rcpt_params == rcpts[1].params
    assert info.records[0].rcpt_params == RcptParams()
    assert len({r.record_id for r in info.records}) == 3
    for r in info.records:
        assert r.queue_id == "QCOMMIT1"
        assert r.state is DeliveryState.PENDING
        assert r.attempts == 0
        assert r.next_try == T0  # due at once
        assert r.last_reply is None
        assert (r.lease_token, r.lease_owner, r.lease_expires) == (None, None, None)


async def test_get_unknown_message_is_none(store: QueueStore) -> None:
    assert await store.get_message("NOPE") is None


async def test_list_messages_in_queue_id_order_with_filter_and_limit(store: QueueStore) -> None:
    for qid in ("QLIST3", "QLIST1", "QLIST2"):
        await store.commit(message(qid))
    listed = await store.list_messages()
    assert [m.queue_id for m in listed] == ["QLIST1", "QLIST2", "QLIST3"]
    assert all(len(m.records) == 1 for m in listed)
    assert [m.queue_id for m in await store.list_messages(limit=2)] == ["QLIST1", "QLIST2"]

    await store.hold("QLIST2", T0)
    held = await store.list_messages(DeliveryState.HELD)
    assert [m.queue_id for m in held] == ["QLIST2"]
    assert [m.queue_id for m in await store.list_messages(DeliveryState.PENDING)] == [
        "QLIST1",
        "QLIST3",
    ]
    assert await store.list_messages(DeliveryState.FAILED) == []


async def test_commit_needs_a_recipient(store: QueueStore) -> None:
    with pytest.raises(ValueError):
        await store.commit(message("QNORCPT", rcpts=()))
    assert await store.get_message("QNORCPT") is None


async def test_duplicate_queue_id_fails_and_keeps_the_first(store: QueueStore) -> None:
    await store.commit(message("QDUP", body=b"first"))
    with pytest.raises(Exception):  # noqa: B017 - each store has its own error type
        await store.commit(message("QDUP", body=b"second", rcpts=("x@example.net", "y@y.net")))
    info = await store.get_message("QDUP")
    assert info is not None and len(info.records) == 1
    assert await body_of(store, "QDUP") == b"first"


# ---------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    "size", [0, 1, 1000, 256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 3 * 1024 * 1024]
)
async def test_body_round_trip(store: QueueStore, size: int) -> None:
    body = os.urandom(size)
    await store.commit(message("QBODY", body=body))
    chunks = [chunk async for chunk in store.read_body("QBODY")]
    assert b"".join(chunks) == body
    assert all(chunks), "no empty chunks"
    info = await store.get_message("QBODY")
    assert info is not None and info.size == size


async def test_body_is_read_from_the_start(store: QueueStore) -> None:
    msg = message("QSEEK", body=b"0123456789")
    msg.body.read(4)  # e.g. a retried commit after the first attempt failed
    await store.commit(msg)
    assert await body_of(store, "QSEEK") == b"0123456789"
    assert not msg.body.closed  # the store does not close the caller's file


async def test_body_of_unknown_message_raises_keyerror(store: QueueStore) -> None:
    with pytest.raises(KeyError):
        await body_of(store, "NOPE")


async def test_body_reads_run_side_by_side(store: QueueStore) -> None:
    await store.commit(message("QTWO", body=b"x" * 600_000))
    first, second = await asyncio.gather(body_of(store, "QTWO"), body_of(store, "QTWO"))
    assert first == second == b"x" * 600_000


# ---------------------------------------------------------------- claiming


async def test_claim_respects_next_try(store: QueueStore) -> None:
    await store.commit(message("QLATER", received_at=T0 + 100))
    assert await store.claim_due(T0, 10, LEASE, "runner") == []
    claimed = await store.claim_due(T0 + 100, 10, LEASE, "runner")
    assert [r.queue_id for r in claimed] == ["QLATER"]
    r = claimed[0]
    assert r.state is DeliveryState.LEASED
    assert r.lease_owner == "runner"
    assert r.lease_expires == T0 + 100 + LEASE
    assert r.lease_token and len(r.lease_token) == 16
    assert await states(store, "QLATER") == [DeliveryState.LEASED]


async def test_claim_respects_limit_and_order(store: QueueStore) -> None:
    for i in range(5):
        await store.commit(message(f"QORD{i}", received_at=T0 - i))  # QORD4 oldest
    assert await store.claim_due(T0, 0, LEASE, "r") == []
    first = await store.claim_due(T0, 2, LEASE, "r")
    assert [r.queue_id for r in first] == ["QORD4", "QORD3"]
    rest = await store.claim_due(T0, 10, LEASE, "r")
    assert [r.queue_id for r in rest] == ["QORD2", "QORD1", "QORD0"]
    assert await store.claim_due(T0, 10, LEASE, "r") == []


async def test_concurrent_claims_never_share_a_record(store: QueueStore) -> None:
    for i in range(20):
        await store.commit(message(f"QCC{i:02d}", rcpts=("a@x.net", "b@x.net")))
    results = await asyncio.gather(
        *(store.claim_due(T0, 3, LEASE, f"runner{n}") for n in range(16))
    )
    ids = [r.record_id for batch in results for r in batch]
    assert len(ids) == len(set(ids)) == 40
    assert all(len(batch) <= 3 for batch in results)
    tokens = [r.lease_token for batch in results for r in batch]
    assert len(set(tokens)) == 40


async def test_expired_lease_is_claimable_again(store: QueueStore) -> None:
    await store.commit(message("QEXP"))
    (first,) = await store.claim_due(T0, 10, LEASE, "dead-node")
    assert await store.claim_due(T0 + LEASE - 1, 10, LEASE, "other") == []
    (second,) = await store.claim_due(T0 + LEASE, 10, LEASE, "other")
    assert second.record_id == first.record_id
    assert second.lease_owner == "other"
    assert second.lease_token != first.lease_token
    assert second.lease_expires == T0 + 2 * LEASE


async def test_expired_leases_come_before_due_records(store: QueueStore) -> None:
    await store.commit(message("QOLD"))
    (old,) = await store.claim_due(T0, 1, LEASE, "dead-node")
    await store.commit(message("QNEW", received_at=T0 + 10))
    claimed = await store.claim_due(T0 + LEASE, 1, LEASE, "other")
    assert [r.record_id for r in claimed] == [old.record_id]


async def test_fencing_ignores_a_stale_token(store: QueueStore) -> None:
    await store.commit(message("QFENCE"))
    (stale,) = await store.claim_due(T0, 10, LEASE, "slow-node")
    (fresh,) = await store.claim_due(T0 + LEASE, 10, LEASE, "other")
    # The slow node finally reports: it must not overwrite the newer lease.
    assert await store.record_outcomes([outcome(stale, DeliveryState.DELIVERED)]) == []
    info = await store.get_message("QFENCE")
    assert info is not None
    (rec,) = info.records
    assert rec.state is DeliveryState.LEASED and rec.lease_token == fresh.lease_token
    assert rec.attempts == 0
    # The current holder's outcome lands.
    assert await store.record_outcomes([outcome(fresh, DeliveryState.DELIVERED)]) == ["QFENCE"]


async def test_not_attempted_reschedules_without_counting(store: QueueStore) -> None:
    await store.commit(message("QBUSY"))
    (rec,) = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes([outcome(rec, DeliveryState.DEFERRED, next_try=T0 + 60)])
    (rec,) = await store.claim_due(T0 + 60, 10, LEASE, "r")
    busy = OutcomeUpdate(
        rec.record_id,
        rec.lease_token or "",
        DeliveryState.DEFERRED,
        OK_250,
        T0 + 62,
        T0 + 60,
        attempted=False,
    )
    await store.record_outcomes([busy])
    info = await store.get_message("QBUSY")
    assert info is not None
    (after,) = info.records
    assert after.state is DeliveryState.DEFERRED and after.next_try == T0 + 62
    assert after.attempts == 1 and after.last_reply == TRY_LATER  # unchanged
    assert after.lease_token is None
    assert [r.record_id for r in await store.claim_due(T0 + 62, 10, LEASE, "r")] == [rec.record_id]


async def test_unknown_record_or_wrong_token_is_ignored(store: QueueStore) -> None:
    await store.commit(message("QWRONG"))
    (rec,) = await store.claim_due(T0, 10, LEASE, "r")
    assert (
        await store.record_outcomes([outcome(rec, DeliveryState.DELIVERED, token="0" * 16)]) == []
    )
    bogus = OutcomeUpdate(999_999, "x", DeliveryState.DELIVERED, OK_250, 0.0, T0)
    assert await store.record_outcomes([bogus]) == []
    assert await states(store, "QWRONG") == [DeliveryState.LEASED]


async def test_outcome_for_a_record_that_was_never_leased_is_ignored(store: QueueStore) -> None:
    await store.commit(message("QNOLEASE"))
    info = await store.get_message("QNOLEASE")
    assert info is not None
    assert await store.record_outcomes([outcome(info.records[0], DeliveryState.DELIVERED)]) == []
    assert await states(store, "QNOLEASE") == [DeliveryState.PENDING]


async def test_outcome_state_must_be_an_outcome(store: QueueStore) -> None:
    await store.commit(message("QBADSTATE"))
    (rec,) = await store.claim_due(T0, 10, LEASE, "r")
    for bad in (DeliveryState.PENDING, DeliveryState.LEASED, DeliveryState.HELD):
        with pytest.raises(ValueError):
            await store.record_outcomes([outcome(rec, bad)])
    assert await states(store, "QBADSTATE") == [DeliveryState.LEASED]


# ---------------------------------------------------------------- outcomes


async def test_deferral_then_retry(store: QueueStore) -> None:
    await store.commit(message("QDEFER"))
    (rec,) = await store.claim_due(T0, 10, LEASE, "r")
    done = await store.record_outcomes(
        [outcome(rec, DeliveryState.DEFERRED, next_try=T0 + 300, now=T0 + 5)]
    )
    assert done == []
    info = await store.get_message("QDEFER")
    assert info is not None
    (d,) = info.records
    assert d.state is DeliveryState.DEFERRED
    assert d.attempts == 1
    assert d.next_try == T0 + 300
    assert d.last_reply == TRY_LATER
    assert (d.lease_token, d.lease_owner, d.lease_expires) == (None, None, None)
    assert d.updated_at == T0 + 5

    assert await store.claim_due(T0 + 299, 10, LEASE, "r") == []
    (again,) = await store.claim_due(T0 + 300, 10, LEASE, "r")
    assert again.record_id == rec.record_id and again.attempts == 1
    await store.record_outcomes([outcome(again, DeliveryState.DEFERRED, next_try=T0 + 900)])
    info = await store.get_message("QDEFER")
    assert info is not None and info.records[0].attempts == 2


async def test_completion_removes_message_and_body(store: QueueStore) -> None:
    await store.commit(message("QDONE", rcpts=("a@x.net", "b@x.net", "c@x.net")))
    a, b, c = await store.claim_due(T0, 10, LEASE, "r")
    assert await store.record_outcomes([outcome(a, DeliveryState.DELIVERED)]) == []
    assert await store.record_outcomes([outcome(b, DeliveryState.DEFERRED, next_try=T0 + 1)]) == []
    assert await store.record_outcomes([outcome(c, DeliveryState.FAILED)]) == []
    assert await states(store, "QDONE") == [
        DeliveryState.DELIVERED,
        DeliveryState.DEFERRED,
        DeliveryState.FAILED,
    ]
    info = await store.get_message("QDONE")
    assert info is not None
    assert info.records[2].last_reply == NO_SUCH_USER
    assert await body_of(store, "QDONE")  # still there while a record is not final

    (b2,) = await store.claim_due(T0 + 1, 10, LEASE, "r")
    assert await store.record_outcomes([outcome(b2, DeliveryState.DELIVERED)]) == ["QDONE"]
    assert await store.get_message("QDONE") is None
    with pytest.raises(KeyError):
        await body_of(store, "QDONE")
    assert sum((await store.count_by_state()).values()) == 0
    assert await store.next_due() is None


async def test_outcomes_of_several_messages_in_one_call(store: QueueStore) -> None:
    await store.commit(message("QM1", rcpts=("a@x.net", "b@x.net")))
    await store.commit(message("QM2"))
    recs = await store.claim_due(T0, 10, LEASE, "r")
    assert len(recs) == 3
    updates = [outcome(r, DeliveryState.DELIVERED) for r in recs[1:]] + [
        outcome(recs[0], DeliveryState.DEFERRED, next_try=T0 + 60)
    ]
    assert await store.record_outcomes(updates) == ["QM2"]
    assert await store.get_message("QM1") is not None


async def test_record_outcomes_of_nothing(store: QueueStore) -> None:
    assert await store.record_outcomes([]) == []


# ---------------------------------------------------------------- operator commands


async def test_hold_and_release(store: QueueStore) -> None:
    await store.commit(message("QHOLD", rcpts=("a@x.net", "b@x.net")))
    await store.commit(message("QOTHER"))
    # make b deferred with one attempt, far in the future
    _, b, other = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes([outcome(b, DeliveryState.DEFERRED, next_try=T0 + 3600)])
    await store.record_outcomes([outcome(other, DeliveryState.DEFERRED, next_try=T0 + 3600)])
    # a is still leased to "r"; let that lease lapse and release it
    assert await store.release_leases("r") == 1

    assert await store.hold("QHOLD", T0 + 1) == 2
    assert await states(store, "QHOLD") == [DeliveryState.HELD, DeliveryState.HELD]
    assert await store.hold("QHOLD", T0 + 1) == 0  # already held
    # held records are never claimed nor due
    claimed = await store.claim_due(T0 + 5, 10, LEASE, "r")
    assert claimed == []
    assert await store.next_due() == T0 + 3600  # QOTHER's

    assert await store.release("QHOLD", T0 + 10) == 2
    info = await store.get_message("QHOLD")
    assert info is not None
    a2, b2 = info.records
    assert (a2.state, a2.next_try) == (DeliveryState.PENDING, T0 + 10)
    assert (b2.state, b2.next_try, b2.attempts) == (DeliveryState.DEFERRED, T0 + 10, 1)
    assert await store.release("QHOLD", T0 + 10) == 0
    claimed = await store.claim_due(T0 + 10, 10, LEASE, "r")
    assert sorted(r.recipient for r in claimed) == ["a@x.net", "b@x.net"]


async def test_hold_unknown_message_changes_nothing(store: QueueStore) -> None:
    assert await store.hold("NOPE", T0) == 0
    assert await store.release("NOPE", T0) == 0


async def test_hold_does_not_touch_final_records(store: QueueStore) -> None:
    await store.commit(message("QPART", rcpts=("a@x.net", "b@x.net")))
    a, _ = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes([outcome(a, DeliveryState.DELIVERED)])
    await store.release_leases("r")
    assert await store.hold("QPART", T0) == 1
    assert await states(store, "QPART") == [DeliveryState.DELIVERED, DeliveryState.HELD]


async def test_hold_during_delivery_final_outcome_lands(store: QueueStore) -> None:
    await store.commit(message("QINFLIGHT", rcpts=("a@x.net", "b@x.net")))
    a, b = await store.claim_due(T0, 10, LEASE, "r")
    assert await store.hold("QINFLIGHT", T0 + 1) == 2
    assert await store.claim_due(T0 + 2 * LEASE, 10, LEASE, "other") == []
    # the delivery that was in flight finishes: delivered lands; a deferral stays held
    await store.record_outcomes(
        [
            outcome(a, DeliveryState.DELIVERED),
            outcome(b, DeliveryState.DEFERRED, next_try=T0 + 300, now=T0 + 2),
        ]
    )
    info = await store.get_message("QINFLIGHT")
    assert info is not None
    ra, rb = info.records
    assert ra.state is DeliveryState.DELIVERED
    assert (rb.state, rb.attempts, rb.last_reply, rb.lease_token) == (
        DeliveryState.HELD,
        1,
        TRY_LATER,
        None,
    )
    assert await store.release("QINFLIGHT", T0 + 3) == 1
    assert await states(store, "QINFLIGHT") == [DeliveryState.DELIVERED, DeliveryState.DEFERRED]


async def test_hold_then_failure_of_last_record_completes(store: QueueStore) -> None:
    await store.commit(message("QHOLDFAIL"))
    (rec,) = await store.claim_due(T0, 10, LEASE, "r")
    await store.hold("QHOLDFAIL", T0)
    assert await store.record_outcomes([outcome(rec, DeliveryState.FAILED)]) == ["QHOLDFAIL"]
    assert await store.get_message("QHOLDFAIL") is None


async def test_release_while_delivery_in_flight_keeps_the_lease(store: QueueStore) -> None:
    await store.commit(message("QREL"))
    (rec,) = await store.claim_due(T0, 10, LEASE, "r")
    await store.hold("QREL", T0 + 1)
    assert await store.release("QREL", T0 + 2) == 1
    info = await store.get_message("QREL")
    assert info is not None
    (r,) = info.records
    assert (r.state, r.lease_token, r.lease_owner) == (DeliveryState.LEASED, rec.lease_token, "r")
    assert await store.claim_due(T0 + 2, 10, LEASE, "other") == []  # no second delivery
    assert await store.record_outcomes([outcome(rec, DeliveryState.DELIVERED)]) == ["QREL"]


async def test_release_after_the_lease_ran_out_makes_it_due(store: QueueStore) -> None:
    await store.commit(message("QRELLATE"))
    (rec,) = await store.claim_due(T0, 10, LEASE, "dead")
    await store.hold("QRELLATE", T0 + 1)
    assert await store.release("QRELLATE", T0 + LEASE + 1) == 1
    info = await store.get_message("QRELLATE")
    assert info is not None
    (r,) = info.records
    assert (r.state, r.next_try, r.lease_token) == (DeliveryState.PENDING, T0 + LEASE + 1, None)
    # the dead node's late report is fenced out
    assert await store.record_outcomes([outcome(rec, DeliveryState.DELIVERED)]) == []


async def test_delete(store: QueueStore) -> None:
    await store.commit(message("QDEL", rcpts=("a@x.net", "b@x.net")))
    await store.commit(message("QKEEP"))
    (rec, _, _) = await store.claim_due(T0, 10, LEASE, "r")
    assert await store.delete("QDEL") is True
    assert await store.get_message("QDEL") is None
    with pytest.raises(KeyError):
        await body_of(store, "QDEL")
    assert await store.delete("QDEL") is False
    # an outcome for a deleted record is ignored
    assert await store.record_outcomes([outcome(rec, DeliveryState.DELIVERED)]) == []
    assert [m.queue_id for m in await store.list_messages()] == ["QKEEP"]
    assert sum((await store.count_by_state()).values()) == 1


async def test_flush_makes_deferred_due_now(store: QueueStore) -> None:
    await store.commit(message("QF1"))
    await store.commit(message("QF2"))
    await store.commit(message("QF3"))
    r1, r2, r3 = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes(
        [
            outcome(r1, DeliveryState.DEFERRED, next_try=T0 + 3000),
            outcome(r2, DeliveryState.DEFERRED, next_try=T0 + 3000),
            outcome(r3, DeliveryState.DEFERRED, next_try=T0 + 3000),
        ]
    )
    await store.hold("QF3", T0)
    assert await store.claim_due(T0 + 10, 10, LEASE, "r") == []
    assert await store.flush(T0 + 10) == 2  # the held one stays held
    info = await store.get_message("QF1")
    assert info is not None and info.records[0].next_try == T0 + 10
    claimed = await store.claim_due(T0 + 10, 10, LEASE, "r")
    assert sorted(r.queue_id for r in claimed) == ["QF1", "QF2"]
    assert await states(store, "QF3") == [DeliveryState.HELD]
    assert await store.flush(T0 + 10) == 0  # nothing deferred any more


async def test_flush_of_one_message(store: QueueStore) -> None:
    await store.commit(message("QFA"))
    await store.commit(message("QFB"))
    ra, rb = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes(
        [
            outcome(ra, DeliveryState.DEFERRED, next_try=T0 + 3000),
            outcome(rb, DeliveryState.DEFERRED, next_try=T0 + 3000),
        ]
    )
    assert await store.flush(T0 + 10, queue_id="QFA") == 1
    claimed = await store.claim_due(T0 + 10, 10, LEASE, "r")
    assert [r.queue_id for r in claimed] == ["QFA"]
    assert await store.flush(T0 + 10, queue_id="NOPE") == 0


# ---------------------------------------------------------------- operator bounce


BOUNCED = Reply.of(550, "5.0.0", "Bounced by the operator")


async def test_fail_held_fails_only_held_records(store: QueueStore) -> None:
    await store.commit(message("QB", rcpts=("a@x.net", "b@x.net", "c@x.net")))
    a, b, c = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes(
        [
            outcome(a, DeliveryState.DELIVERED),
            outcome(b, DeliveryState.DEFERRED, next_try=T0 + 3000),
            outcome(c, DeliveryState.DEFERRED, next_try=T0 + 3000),
        ]
    )
    assert await store.fail_held("QB", BOUNCED, T0 + 1) == []  # nothing held yet
    assert await store.hold("QB", T0 + 1) == 2
    failed = await store.fail_held("QB", BOUNCED, T0 + 2)
    assert [(r.recipient, r.state, r.last_reply, r.attempts) for r in failed] == [
        ("b@x.net", DeliveryState.FAILED, BOUNCED, 1),
        ("c@x.net", DeliveryState.FAILED, BOUNCED, 1),
    ]
    # every record is final now: the message and its body are gone
    assert await store.get_message("QB") is None
    with pytest.raises(KeyError):
        await body_of(store, "QB")


async def test_fail_held_spares_a_delivery_in_flight(store: QueueStore) -> None:
    await store.commit(message("QBF", rcpts=("a@x.net", "b@x.net")))
    a, b = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes([outcome(b, DeliveryState.DEFERRED, next_try=T0 + 3000)])
    assert await store.hold("QBF", T0 + 1) == 2  # a stays leased underneath
    failed = await store.fail_held("QBF", BOUNCED, T0 + 2)
    assert [r.recipient for r in failed] == ["b@x.net"]
    assert await states(store, "QBF") == [DeliveryState.HELD, DeliveryState.FAILED]
    # the delivery in flight still lands and completes the message
    assert await store.record_outcomes([outcome(a, DeliveryState.DELIVERED)]) == ["QBF"]


async def test_fail_held_unknown_message(store: QueueStore) -> None:
    assert await store.fail_held("NOPE", BOUNCED, T0) == []


# ---------------------------------------------------------------- history


async def test_events_round_trip_oldest_first_and_outlive_the_message(
    store: QueueStore,
) -> None:
    await store.commit(message("QEV"))
    await store.add_events(
        [
            QueueEvent("QEV", T0, "received", {"from": "s@x.org", "size": 12}),
            QueueEvent("QOTHER", T0 + 1, "received", {}),
            QueueEvent("QEV", T0 + 5, "deferred", {"to": "r@x.net", "reply": "451 later"}),
        ]
    )
    await store.add_events([QueueEvent("QEV", T0 + 9, "delivered", {"to": "r@x.net"})])
    await store.add_events([])
    (rec,) = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes([outcome(rec, DeliveryState.DELIVERED)])
    assert await store.get_message("QEV") is None
    events = await store.events("QEV")
    assert [(e.at, e.event) for e in events] == [
        (T0, "received"),
        (T0 + 5, "deferred"),
        (T0 + 9, "delivered"),
    ]
    assert dict(events[0].fields) == {"from": "s@x.org", "size": 12}
    assert [e.event for e in await store.events("QEV", limit=2)] == ["deferred", "delivered"]
    assert await store.events("NOPE") == []


async def test_event_counts_per_bucket_and_prune(store: QueueStore) -> None:
    await store.add_events(
        [
            QueueEvent("A", T0 - 10, "received"),  # before the window
            QueueEvent("A", T0, "received"),
            QueueEvent("B", T0 + 30, "received"),
            QueueEvent("A", T0 + 59, "delivered"),
            QueueEvent("B", T0 + 61, "deferred"),
        ]
    )
    counts = await store.event_counts(T0, 60)
    assert counts == [
        EventCount(T0, "delivered", 1),
        EventCount(T0, "received", 2),
        EventCount(T0 + 60, "deferred", 1),
    ]
    assert await store.prune_events(T0 + 1) == 2
    assert [e.event for e in await store.events("A")] == ["delivered"]


async def test_release_leases_of_one_owner(store: QueueStore) -> None:
    await store.commit(message("QRL1"))
    await store.commit(message("QRL2"))
    await store.commit(message("QRL3"))
    (a,) = await store.claim_due(T0, 1, LEASE, "me")
    (b,) = await store.claim_due(T0, 1, LEASE, "other")
    await store.record_outcomes([outcome(a, DeliveryState.DEFERRED, next_try=T0)])
    (a2, c) = await store.claim_due(T0, 2, LEASE, "me")
    assert {a2.queue_id, c.queue_id} == {"QRL1", "QRL3"}

    assert await store.release_leases("me") == 2
    assert await store.release_leases("me") == 0
    by_id = {m.queue_id: m.records[0] for m in await store.list_messages()}
    assert by_id["QRL1"].state is DeliveryState.DEFERRED  # it had an attempt
    assert by_id["QRL3"].state is DeliveryState.PENDING
    assert by_id["QRL2"].state is DeliveryState.LEASED and by_id["QRL2"].lease_owner == "other"
    assert by_id["QRL1"].lease_token is None
    # released work is due again at once
    claimed = await store.claim_due(T0, 10, LEASE, "me")
    assert sorted(r.queue_id for r in claimed) == ["QRL1", "QRL3"]
    # and the old tokens no longer count
    assert b.queue_id == "QRL2"


async def test_next_due(store: QueueStore) -> None:
    assert await store.next_due() is None
    await store.commit(message("QN1", received_at=T0 + 50))
    await store.commit(message("QN2", received_at=T0 + 20))
    assert await store.next_due() == T0 + 20
    (rec,) = await store.claim_due(T0 + 20, 1, LEASE, "r")
    assert await store.next_due() == T0 + 50
    await store.hold("QN1", T0)
    # only the lease is left: it can be taken over when it runs out
    assert await store.next_due() == T0 + 20 + LEASE
    await store.record_outcomes([outcome(rec, DeliveryState.DEFERRED, next_try=T0 + 900)])
    assert await store.next_due() == T0 + 900


async def test_count_by_state(store: QueueStore) -> None:
    assert await store.count_by_state() == {s.value: 0 for s in DeliveryState}
    await store.commit(message("QC1", rcpts=("a@x.net", "b@x.net", "c@x.net")))
    await store.commit(message("QC2"))
    a, b, *_ = await store.claim_due(T0, 10, LEASE, "r")
    await store.record_outcomes(
        [outcome(a, DeliveryState.DELIVERED), outcome(b, DeliveryState.DEFERRED, next_try=T0 + 9)]
    )
    await store.release_leases("r")
    await store.hold("QC2", T0)
    assert await store.count_by_state() == {
        "pending": 1,
        "leased": 0,
        "deferred": 1,
        "delivered": 1,
        "failed": 0,
        "held": 1,
    }


# ---------------------------------------------------------------- concurrency


async def test_concurrent_commits_are_all_visible(store: QueueStore) -> None:
    bodies = {f"QCONC{i:04d}": os.urandom(i * 37) for i in range(200)}
    await asyncio.gather(
        *(
            store.commit(message(qid, body=b, rcpts=("a@x.net", "b@x.net")))
            for qid, b in bodies.items()
        )
    )
    listed = await store.list_messages(limit=1000)
    assert [m.queue_id for m in listed] == sorted(bodies)
    assert all(len(m.records) == 2 for m in listed)
    assert (await store.count_by_state())["pending"] == 400
    for qid, b in bodies.items():
        assert await body_of(store, qid) == b


async def test_concurrent_commits_and_claims(store: QueueStore) -> None:
    async def produce() -> None:
        for i in range(50):
            await store.commit(message(f"QPC{i:03d}"))

    seen: list[int] = []

    async def consume() -> None:
        for _ in range(200):
            batch = await store.claim_due(T0, 7, LEASE, "r")
            seen.extend(r.record_id for r in batch)
            if len(seen) == 50:
                return
            await asyncio.sleep(0)

    await asyncio.gather(produce(), consume(), consume())
    assert len(seen) == len(set(seen)) == 50


async def test_closed_store_refuses_work(store: QueueStore) -> None:
    await store.commit(message("QCLOSE"))
    await store.close()
    with pytest.raises(Exception):  # noqa: B017
        await store.commit(message("QCLOSE2"))
    await store.close()  # idempotent


async def test_health_of_an_open_and_a_closed_store(store: QueueStore) -> None:
    await store.commit(message("QHEALTH"))
    assert store.health().ok
    await store.close()
    health = store.health()
    assert not health.ok and not health.recoverable and health.reason


async def test_leases_of_an_owner_whose_heartbeat_is_stale_come_back(store: QueueStore) -> None:
    """A dead node's work is taken over after node_timeout, not after the lease;
    a live owner's leases stay however long its delivery takes; fencing holds."""
    await store.commit(message("QDEAD", rcpts=("a@example.net", "b@example.net")))
    dead = await store.claim_due(T0, 10, 600.0, "dead")
    await store.commit(message("QLIVE"))
    live = await store.claim_due(T0, 10, 600.0, "live")
    assert len(dead) == 2 and len(live) == 1
    await store.heartbeat("dead", T0)
    await store.heartbeat("live", T0)
    assert await store.release_dead_owners(T0 + 20, 30.0) == 0  # nobody silent that long
    await store.heartbeat("live", T0 + 25)  # the live node keeps beating
    assert await store.release_dead_owners(T0 + 40, 30.0) == 2
    assert await store.release_dead_owners(T0 + 41, 30.0) == 0  # taken over once
    again = await store.claim_due(T0 + 41, 10, 600.0, "other")
    assert sorted(r.record_id for r in again) == sorted(r.record_id for r in dead)
    # the dead owner's late outcome is fenced out
    late = outcome(dead[0], DeliveryState.DELIVERED, now=T0 + 50)
    assert await store.record_outcomes([late]) == []
    info = await store.get_message("QLIVE")
    assert info is not None and info.records[0].lease_owner == "live"


async def test_a_quarantined_message_is_committed_held(store: QueueStore) -> None:
    """A check's quarantine (NewMessage.held): every record starts HELD in the commit
    itself, so no runner claims it in between; release makes it due."""
    held = dataclasses.replace(
        message("QHELD1", rcpts=("a@example.net", "b@example.net")), held=True
    )
    await store.commit(held)
    await store.commit(message("QFREE1"))  # in the same store, not held
    assert await states(store, "QHELD1") == [DeliveryState.HELD, DeliveryState.HELD]
    claimed = await store.claim_due(T0 + 10, 10, LEASE, "runner")
    assert [r.queue_id for r in claimed] == ["QFREE1"]
    assert await store.release("QHELD1", T0 + 20) == 2
    claimed = await store.claim_due(T0 + 30, 10, LEASE, "runner")
    assert sorted(r.queue_id for r in claimed) == ["QHELD1", "QHELD1"]
