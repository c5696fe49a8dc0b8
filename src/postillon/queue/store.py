"""The queue store protocol: durable state only, no scheduling decisions.

Design note (read this before changing a store)
-----------------------------------------------
A message is stored once (its body is immutable after commit) and tracked per
recipient: one ``DeliveryRecord`` per recipient, each with its own state,
attempts, next try and last reply (OpenSMTPD's envelopes). The store keeps
state; *when* to retry is decided by ``delivery/retry.py`` and *what* to do by
``delivery/`` (OpenSMTPD's queue_backend vs scheduler_backend split).

Contract, as a transaction:

1. ``commit(NewMessage)`` makes the body and every delivery record durable in
   one step (an fsync, possibly shared with other commits: group commit). When
   it returns, the message survives ``kill -9`` and power loss. When it raises,
   nothing of the message is visible.
2. ``claim_due(now, limit, lease_seconds, owner)`` moves up to ``limit``
   records whose state is PENDING or DEFERRED and whose ``next_try <= now``
   (or LEASED with an expired lease) to LEASED with a fresh ``lease_token``.
3. ``record_outcomes`` stores each outcome only if the record is still leased
   with the same token (fencing: a node whose lease expired cannot overwrite a
   newer result). It returns the ids of messages whose records are now all
   final, and the store deletes those messages' bodies.
4. ``release_leases(owner)`` hands an owner's leased records back (shutdown).
   ``heartbeat(owner, now)`` says an owner (a node's runner) is alive;
   ``release_dead_owners(now, timeout)`` hands back the leases of every owner
   whose last heartbeat is older than ``timeout`` and forgets it, so a dead
   node's work is taken over long before its leases expire. Fencing is as in 3:
   a node declared dead that was only slow cannot record over the new holder.
5. ``add_events`` appends to a message's history (received, each delivery
   attempt with the remote reply, operator actions). History is kept apart
   from the message: it outlives delivery, so "what happened to this
   message?" has an answer after the message left the queue, until
   ``prune_events`` drops it. Losing the last moments of history in a crash
   is acceptable; it never blocks or fails mail.
6. ``save_sts_policy`` / ``sts_policy`` / ``sts_policies`` keep the MTA-STS policy
   cache (RFC 8461, ``sts_cache.py``): one ``CachedPolicy`` per domain, shared by
   restarts and nodes. A save never replaces a policy fetched later than it.
7. ``tls_reports`` (a ``TlsReportStore``, ``tls_reports.py``) keeps the daily SMTP TLS
   reporting counters (RFC 8460): ``add`` adds counts (never replaces them, so
   every node contributes), ``claim`` lets one node send each day's report of a
   domain.
8. ``acme`` (an ``AcmeStateStore``, ``acme_state.py``) keeps the ACME certificate and
   the lease that lets one node of a cluster renew it at a time.
9. ``traces`` (a ``TraceStore``, ``traces.py``) keeps the checks' decisions for
   ``postillon explain``, bounded by age.
10. ``policy_state`` (a ``PolicyStateStore``, ``policy_state.py``) keeps the inbound
   policy's shared state: greylisting triplets (``greylist.check`` decides and records
   in one transaction), port-25 rate counters (``rates.take``: all or nothing), and the
   DMARC aggregate report counters (``dmarc_reports``, the same contract as step 7).
11. ``shaping`` (a ``ShapingState``, ``shaping_state.py``) keeps destination
   suspensions and the token buckets of ``[[shaping]]`` rates, shared by every node.
12. ``claim_due`` claims the highest ``NewMessage.priority`` first, then by
   ``next_try``; a record deferred after an attempt rises to priority 1 at least.
   Its cost does not grow with the records that are not due (``claims.py``).
13. ``shape(now, buckets)`` counts the queued recipients by domain, state and age
   bucket in the store (``queue_shape.py``): the queue summary reads a few rows.
14. ``postpone_domain`` moves the records of one recipient domain due before a time
   past it in one write, attempts unchanged (a suspended destination's retry wave, ``postpone.py``).

Operator commands (hold, release, delete, flush) are store operations too, so
they work from another process while the server runs.

``health()`` tells whether the store can take and keep mail, and whether it can
recover by itself; ``/healthz`` answers 503 while it cannot, and the server exits
(non-zero) when it never will, so that a supervisor restarts it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Any, Protocol

from postillon.core.dmarc import DmarcResultCount
from postillon.core.envelope import MailParams, RcptParams
from postillon.core.envelope import NewRecipient as NewRecipient  # re-exported: stores take it
from postillon.core.reply import Reply
from postillon.core.sts import CachedPolicy
from postillon.core.tlsrpt import TlsResultCount
from postillon.core.trace import TraceStep
from postillon.queue.greylist_state import GreylistPolicy as GreylistPolicy  # re-exported
from postillon.queue.greylist_state import GreylistResult as GreylistResult
from postillon.queue.rate_counters import RateRequest as RateRequest
from postillon.queue.shaping_state import ShapingState


class DeliveryState(StrEnum):
    PENDING = "pending"
    LEASED = "leased"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"
    HELD = "held"

    @property
    def is_final(self) -> bool:
        return self in (DeliveryState.DELIVERED, DeliveryState.FAILED)


@dataclass(frozen=True, slots=True)
class StoreHealth:
    """What ``QueueStore.health()`` says: can the store take and keep mail now?"""

    ok: bool
    reason: str = ""  # why not, for /healthz and the log
    # False: the store cannot come back by itself (the SQLite writer thread died,
    # the store was closed). The server exits then, for its supervisor to restart
    # it; a PostgreSQL database that is unreachable may come back (recoverable).
    recoverable: bool = True


HEALTHY = StoreHealth(True)


class StoreError(Exception):
    """The store could not complete an operation (e.g. a group commit failed).

    Callers treat it like any unexpected error: intake answers ``451 4.3.0``,
    the runner retries later. Nothing of the failed operation is visible.
    """


@dataclass(frozen=True, slots=True)
class NewMessage:
    """Everything intake hands to the store in one commit.

    ``body`` is a readable binary file positioned at 0 holding the complete
    message as it will be delivered (with the ``Received:`` header already
    prepended); the store copies it and does not close it.
    """

    queue_id: str
    sender: str  # "" for the null reverse path
    mail_params: MailParams
    recipients: Sequence[NewRecipient]
    body: IO[bytes]
    size: int
    received_at: float
    client: str = ""  # "helo (rdns) [ip]" for logs and the queue view
    source: str = ""  # listener name or "sendmail", "bounce", ...
    # Quarantined by a check: every record starts HELD (``queue release`` lets it go),
    # in the same commit, so no runner can claim it first.
    held: bool = False
    # Claim order: records of a higher priority are claimed first (delivery/priority.py).
    priority: int = 0


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    record_id: int
    queue_id: str
    recipient: str
    original_recipient: str | None
    rcpt_params: RcptParams
    state: DeliveryState
    attempts: int
    next_try: float
    last_reply: Reply | None
    lease_token: str | None
    lease_owner: str | None
    lease_expires: float | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class MessageInfo:
    queue_id: str
    sender: str
    mail_params: MailParams
    size: int
    received_at: float
    client: str
    source: str
    records: tuple[DeliveryRecord, ...]

    @classmethod
    def envelope_of(cls, message: NewMessage) -> MessageInfo:
        """The envelope of a message being committed, without its records."""
        return cls(
            queue_id=message.queue_id,
            sender=message.sender,
            mail_params=message.mail_params,
            size=message.size,
            received_at=message.received_at,
            client=message.client,
            source=message.source,
            records=(),
        )


@dataclass(frozen=True, slots=True)
class OutcomeUpdate:
    """What the runner learned about one leased record."""

    record_id: int
    lease_token: str
    state: DeliveryState  # DELIVERED, DEFERRED or FAILED
    reply: Reply
    next_try: float  # meaningful for DEFERRED
    now: float
    # False when the transport did not try at all (the destination's
    # connection slots were all busy): the record is rescheduled without
    # counting an attempt or replacing its last reply.
    attempted: bool = True


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """One step of a message's history (the mail log event with its queue id).

    ``event`` is the mail log's event name (``received``, ``deferred``,
    ``delivered``, ``bounced``, ``expired``, ``bounce``, ...) or ``operator``
    for an admin action; ``fields`` holds JSON-serialisable values.
    """

    queue_id: str
    at: float
    event: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EventCount:
    """How many events of one kind fell into one time bucket (for activity charts)."""

    bucket_start: float
    event: str
    count: int


@dataclass(frozen=True, slots=True)
class ShapeRow:
    """Queued recipients of one (domain, state, age bucket)."""

    domain: str  # after the recipient's last "@", as stored ("" without one)
    state: str
    bucket: int  # index into the age buckets
    count: int
    oldest_received_at: float  # the oldest of their messages


@dataclass(frozen=True, slots=True)
class QueueShape:
    """The queue's shape as ``QueueStore.shape`` aggregates it (queue_shape.py)."""

    messages: int  # messages in the queue
    rows: tuple[ShapeRow, ...]
    oldest_queue_id: str | None  # the oldest message with a queued recipient
    oldest_received_at: float | None


