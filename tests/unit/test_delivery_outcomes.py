"""The pure outcome -> update function (delivery/outcomes.py), as a table of cases.

Each case: one record's outcome (with the route, the record's attempts and due
time, the message's age, sender and NOTIFY), and what the plan must say: the
record's new state and next try, the mail log events, the metric, and which
notice (if any) is queued.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from postillon.core.envelope import MailParams, RcptParams
from postillon.core.outcome import Delivered, Outcome, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.delivery.outcomes import (
    EXPIRED,
    NOT_ATTEMPTED_DELAY,
    UNNOTIFIED_RETRY_DELAY,
    keep_unnotified,
    plan_outcomes,
)
from postillon.delivery.retry import RetryPolicy
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo
from postillon.routing.router import Route

NOW = 1_000_000.0
OK = Reply.of(250, "2.0.0", "Ok")
BUSY = Reply.of(451, "4.3.0", "try later")
GONE = Reply.of(550, "5.1.1", "no such user")
RETRY = RetryPolicy(first_delay=300, max_delay=3600, jitter=0.0, max_lifetime=86400)
SMTP = Route("smtp", "smtp:remote.test", "remote.test")
MAILDIR = Route("maildir", "maildir", "local.test")

D, F, DEF = DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.DEFERRED


@dataclass(frozen=True)
class Case:
    name: str
    outcome: Outcome
    # what the plan must say
    state: DeliveryState
    events: tuple[str, ...]
    metric: str | None  # "kind/reason" or None
    notice: str | None  # the notice kind, or None
    next_try: tuple[float, float] | None = None  # bounds of next_try - NOW
    attempted: bool = True
    # the situation
    route: Route = SMTP
    age: float = 60.0  # seconds since the message arrived
    attempts: int = 0
    due: float = NOW  # the record's next_try before this attempt
    sender: str = "alice@local.test"
    notify: frozenset[str] = field(default_factory=frozenset)
    delay_warning: float = 0.0
    reply: Reply | None = None  # the recorded reply, if not the outcome's


CASES = [
    Case("relayed to an MX", Delivered(OK, "mx[192.0.2.1]"), D, ("delivered",), "delivered/", None),
    Case(
        "delivered to a mailbox, success notice asked",
        Delivered(OK, "1.x"),
        D,
        ("delivered",),
        "delivered/",
        "succeeded",
        route=MAILDIR,
        notify=frozenset({"SUCCESS"}),
    ),
    Case(
        "relayed with DSN: the next hop notifies, not us",
        Delivered(OK),
        D,
        ("delivered",),
        "delivered/",
        None,
        notify=frozenset({"SUCCESS"}),
    ),
    Case(
        "relayed to a hop without DSN: we notify (relayed)",
        Delivered(OK, relayed_without_dsn=True),
        D,
        ("delivered",),
        "delivered/",
        "succeeded",
        notify=frozenset({"SUCCESS"}),
    ),
    Case(
        "first temporary failure: retry after first_delay",
        TempFail(BUSY),
        DEF,
        ("deferred",),
        "deferred/4.3",
        None,
        next_try=(300, 300),
    ),
    Case(
        "third temporary failure: the delay doubled twice",
        TempFail(BUSY),
        DEF,
        ("deferred",),
        "deferred/4.3",
        None,
        next_try=(1200, 1200),
        attempts=2,
    ),
    Case(
        "not attempted (slots busy): soon, no attempt, no log",
        TempFail(BUSY, attempted=False),
        DEF,
        (),
        None,
        None,
        next_try=(NOT_ATTEMPTED_DELAY * 0.5, NOT_ATTEMPTED_DELAY * 1.5),
        attempted=False,
    ),
    Case(
        "not attempted even after the lifetime: never expires unattempted",
        TempFail(BUSY, attempted=False),
        DEF,
        (),
        None,
        None,
        next_try=(NOT_ATTEMPTED_DELAY * 0.5, NOT_ATTEMPTED_DELAY * 1.5),
        attempted=False,
        age=90000,
    ),
    Case(
        "suspended destination after the lifetime: expires though not attempted",
        TempFail(BUSY, attempted=False, suspended=True),
        F,
        ("expired", "bounced"),
        "bounced/expired",
        "failed",
        age=86400,
        reply=Reply(551, "5.3.0", ("try later", EXPIRED)),
    ),
    Case("permanent failure: bounce", PermFail(GONE), F, ("bounced",), "bounced/5.1", "failed"),
    Case(
        "permanent failure, NOTIFY=NEVER: no notice",
        PermFail(GONE),
        F,
        ("bounced",),
        "bounced/5.1",
        None,
        notify=frozenset({"NEVER"}),
    ),
    Case(
        "permanent failure from the null sender: no notice",
        PermFail(GONE),
        F,
        ("bounced",),
        "bounced/5.1",
        None,
        sender="",
    ),
    Case(
        "temporary failure after the lifetime: expired, a 5xx",
        TempFail(BUSY),
        F,
        ("expired", "bounced"),
        "bounced/expired",
        "failed",
        age=86400,
        reply=Reply(551, "5.3.0", ("try later", EXPIRED)),
    ),
    Case(
        "the attempt that crosses delay_warning warns",
        TempFail(BUSY),
        DEF,
        ("deferred",),
        "deferred/4.3",
        "delayed",
        next_try=(600, 600),
        attempts=1,
        age=3500,
        due=NOW,
        delay_warning=3600,
    ),
    Case(
        "an attempt after the threshold does not warn again",
        TempFail(BUSY),
        DEF,
        ("deferred",),
        "deferred/4.3",
        None,
        next_try=(1200, 1200),
        attempts=2,
        age=4000,
        due=NOW,
        delay_warning=3600,
    ),
    Case(
        "NOTIFY=FAILURE only: no delay warning",
        TempFail(BUSY),
        DEF,
        ("deferred",),
        "deferred/4.3",
        None,
        next_try=(600, 600),
        attempts=1,
        age=3500,
        delay_warning=3600,
        notify=frozenset({"FAILURE"}),
    ),
]


def _record(case: Case) -> DeliveryRecord:
    return DeliveryRecord(
        record_id=7,
        queue_id="Q1",
        recipient="bob@remote.test",
        original_recipient=None,
        rcpt_params=RcptParams(notify=case.notify),
        state=DeliveryState.LEASED,
        attempts=case.attempts,
        next_try=case.due,
        last_reply=None,
        lease_token="tok",
        lease_owner="me",
        lease_expires=NOW + 300,
        updated_at=NOW,
    )


def _message(case: Case) -> MessageInfo:
    return MessageInfo("Q1", case.sender, MailParams(), 100, NOW - case.age, "", "smtp", ())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plan(case: Case) -> None:
    plan = plan_outcomes(
        _message(case),
        [(_record(case), case.outcome, case.route)],
        NOW,
        RETRY,
        delay_warning=case.delay_warning,
        rng=random.Random(1),
    )
    (update,) = plan.updates
    assert (update.record_id, update.lease_token, update.now) == (7, "tok", NOW)
    assert update.state is case.state
    assert update.attempted is case.attempted
    assert update.reply == (case.reply or case.outcome.reply)
    if case.next_try is not None:
        low, high = case.next_try
        assert low <= update.next_try - NOW <= high
    assert tuple(e.event for e in plan.events) == case.events
    for event in plan.events:
        assert event.fields["to"] == "bob@remote.test"
        assert event.fields["attempts"] == case.attempts + 1
    metrics = [f"{t.kind}/{t.reason}" for t in plan.metrics]
    assert metrics == ([case.metric] if case.metric else [])
    assert [n.kind for n in plan.notices] == ([case.notice] if case.notice else [])
    for notice in plan.notices:
        assert notice.record_ids == {7}
        assert [r.recipient for r in notice.recipients] == ["bob@remote.test"]


def test_notices_group_by_kind_failures_first() -> None:
    case = Case("", PermFail(GONE), F, (), None, None, notify=frozenset({"SUCCESS", "FAILURE"}))
    records = [
        (_record(case), Delivered(OK), MAILDIR),
        (_record(case), PermFail(GONE), SMTP),
        (_record(case), PermFail(GONE), SMTP),
    ]
    plan = plan_outcomes(_message(case), records, NOW, RETRY, rng=random.Random(1))
    assert [(n.kind, len(n.recipients)) for n in plan.notices] == [("failed", 2), ("succeeded", 1)]


def test_keep_unnotified_defers_failed_records_only() -> None:
    case = Case("", PermFail(GONE), F, (), None, None)
    plan = plan_outcomes(
        _message(case), [(_record(case), PermFail(GONE), SMTP)], NOW, RETRY, rng=random.Random(1)
    )
    (kept,) = keep_unnotified(plan.updates, frozenset({7}), NOW)
    assert kept.state is DeliveryState.DEFERRED and not kept.attempted
    assert kept.next_try == NOW + UNNOTIFIED_RETRY_DELAY
    assert keep_unnotified(plan.updates, frozenset({8}), NOW) == plan.updates
