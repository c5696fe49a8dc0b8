"""Queue operations shared by the admin API and ``postillon queue ...``.

Both front ends call these functions and print or serve the same JSON
(``*_json`` functions), so the web page, the API and the command line cannot
disagree about what the queue holds or what an action does.

Listing reads the whole queue through ``list_messages`` and filters in Python:
the store protocol stays small (every store implements it), and a queue is meant
to be short. ``MAX_SCAN`` bounds the work for a queue that is not. The summary
is aggregated by the store (``QueueStore.shape``): it stays fast over any queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.parser import BytesHeaderParser
from typing import Any, Final

from postillon.admin import suspensions
from postillon.core.clock import Clock
from postillon.core.reply import Reply
from postillon.dsn.bounce import (
    DsnRecipient,
    wants_notice,
)
from postillon.dsn.notify import queue_notice
from postillon.intake.intake import Intake
from postillon.observability.maillog import MailLog
from postillon.queue.history import HistoryRecorder
from postillon.queue.queue_shape import QueueShape
from postillon.queue.store import (
    DeliveryRecord,
    DeliveryState,
    EventCount,
    MessageInfo,
    QueueEvent,
    QueueStore,
)

log = logging.getLogger("postillon.admin")

MAX_SCAN: Final = 100_000  # messages read for a listing or summary
SUMMARY_MIN_REUSE: Final = 2.0  # seconds a summary may be served again (see summary())
HEADER_LIMIT: Final = 256 * 1024  # header bytes read for the message view
# qshape's age buckets (minutes): 0-5, 5-10, 10-20, ... 1280+.
AGE_BUCKETS_MINUTES: Final = (0, 5, 10, 20, 40, 80, 160, 320, 640, 1280)
OPERATOR_BOUNCE: Final = Reply.of(550, "5.0.0", "Returned to sender by the postmaster")
ACTIONS: Final = ("retry", "hold", "release", "delete", "bounce")
_QUEUED: Final = (
    DeliveryState.PENDING,
    DeliveryState.LEASED,
    DeliveryState.DEFERRED,
    DeliveryState.HELD,
)


class QueueOpError(Exception):
    """An operation cannot be done; ``status`` is the HTTP status the API answers with."""

    status = 409

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotInQueue(QueueOpError):
    status = 404

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"no message {queue_id} in the queue")


# ---------------------------------------------------------------- JSON shapes


def iso(ts: float | None) -> str | None:
    """UTC, ISO 8601 with a Z: what scripts and JavaScript's Date both read."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def message_state(info: MessageInfo) -> str:
    """One word for the message: the state of its least finished recipient."""
    order = ("leased", "pending", "deferred", "held", "failed", "delivered")
    present = {r.state.value for r in info.records}
    return next((s for s in order if s in present), "delivered")


def record_json(r: DeliveryRecord) -> dict[str, Any]:
    waiting = r.state in (DeliveryState.DEFERRED, DeliveryState.PENDING)
    return {
        "recipient": r.recipient,
        "original_recipient": r.original_recipient,
        "state": r.state.value,
        "attempts": r.attempts,
        "next_try": iso(r.next_try) if waiting else None,
        # "451 4.4.1 text" (a string, as `postillon queue show --json` always gave it)
        "last_reply": str(r.last_reply) if r.last_reply else None,
        "last_reply_code": r.last_reply.code if r.last_reply else None,
        "lease_owner": r.lease_owner,
    }


def message_json(info: MessageInfo, now: float) -> dict[str, Any]:
    return {
        "queue_id": info.queue_id,
        "sender": info.sender,
        "size": info.size,
        "received_at": iso(info.received_at),
        "age_seconds": round(max(0.0, now - info.received_at), 3),
        "client": info.client,
        "source": info.source,
        "state": message_state(info),
        "recipients": [record_json(r) for r in info.records],
    }


def event_json(e: QueueEvent) -> dict[str, Any]:
    return {"at": iso(e.at), "ts": e.at, "event": e.event, "fields": dict(e.fields)}


_OUTCOME_EVENTS = frozenset({"delivered", "deferred", "bounced", "expired"})


def last_tls_by_recipient(events: Sequence[QueueEvent]) -> dict[str, dict[str, Any]]:
    """Recipient → the TLS of its last delivery attempt (events are oldest first): the
    ``delivered``/``deferred``/``bounced`` events of an SMTP delivery carry the
    session's fields (``core.outcome.TlsDetails.log_fields``), so this is there for a
    message still queued and for one that has left the queue."""
    found: dict[str, dict[str, Any]] = {}
    for e in events:
        fields = e.fields
        if e.event not in _OUTCOME_EVENTS or "tls_result" not in fields or "to" not in fields:
            continue
        found[str(fields["to"])] = {
            "at": iso(e.at),
            "event": e.event,
            "mx": fields.get("mx"),
            "policy": fields.get("tls_policy"),
            "result": fields.get("tls_result"),
            "verified": fields.get("tls_verified") == "yes",
            "version": fields.get("tls_version"),
            "cipher": fields.get("tls_cipher"),
        }
    return found