class TlsReportStore(Protocol):
    """The RFC 8460 counters of a store (``queue/tls_reports.py``), as a transaction:

    1. ``add(rows)`` adds each row's ``count`` to its counter (day, policy domain,
       ``TlsResultCount.key``), creating it at zero first; rows of one batch that
       name the same counter add up. Domains are stored in lower case.
    2. ``day(day, domain=None)`` reads the counters of one UTC day (of one domain).
    3. ``claim(day, domain, owner, now)`` is True for exactly one caller per
       (day, domain), across nodes and restarts: that caller sends the report.
    4. ``prune(before_day)`` drops counters and claims of days before ``before_day``
       and returns how many counters went.
    """

    async def add(self, rows: Sequence[TlsResultCount]) -> None: ...

    async def day(self, day: str, domain: str | None = None) -> list[TlsResultCount]: ...

    async def claim(self, day: str, domain: str, owner: str, now: float) -> bool: ...

    async def prune(self, before_day: str) -> int: ...


@dataclass(frozen=True, slots=True)
class SharedCertificate:
    """An ACME certificate as every node of a cluster loads it (``queue/acme_state.py``)."""

    names: tuple[str, ...]
    chain_pem: bytes
    key_pem: bytes
    not_after: float
    updated_at: float


class AcmeStateStore(Protocol):
    """The ACME certificate and renewal lease of a store (``queue/acme_state.py``):

    1. ``certificate(names)`` is the last one saved for that set of names (any order).
    2. ``save_certificate(cert)`` keeps it unless one expiring later is kept already.
    3. ``take_lease(holder, now, until)`` is True for one holder at a time: when the
       lease is free, expired at ``now``, or held by ``holder`` already (then extended).
    4. ``release_lease(holder)`` frees it, when ``holder`` holds it.
    """

    async def certificate(self, names: tuple[str, ...]) -> SharedCertificate | None: ...

    async def save_certificate(self, cert: SharedCertificate) -> None: ...

    async def take_lease(self, holder: str, now: float, until: float) -> bool: ...

    async def release_lease(self, holder: str) -> None: ...


