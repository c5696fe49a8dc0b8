"""What one delivery attempt changes: outcomes in, store updates, log events and notices out.

Pure: no store, no clock, no log, no I/O. ``plan_outcomes`` takes the message,
each record with its outcome and route, ``now``, the retry policy and a random
generator, and returns an ``OutcomePlan``; the runner applies it (queues the
notices, records the updates, writes the log events and metrics). Tests drive
it with a table of cases (tests/unit/test_delivery_outcomes.py).

The rules, per record:

- ``Delivered`` → DELIVERED; a success notice when the route is local (Maildir,
  LMTP: the final delivery) or the next hop did not take DSN (``relayed``),
  and the recipient asked for it (``NOTIFY=SUCCESS``).
- ``TempFail`` that was not attempted (destination slots busy, suspended) → DEFERRED
  a few seconds later, no attempt counted, nothing logged (a suspended destination's
  deferral is logged, with the suspension as the reason); but a message whose
  lifetime ran out while its destination is suspended (a dead destination) expires
  as if attempted: a suspension can outlast the lifetime, slots that are busy cannot.
- ``TempFail`` before the message's lifetime ran out → DEFERRED at the retry
  policy's next try; a delay warning on the one attempt that crosses
  ``delay_warning`` (``NOTIFY=DELAY``, or by default).
- ``TempFail`` after the lifetime, or ``PermFail`` → FAILED (an expired
  temporary reply becomes a 5xx "message expired in queue") and a failure
  notice (``NOTIFY=FAILURE``, or by default).

No notice ever goes to the null sender (RFC 3461 6.2). If the failure notice
cannot be queued, the runner applies ``keep_unnotified`` to the updates: the
failed records stay queued (deferred, no attempt counted) until the notice can
be, so a bounce is never lost.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from postillon.core.outcome import Delivered, Outcome, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.delivery.retry import RetryPolicy
from postillon.dsn.bounce import DsnRecipient, wants_notice
from postillon.observability.metrics import outcome_reason
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo, OutcomeUpdate
from postillon.routing.router import Route

# Work a transport could not even start is offered again after about this long.
NOT_ATTEMPTED_DELAY = 2.0
# How soon recipients whose failure notice could not be queued are tried again.
UNNOTIFIED_RETRY_DELAY = 60.0
EXPIRED = "message expired in queue"

NoticeKind = Literal["failed", "delayed", "succeeded"]


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One mail log line: ``maillog.event(event, queue_id, **fields)``."""

    event: str  # delivered, deferred, expired, bounced
    fields: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class MetricTick:
    """One count for the delivery metrics."""

    kind: Literal["delivered", "deferred", "bounced"]
    route_kind: str
    reason: str = ""  # deferred and bounced: why (``outcome_reason``, or "expired")
    delay: float | None = None  # delivered and bounced: seconds since the message arrived


@dataclass(frozen=True, slots=True)
class Notice:
    """One delivery status notification to queue to the message's sender."""

    kind: NoticeKind
    recipients: tuple[DsnRecipient, ...]
    record_ids: frozenset[int]  # the records it is about


@dataclass(frozen=True, slots=True)
class OutcomePlan:
    updates: tuple[OutcomeUpdate, ...] = ()
    events: tuple[LogEvent, ...] = ()
    # In the order to queue them: failures first (their loss would lose a bounce).
    notices: tuple[Notice, ...] = ()
    metrics: tuple[MetricTick, ...] = field(default=())