# ---------------------------------------------------------------- filters


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Which messages a listing shows; every given condition must hold."""

    state: DeliveryState | None = None  # a recipient in this state
    sender: str | None = None  # substring of the sender, case-insensitive ("<>": null sender)
    recipient: str | None = None  # substring of a recipient (or its original address)
    domain: str | None = None  # a recipient in this domain
    min_age: float | None = None  # seconds since received, at least
    max_age: float | None = None  # seconds since received, at most

    def matches(self, info: MessageInfo, now: float) -> bool:
        if self.state is not None and not any(r.state is self.state for r in info.records):
            return False
        if self.sender is not None:
            wanted = self.sender.lower()
            if wanted == "<>":
                if info.sender:
                    return False
            elif wanted not in info.sender.lower():
                return False
        if self.recipient is not None:
            wanted = self.recipient.lower()
            if not any(
                wanted in r.recipient.lower() or wanted in (r.original_recipient or "").lower()
                for r in info.records
            ):
                return False
        if self.domain is not None:
            domain = self.domain.lower().lstrip("@").rstrip(".")
            if not any(domain_of(r.recipient) == domain for r in info.records):
                return False
        age = now - info.received_at
        if self.min_age is not None and age < self.min_age:
            return False
        return not (self.max_age is not None and age > self.max_age)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


# ---------------------------------------------------------------- summary


@dataclass
class _DomainShape:
    total: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    by_age: list[int] = field(default_factory=lambda: [0] * len(AGE_BUCKETS_MINUTES))
    oldest: float | None = None


def summarize(shape: QueueShape, counts: dict[str, int], now: float) -> dict[str, Any]:
    """Postfix's qshape in JSON: queued recipients by domain and age, plus totals,
    from the store's aggregate (``QueueStore.shape``)."""
    domains: dict[str, _DomainShape] = {}
    queued_recipients = 0
    order = {state.value: i for i, state in enumerate(DeliveryState)}
    for row in sorted(shape.rows, key=lambda r: order.get(r.state, len(order))):
        queued_recipients += row.count
        name = row.domain.lower() or "(local)"  # domain_of's case folding
        entry = domains.setdefault(name, _DomainShape())
        entry.total += row.count
        entry.by_state[row.state] = entry.by_state.get(row.state, 0) + row.count
        entry.by_age[row.bucket] += row.count
        if entry.oldest is None or row.oldest_received_at < entry.oldest:
            entry.oldest = row.oldest_received_at
    rows = sorted(domains.items(), key=lambda item: (-item[1].total, item[0]))
    oldest_at = shape.oldest_received_at
    return {
        "messages": shape.messages,
        "queued_recipients": queued_recipients,
        "by_state": counts,
        "oldest_age_seconds": round(now - oldest_at, 3) if oldest_at is not None else None,
        "oldest_queue_id": shape.oldest_queue_id,
        "age_buckets_minutes": list(AGE_BUCKETS_MINUTES),
        "by_domain": [
            {
                "domain": name,
                "total": entry.total,
                "by_state": entry.by_state,
                "by_age": entry.by_age,
                "oldest_age_seconds": round(now - entry.oldest, 3) if entry.oldest else None,
            }
            for name, entry in rows
        ],
    }


def parse_headers(head: bytes) -> list[tuple[str, str]]:
    """The header fields of a stored message, decoded for display (RFC 2047 words)."""
    end = head.find(b"\r\n\r\n")
    section = head if end < 0 else head[: end + 4]
    try:
        decoded = BytesHeaderParser(policy=policy.default).parsebytes(section)
        return [(name, str(value)) for name, value in decoded.items()]
    except Exception:  # a malformed field: show the raw text rather than nothing
        raw = BytesHeaderParser(policy=policy.compat32).parsebytes(section)
        return [(name, str(value)) for name, value in raw.items()]


async def _read_head(chunks: AsyncIterator[bytes]) -> bytes:
    head = b""
    async for chunk in chunks:
        head += chunk
        if b"\r\n\r\n" in head or len(head) >= HEADER_LIMIT:
            break
    return head[:HEADER_LIMIT]


# ---------------------------------------------------------------- operations