class TraceStore(Protocol):
    """The decision trace of ``postillon explain`` (``queue/traces.py``, where the
    contract is written as a transaction)."""

    async def add(self, steps: Sequence[TraceStep]) -> None: ...

    async def session(self, session_id: str) -> list[TraceStep]: ...

    async def message(self, queue_id: str) -> list[TraceStep]: ...

    async def sessions(
        self,
        client_ip: str,
        since: float,
        until: float,
        rejected_only: bool = False,
        limit: int = 20,
    ) -> list[TraceStep]: ...

    async def prune(self, before: float) -> int: ...


class GreylistStore(Protocol):
    """Greylisting state (``queue/greylist_state.py``): ``check`` returns the triplet's
    verdict and records the attempt, in one transaction; ``prune`` forgets rows unseen
    since ``before``."""

    async def check(
        self, client_net: str, sender: str, recipient: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult: ...

    async def peek(
        self, client_net: str, sender: str, recipient: str, now: float, policy: GreylistPolicy
    ) -> GreylistResult:
        """What ``check`` would answer, recording nothing (``explain --simulate``)."""
        ...

    async def prune(self, before: float) -> int: ...


class RateCounterStore(Protocol):
    """Shared rate counters (``queue/rate_counters.py``): ``take`` counts every request
    or none, and returns the index of the first that would pass its limit (None: all
    counted)."""

    async def take(self, requests: Sequence[RateRequest], now: float) -> int | None: ...

    async def used(self, counter: str, window: int, now: float) -> int: ...

    async def prune(self, now: float) -> int: ...


class DmarcReportStore(Protocol):
    """The RFC 7489 §7.2 counters; the same contract as ``TlsReportStore``."""

    async def add(self, rows: Sequence[DmarcResultCount]) -> None: ...

    async def day(self, day: str, domain: str | None = None) -> list[DmarcResultCount]: ...

    async def claim(self, day: str, domain: str, owner: str, now: float) -> bool: ...

    async def prune(self, before_day: str) -> int: ...


class PolicyStateStore(Protocol):
    @property
    def greylist(self) -> GreylistStore: ...

    @property
    def rates(self) -> RateCounterStore: ...

    @property
    def dmarc_reports(self) -> DmarcReportStore: ...


class QueueStore(Protocol):
    @property
    def tls_reports(self) -> TlsReportStore:
        """The RFC 8460 counters (contract step 7)."""
        ...

    @property
    def acme(self) -> AcmeStateStore:
        """The ACME certificate and renewal lease (contract step 8)."""
        ...

    @property
    def traces(self) -> TraceStore:
        """The decision trace (contract step 9)."""
        ...

    @property
    def policy_state(self) -> PolicyStateStore:
        """Greylisting, rate counters, DMARC report counters (contract step 10)."""
        ...

    @property
    def shaping(self) -> ShapingState:
        """Suspensions and rate buckets (contract step 11)."""
        ...

    async def commit(self, message: NewMessage) -> None: ...

    async def claim_due(
        self, now: float, limit: int, lease_seconds: float, owner: str
    ) -> list[DeliveryRecord]: ...

    async def record_outcomes(self, updates: Sequence[OutcomeUpdate]) -> list[str]:
        """Apply fenced updates; return queue ids that are now complete (and removed)."""
        ...

    async def release_leases(self, owner: str) -> int: ...

    async def heartbeat(self, owner: str, now: float) -> None:
        """Record that ``owner`` is alive at ``now`` (a node's runner, every few seconds)."""
        ...

    async def release_dead_owners(self, now: float, timeout: float) -> int:
        """Hand back the leases of owners whose heartbeat is older than ``now - timeout``
        (as ``release_leases``), forget those owners; return how many records."""
        ...

    async def next_due(self) -> float | None:
        """The earliest ``next_try`` of a claimable record, or None if nothing waits."""
        ...

    def read_body(self, queue_id: str) -> AsyncIterator[bytes]:
        """The committed body in chunks: ``async for chunk in store.read_body(queue_id)``.

        Implemented as an async generator (``async def ... yield``), so it never
        blocks the event loop: the SQLite store reads each chunk on its reader
        threads, PostgreSQL natively. It raises ``KeyError`` at the first chunk
        if the message is unknown, and ``StoreError`` if the message is deleted
        while it is read (never a silently truncated body). No transaction is
        held between chunks: a delivery to a slow peer must not pin a snapshot.
        """
        ...

    async def get_message(self, queue_id: str) -> MessageInfo | None: ...

    async def list_messages(
        self, state: DeliveryState | None = None, limit: int = 1000
    ) -> list[MessageInfo]: ...

    async def hold(self, queue_id: str, now: float) -> int: ...

    async def release(self, queue_id: str, now: float) -> int: ...

    async def delete(self, queue_id: str) -> bool: ...

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
        """Move up to ``limit`` records (PENDING or DEFERRED) of recipients in ``domain``
        due before ``until`` (``next_try <= until``) to DEFERRED at ``until`` + up to
        ``spread`` s, attempts unchanged,
        ``reply`` as the last reply of those that have none; records of messages
        received before ``expire_before`` stay due. How many moved (step 14)."""
        ...

    async def flush(self, now: float, queue_id: str | None = None) -> int:
        """Make every deferred record (of ``queue_id`` only, if given) due now; return how many."""
        ...

    async def fail_held(self, queue_id: str, reply: Reply, now: float) -> list[DeliveryRecord]:
        """Operator bounce: every HELD record of ``queue_id`` whose delivery is not
        in flight becomes FAILED with ``reply`` (attempts unchanged).

        Returns those records as they are now. When every record of the
        message is then final, the message and its body are removed, as after
        ``record_outcomes``.
        """
        ...

    async def add_events(self, events: Sequence[QueueEvent]) -> None:
        """Append history events (in one write)."""
        ...

    async def events(self, queue_id: str, limit: int = 500) -> list[QueueEvent]:
        """The last ``limit`` events of ``queue_id``, oldest first."""
        ...

    async def event_counts(self, since: float, bucket: float) -> list[EventCount]:
        """Events at or after ``since`` counted per kind and per ``bucket`` seconds
        (bucket_start = since + k * bucket), in bucket order."""
        ...

    async def prune_events(self, before: float) -> int:
        """Drop events older than ``before``; return how many."""
        ...

    async def count_by_state(self) -> dict[str, int]:
        """Number of delivery records per state (every ``DeliveryState`` value is a key)."""
        ...

    async def shape(self, now: float, buckets_minutes: Sequence[float]) -> QueueShape:
        """Queued recipients by domain, state and age bucket (contract step 13)."""
        ...

    async def sts_policy(self, domain: str) -> CachedPolicy | None:
        """The cached MTA-STS policy of ``domain`` (any case), expired or not."""
        ...

    async def save_sts_policy(self, entry: CachedPolicy) -> None:
        """Insert or replace ``entry.domain``'s policy, unless the stored one was
        fetched later (``fetched_at``)."""
        ...

    async def sts_policies(self) -> list[CachedPolicy]:
        """Every cached MTA-STS policy, by domain."""
        ...

    def health(self) -> StoreHealth:
        """Whether the store can take and keep mail now (cheap: no I/O; /healthz and
        the server's watchdog call it every second)."""
        ...

    async def close(self) -> None: ...