def plan_outcomes(
    message: MessageInfo,
    results: Sequence[tuple[DeliveryRecord, Outcome, Route]],
    now: float,
    retry: RetryPolicy,
    *,
    delay_warning: float = 0.0,
    rng: random.Random | None = None,
) -> OutcomePlan:
    """What the outcomes of one attempt on ``message`` change (see the module docstring)."""
    rng = rng if rng is not None else random.Random()
    updates: list[OutcomeUpdate] = []
    events: list[LogEvent] = []
    ticks: list[MetricTick] = []
    notices: dict[NoticeKind, list[tuple[int, DsnRecipient]]] = {
        "failed": [],
        "delayed": [],
        "succeeded": [],
    }
    expired = retry.expired(message.received_at, now)
    delay = now - message.received_at
    for record, outcome, route in results:
        token = record.lease_token or ""
        fields: dict[str, object] = {
            "to": record.recipient,
            "orig_to": record.original_recipient,
            "relay": outcome.detail or route.kind,
            "delay": f"{delay:.2f}",
            "attempts": record.attempts + 1,
            "status": f"{outcome.reply.code} {outcome.reply.status or ''}".strip(),
            "reply": outcome.reply.text,
        }
        if outcome.tls is not None:  # the session's TLS, for the history's per-recipient view
            fields.update(outcome.tls.log_fields())
        if isinstance(outcome, Delivered):
            updates.append(
                OutcomeUpdate(
                    record.record_id, token, DeliveryState.DELIVERED, outcome.reply, now, now
                )
            )
            events.append(LogEvent("delivered", fields))
            ticks.append(MetricTick("delivered", route.kind, delay=delay))
            action = "relayed" if outcome.relayed_without_dsn else "delivered"
            notify = route.kind in ("maildir", "lmtp") or outcome.relayed_without_dsn
            if notify and wants_notice(record.rcpt_params, action):
                remote = outcome.detail if action == "relayed" else ""
                notices["succeeded"].append(
                    (record.record_id, _dsn_recipient(record, outcome.reply, remote, action))
                )
            continue
        if (
            isinstance(outcome, TempFail)
            and not outcome.attempted
            and not (expired and outcome.suspended)
        ):
            # Not tried (destination slots busy): back in a few seconds,
            # no attempt counted, nothing to log at info level.
            if outcome.retry_after > 0:
                # A suspension's end, or a rate's next free token: back just then
                # (a little spread, so the waiting messages do not all come at once).
                next_try = now + outcome.retry_after * (1.0 + 0.2 * rng.random())
            else:
                next_try = now + NOT_ATTEMPTED_DELAY * (0.5 + rng.random())
            updates.append(
                OutcomeUpdate(
                    record.record_id,
                    token,
                    DeliveryState.DEFERRED,
                    outcome.reply,
                    next_try,
                    now,
                    attempted=False,
                )
            )
            if outcome.suspended:  # Postfix's "delivery temporarily suspended": say why
                wait = f"{next_try - now:.0f}s"
                fields.update(attempts=record.attempts, next_try=wait, suspended=True)
                events.append(LogEvent("deferred", fields))
            continue
        if isinstance(outcome, TempFail) and not expired:
            next_try = retry.next_try(record.attempts + 1, now, rng)
            updates.append(
                OutcomeUpdate(
                    record.record_id, token, DeliveryState.DEFERRED, outcome.reply, next_try, now
                )
            )
            events.append(LogEvent("deferred", {**fields, "next_try": f"{next_try - now:.0f}s"}))
            ticks.append(MetricTick("deferred", route.kind, outcome_reason(outcome.reply)))
            if crosses_delay_warning(message, record, next_try, delay_warning) and wants_notice(
                record.rcpt_params, "delayed"
            ):
                notices["delayed"].append(
                    (
                        record.record_id,
                        _dsn_recipient(record, outcome.reply, outcome.detail, "delayed"),
                    )
                )
            continue
        reply = outcome.reply
        if isinstance(outcome, TempFail):
            reply = expired_reply(outcome.reply)
            events.append(LogEvent("expired", fields))
        updates.append(
            OutcomeUpdate(record.record_id, token, DeliveryState.FAILED, reply, now, now)
        )
        events.append(LogEvent("bounced", {**fields, "status": str(reply.code)}))
        reason = "expired" if isinstance(outcome, TempFail) else outcome_reason(reply)
        ticks.append(MetricTick("bounced", route.kind, reason, delay))
        if wants_notice(record.rcpt_params, "failed"):
            remote = outcome.detail if isinstance(outcome, PermFail) else ""
            notices["failed"].append(
                (record.record_id, _dsn_recipient(record, reply, remote, "failed"))
            )
    planned: tuple[Notice, ...] = ()
    if message.sender:  # never a notice to the null sender
        planned = tuple(
            Notice(kind, tuple(r for _, r in items), frozenset(i for i, _ in items))
            for kind, items in notices.items()
            if items
        )
    return OutcomePlan(tuple(updates), tuple(events), planned, tuple(ticks))


def _dsn_recipient(record: DeliveryRecord, reply: Reply, remote: str, action: str) -> DsnRecipient:
    return DsnRecipient(
        record.recipient,
        record.original_recipient,
        record.rcpt_params,
        reply,
        remote=remote,
        action=action,
    )


def expired_reply(reply: Reply) -> Reply:
    """A temporary reply turned into the permanent one of a message that expired."""
    return Reply(
        reply.code + 100 if reply.code < 500 else reply.code,
        "5" + (reply.status or "4.4.7")[1:],
        (*reply.lines[:1], EXPIRED),
    )


def crosses_delay_warning(
    message: MessageInfo, record: DeliveryRecord, next_try: float, delay_warning: float
) -> bool:
    """True for exactly one attempt: the last one due before the warning
    threshold whose retry falls after it.

    Due times grow with every attempt, so exactly one attempt brackets the
    threshold; no "already warned" state needs storing. (``queue flush``
    moves due times and may, rarely, cause a second warning.)
    """
    if delay_warning <= 0:
        return False
    threshold = message.received_at + delay_warning
    return record.next_try <= threshold < next_try


def keep_unnotified(
    updates: Sequence[OutcomeUpdate], record_ids: frozenset[int], now: float
) -> tuple[OutcomeUpdate, ...]:
    """The updates with the given records' FAILED outcomes turned into a
    deferral that counts no attempt: they stay queued until their bounce can be."""
    return tuple(
        replace(
            update,
            state=DeliveryState.DEFERRED,
            next_try=now + UNNOTIFIED_RETRY_DELAY,
            attempted=False,
        )
        if update.record_id in record_ids and update.state is DeliveryState.FAILED
        else update
        for update in updates
    )
