"""Admin queue operations on the in-memory store with a fake clock: the qshape
summary, listing filters, actions and the history they leave, the token file,
and the history recorder's batching."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import pytest

from postillon.admin.queue_ops import (
    AGE_BUCKETS_MINUTES,
    MessageFilter,
    NotInQueue,
    QueueOpError,
    QueueOps,
    message_json,
    parse_headers,
)
from postillon.admin.token import TokenVerifier, generate_token
from postillon.core.clock import FakeClock
from postillon.core.envelope import MailParams
from postillon.core.reply import Reply
from postillon.intake.intake import Intake
from postillon.observability.maillog import null_maillog
from postillon.queue.history import HistoryRecorder
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import DeliveryState, NewMessage, NewRecipient, OutcomeUpdate

T0 = 1_800_000_000.0
QID = "1M8HQNNH4M5HGXC7B"  # a real-looking queue id: the history keeps only those
BODY = b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\nFrom: a@example.org\r\n\r\nbody\r\n"


def new_message(queue_id: str, rcpts: list[str], received_at: float, sender: str) -> NewMessage:
    return NewMessage(
        queue_id=queue_id,
        sender=sender,
        mail_params=MailParams(),
        recipients=[NewRecipient(r) for r in rcpts],
        body=io.BytesIO(BODY),
        size=len(BODY),
        received_at=received_at,
        client="c [192.0.2.1]",
        source="smtp",
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def ops(clock: FakeClock, tmp_path: Path) -> QueueOps:
    store = MemoryStore(clock_now=clock.now)
    intake = Intake(store, "mx.test", tmp_path / "spool", clock=clock)
    await store.commit(new_message("Q1OLD", ["a@x.test", "b@y.test"], T0 - 7200, "s@example.org"))
    await store.commit(new_message("Q2NEW", ["c@x.test"], T0 - 60, ""))
    # Q1OLD's a@x.test was tried once and deferred; everything else is pending.
    (rec, *_) = await store.claim_due(T0, 1, 60, "r")
    await store.record_outcomes(
        [
            OutcomeUpdate(
                rec.record_id,
                rec.lease_token or "",
                DeliveryState.DEFERRED,
                Reply.of(451, "4.4.1", "later"),
                T0 + 3600,
                T0,
            )
        ]
    )
    return QueueOps(store, clock, intake=intake, hostname="mx.test")


async def test_summary_is_qshape(ops: QueueOps) -> None:
    summary = await ops.summary()
    assert summary["messages"] == 2 and summary["queued_recipients"] == 3
    assert summary["oldest_queue_id"] == "Q1OLD" and summary["oldest_age_seconds"] == 7200
    assert summary["by_state"]["deferred"] == 1 and summary["by_state"]["pending"] == 2
    by_domain = {d["domain"]: d for d in summary["by_domain"]}
    assert list(by_domain) == ["x.test", "y.test"]  # most recipients first
    x = by_domain["x.test"]
    assert x["total"] == 2 and x["by_state"] == {"deferred": 1, "pending": 1}
    # 2 h old lands in the 80-160 minute bucket, 1 minute old in the first
    assert x["by_age"][AGE_BUCKETS_MINUTES.index(80)] == 1 and x["by_age"][0] == 1


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (MessageFilter(), ["Q1OLD", "Q2NEW"]),
        (MessageFilter(state=DeliveryState.DEFERRED), ["Q1OLD"]),
        (MessageFilter(sender="<>"), ["Q2NEW"]),
        (MessageFilter(sender="S@EXAMPLE"), ["Q1OLD"]),
        (MessageFilter(recipient="b@"), ["Q1OLD"]),
        (MessageFilter(domain="@X.test."), ["Q1OLD", "Q2NEW"]),
        (MessageFilter(domain="y.test"), ["Q1OLD"]),
        (MessageFilter(min_age=3600), ["Q1OLD"]),
        (MessageFilter(max_age=3600), ["Q2NEW"]),
        (MessageFilter(domain="x.test", max_age=3600), ["Q2NEW"]),
    ],
)
async def test_filters(ops: QueueOps, where: MessageFilter, expected: list[str]) -> None:
    total, page = await ops.find(where)
    assert total == len(expected) and [m.queue_id for m in page] == expected


async def test_paging(ops: QueueOps) -> None:
    total, page = await ops.find(MessageFilter(), offset=1, limit=1)
    assert total == 2 and [m.queue_id for m in page] == ["Q2NEW"]


async def test_actions_and_their_history(ops: QueueOps, clock: FakeClock) -> None:
    assert await ops.retry("Q1OLD") == 1
    info = await ops.get("Q1OLD")
    assert info.records[0].next_try == T0
    with pytest.raises(NotInQueue):
        await ops.retry("NOPE")
    assert await ops.hold("Q1OLD") == 2
    with pytest.raises(QueueOpError, match="on hold"):
        await ops.retry("Q1OLD")
    with pytest.raises(QueueOpError, match="no recipient left to hold"):
        await ops.hold("Q1OLD")
    clock.advance(5)
    assert await ops.release("Q1OLD") == 2
    with pytest.raises(QueueOpError, match="not on hold"):
        await ops.release("Q1OLD")
    assert await ops.bounce("Q1OLD") == 2
    assert await ops.store.get_message("Q1OLD") is None
    events = await ops.events("Q1OLD")
    assert [(e.event, e.fields.get("action")) for e in events] == [
        ("operator", "retry"),
        ("operator", "hold"),
        ("operator", "release"),
        ("bounce", None),
        ("bounced", None),
        ("bounced", None),
        ("operator", "bounce"),
    ]
    # the notice is queued through intake, to the sender, from the null sender
    (dsn,) = [m for m in await ops.store.list_messages() if m.source == "bounce"]
    assert dsn.sender == "" and [r.recipient for r in dsn.records] == ["s@example.org"]
    assert events[3].fields["dsn_id"] == dsn.queue_id


async def test_bounce_of_a_null_sender_message_sends_no_notice(ops: QueueOps) -> None:
    assert await ops.bounce("Q2NEW") == 1
    assert await ops.store.list_messages() == [await ops.get("Q1OLD")]


async def test_delete(ops: QueueOps) -> None:
    assert await ops.delete("Q2NEW") == 1
    with pytest.raises(NotInQueue):
        await ops.delete("Q2NEW")


async def test_unknown_action(ops: QueueOps) -> None:
    with pytest.raises(QueueOpError, match="unknown action"):
        await ops.apply("explode", "Q1OLD")


async def test_message_json_and_headers(ops: QueueOps) -> None:
    shown = message_json(await ops.get("Q1OLD"), T0)
    assert shown["state"] == "pending"  # the least finished recipient wins
    assert shown["recipients"][0]["last_reply"] == "451 4.4.1 later"
    assert shown["recipients"][0]["next_try"] == "2027-01-15T09:00:00Z"
    assert shown["received_at"] == "2027-01-15T06:00:00Z" and shown["age_seconds"] == 7200
    assert (await ops.headers("Q1OLD"))[0] == ("Subject", "Grüße")


def test_parse_headers_survives_garbage() -> None:
    headers = parse_headers(b"Subject: =?bogus?x?zz?=\r\nX-Bad: \xff\xfe\r\n\r\nbody")
    assert [name for name, _ in headers] == ["Subject", "X-Bad"]


async def test_activity_buckets(ops: QueueOps, clock: FakeClock) -> None:
    from postillon.queue.store import QueueEvent

    await ops.store.add_events(
        [
            QueueEvent("A", T0 - 30, "received"),
            QueueEvent("A", T0 - 20, "delivered"),
            QueueEvent("B", T0 - 3000, "deferred"),
            QueueEvent("B", T0 - 9000, "received"),  # outside one hour
        ]
    )
    activity = await ops.activity(hours=1, bucket_minutes=10)
    assert len(activity["buckets"]) == 6 and activity["bucket_seconds"] == 600
    assert sum(activity["series"]["received"]) == 1
    # now (T0) opens the last bucket; T0 - 20 s falls in the one before
    assert activity["series"]["delivered"][-2] == 1
    assert sum(activity["series"]["deferred"]) == 1 and sum(activity["series"]["bounced"]) == 0


def test_token_is_stored_hashed_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "admin-token.json"
    verifier = TokenVerifier(path)
    assert not verifier.configured and not verifier.check("anything")
    token = generate_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text() and len(token) >= 43
    assert verifier.check(token) and not verifier.check(token + "x") and not verifier.check("")
    second = generate_token(path)
    assert verifier.check(second) and not verifier.check(token)
    path.write_text("{not json")
    assert not verifier.check(second)  # a damaged file lets nobody in
    path.write_text(json.dumps({"sha256": 5}))
    assert not verifier.check(second)


async def test_history_recorder_batches_mail_log_events(clock: FakeClock) -> None:
    store = MemoryStore(clock_now=clock.now)
    recorder = HistoryRecorder(store, clock, retention=3600, flush_interval=3600)
    maillog = null_maillog()
    maillog.subscribe(recorder.on_event)
    maillog.event("received", QID, **{"from": "a@b", "size": 3, "extra": object()})
    maillog.event("rejected", client="192.0.2.1")  # no queue id: not history
    maillog.event("error", "-", reason="maildrop file x: bad")  # a placeholder: neither
    maillog.event("delivered", QID, to="c@d", orig_to=None)
    assert await store.events(QID) == []  # buffered until the next flush
    await recorder.flush()
    events = await store.events(QID)
    assert [e.event for e in events] == ["received", "delivered"]
    assert events[0].fields["size"] == 3 and isinstance(events[0].fields["extra"], str)
    assert "orig_to" not in events[1].fields