class QueueOps:
    """The operations; built by the server (with intake, mail log and history
    recorder) or by the CLI (store and clock; bounces then queue through an
    ``Intake`` the CLI builds on the same store)."""

    def __init__(
        self,
        store: QueueStore,
        clock: Clock,
        *,
        intake: Intake | None = None,
        hostname: str = "localhost",
        maillog: MailLog | None = None,
        history: HistoryRecorder | None = None,
        wake_runner: Callable[[], None] | None = None,
        actor: str = "cli",
    ) -> None:
        self.store = store
        self.clock = clock
        self.intake = intake
        self.hostname = hostname
        self.maillog = maillog
        self.history = history
        self.wake_runner = wake_runner
        self.actor = actor  # "api" or "cli", kept in the history of each action
        self._unsaved: list[QueueEvent] = []
        self._summary_cache: tuple[float, dict[str, Any]] | None = None

    # -- reads --------------------------------------------------------------

    async def summary(self) -> dict[str, Any]:
        """The qshape summary; reused for a while when computing it was slow.

        A dashboard left open refreshes every few seconds; with a long queue
        each summary reads all of it. Reusing the last one for ten times as
        long as it took to make (at least two seconds) keeps that work a small
        share of the store's read time.
        """
        started = time.monotonic()
        cached = self._summary_cache
        if cached is not None and started < cached[0]:
            return {**cached[1], "suspensions": await self._suspensions()}
        now = self.clock.now()
        shape = await self.store.shape(now, AGE_BUCKETS_MINUTES)
        counts = await self.store.count_by_state()
        result = summarize(shape, counts, now)
        took = time.monotonic() - started
        self._summary_cache = (time.monotonic() + max(SUMMARY_MIN_REUSE, 10 * took), result)
        return {**result, "suspensions": await self._suspensions()}

    async def _suspensions(self) -> list[dict[str, Any]]:
        """The running suspensions (never cached: an operator just changed one)."""
        return await suspensions.list_json(self.store, self.clock.now())

    async def find(
        self, where: MessageFilter, offset: int = 0, limit: int = 50
    ) -> tuple[int, list[MessageInfo]]:
        """(number of matching messages, the page ``offset .. offset+limit``)."""
        messages = await self.store.list_messages(state=where.state, limit=MAX_SCAN)
        now = self.clock.now()
        matching = [m for m in messages if where.matches(m, now)]
        return len(matching), matching[offset : offset + limit]

    async def get(self, queue_id: str) -> MessageInfo:
        info = await self.store.get_message(queue_id)
        if info is None:
            raise NotInQueue(queue_id)
        return info

    async def headers(self, queue_id: str) -> list[tuple[str, str]]:
        try:
            head = await _read_head(self.store.read_body(queue_id))
        except KeyError:
            raise NotInQueue(queue_id) from None
        return parse_headers(head)

    def raw(self, queue_id: str) -> AsyncIterator[bytes]:
        """The stored message in chunks (KeyError at the first chunk if unknown)."""
        return self.store.read_body(queue_id)

    async def recipient_tls(self, queue_id: str) -> dict[str, dict[str, Any]]:
        """Each recipient's last delivery attempt's TLS (see ``last_tls_by_recipient``)."""
        return last_tls_by_recipient(await self.events(queue_id))

    async def events(self, queue_id: str, limit: int = 500) -> list[QueueEvent]:
        if self.history is not None:
            await self.history.flush()  # show what just happened, not 0.5 s ago
        return await self.store.events(queue_id, limit)

    async def activity(self, hours: float, bucket_minutes: float) -> dict[str, Any]:
        """Events per kind and time bucket over the last ``hours`` (the dashboard chart)."""
        bucket = bucket_minutes * 60
        now = self.clock.now()
        # Align buckets to the clock so a chart refreshed later keeps its bars.
        end = (now // bucket + 1) * bucket
        start = end - max(1, round(hours * 3600 / bucket)) * bucket
        counts: list[EventCount] = await self.store.event_counts(start, bucket)
        kinds = ("received", "delivered", "deferred", "bounced")
        n = round((end - start) / bucket)
        series = {kind: [0] * n for kind in kinds}
        for c in counts:
            index = round((c.bucket_start - start) / bucket)
            if c.event in series and 0 <= index < n:
                series[c.event][index] = c.count
        return {
            "start": iso(start),
            "bucket_seconds": bucket,
            "buckets": [iso(start + i * bucket) for i in range(n)],
            "series": series,
        }

    # -- actions ------------------------------------------------------------

    async def apply(self, action: str, queue_id: str) -> dict[str, Any]:
        """Run one of ``ACTIONS`` on a message; the result as JSON."""
        handlers = {
            "retry": self.retry,
            "hold": self.hold,
            "release": self.release,
            "delete": self.delete,
            "bounce": self.bounce,
        }
        handler = handlers.get(action)
        if handler is None:
            raise QueueOpError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
        affected = await handler(queue_id)
        return {"queue_id": queue_id, "action": action, "recipients": affected}

    async def flush(self) -> int:
        """Every deferred record due now, and dead destinations revived."""
        now = self.clock.now()
        await suspensions.lift_unreachable(self.store, now)
        return await self.store.flush(now)

    async def retry(self, queue_id: str) -> int:
        info = await self.get(queue_id)
        now = self.clock.now()
        states = {r.state for r in info.records}
        if DeliveryState.DEFERRED in states:  # revived first: the runner may claim at once
            await suspensions.lift_unreachable(self.store, now)
        count = await self.store.flush(now, queue_id=queue_id)
        if count == 0:
            if DeliveryState.PENDING in states or DeliveryState.LEASED in states:
                count = sum(r.state is DeliveryState.PENDING for r in info.records)
            elif DeliveryState.HELD in states:
                raise QueueOpError(f"{queue_id} is on hold: release it to deliver it")
            else:
                raise QueueOpError(f"{queue_id} has no recipient waiting for a retry")
        await self._operator(queue_id, "retry", recipients=count)
        if self.wake_runner is not None:
            self.wake_runner()
        return count

    async def hold(self, queue_id: str) -> int:
        await self.get(queue_id)
        count = await self.store.hold(queue_id, self.clock.now())
        if count == 0:
            raise QueueOpError(f"{queue_id} has no recipient left to hold")
        await self._operator(queue_id, "hold", recipients=count)
        return count

    async def release(self, queue_id: str) -> int:
        await self.get(queue_id)
        count = await self.store.release(queue_id, self.clock.now())
        if count == 0:
            raise QueueOpError(f"{queue_id} is not on hold")
        await self._operator(queue_id, "release", recipients=count)
        if self.wake_runner is not None:
            self.wake_runner()
        return count

    async def delete(self, queue_id: str) -> int:
        info = await self.get(queue_id)
        if not await self.store.delete(queue_id):
            raise NotInQueue(queue_id)
        left = sum(r.state in _QUEUED for r in info.records)
        await self._operator(queue_id, "delete", recipients=left)
        return left

    async def bounce(self, queue_id: str) -> int:
        """Fail the recipients still queued, now, with a DSN to the sender.

        Hold first so the runner takes no new attempt; a delivery already in
        flight lands normally and is not bounced. The notice is queued before
        the records fail, so a crash in between gives a duplicate notice,
        never a lost one (the runner's order too).
        """
        await self.get(queue_id)
        now = self.clock.now()
        await self.store.hold(queue_id, now)
        info = await self.get(queue_id)
        candidates = [
            r
            for r in info.records
            if r.state is DeliveryState.HELD
            and not (r.lease_token and r.lease_expires and r.lease_expires > now)
        ]
        if not candidates:
            raise QueueOpError(f"{queue_id} has no recipient left to bounce")
        dsn_id = await self._send_bounce(info, candidates, now)
        failed = await self.store.fail_held(queue_id, OPERATOR_BOUNCE, now)
        fields = {"relay": "postmaster", "status": "550 5.0.0", "reply": OPERATOR_BOUNCE.text}
        for r in failed:
            self._emit("bounced", queue_id, {"to": r.recipient, **fields})
        await self._operator(queue_id, "bounce", recipients=len(failed), dsn_id=dsn_id)
        if dsn_id and self.wake_runner is not None:
            self.wake_runner()
        return len(failed)

    async def _send_bounce(
        self, info: MessageInfo, records: list[DeliveryRecord], now: float
    ) -> str | None:
        notice = [
            DsnRecipient(r.recipient, r.original_recipient, r.rcpt_params, OPERATOR_BOUNCE)
            for r in records
            if wants_notice(r.rcpt_params, "failed")
        ]
        if not info.sender or not notice or self.intake is None:
            return None  # never a notice to the null sender (RFC 3461 6.2)
        dsn_id = await queue_notice(self.store, self.intake, self.hostname, info, notice, now)
        self._emit("bounce", info.queue_id, {"dsn_id": dsn_id, "to": info.sender})
        return dsn_id

    # -- history ------------------------------------------------------------

    async def _operator(self, queue_id: str, action: str, **fields: Any) -> None:
        self._summary_cache = None  # an action changes the counts: show it at once
        self._emit("operator", queue_id, {"action": action, "by": self.actor, **fields})
        if self.history is not None:
            await self.history.flush()
        if self._unsaved:
            batch, self._unsaved = self._unsaved, []
            await self.store.add_events(batch)

    def _emit(self, event: str, queue_id: str, fields: dict[str, Any]) -> None:
        """Into the mail log, whose subscriber (the server's history recorder)
        stores it; without a recorder (the CLI), straight into the history."""
        if self.maillog is not None:
            self.maillog.event(event, queue_id, **fields)
        if self.history is None:
            self._unsaved.append(QueueEvent(queue_id, self.clock.now(), event, fields))
