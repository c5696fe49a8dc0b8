"""The queue runner: claims due work, routes it, hands it to transports, and
records each outcome.

Design note
-----------
The runner keeps a bounded active set (``concurrency`` deliveries in flight).
It claims due records with a lease, so a crashed process's work returns to
the queue when the lease expires; on shutdown it hands its leases back.
Records of one message with the same route travel together (one transport
call, one body read). Each outcome is recorded with the fenced lease token:
delivered → done; temporary → deferred with the next try from the pure
``RetryPolicy``, until the message's lifetime runs out; permanent or
expired → failed, and a delivery status notification goes to the sender
through intake (never for a null sender).

The runner wakes when intake commits (same process), and polls the store
every ``poll_interval`` seconds so that work made due from elsewhere (the
``postillon queue flush`` command, another node) is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from postillon.core.clock import Clock, SystemClock
from postillon.core.outcome import Delivered, Outcome, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.delivery.retry import RetryPolicy
from postillon.dsn.bounce import (
    DsnRecipient,
    wants_notice,
)
from postillon.dsn.notify import queue_notice
from postillon.intake.intake import Intake
from postillon.observability.maillog import MailLog
from postillon.observability.metrics import Metrics, outcome_reason
from postillon.queue.store import (
    DeliveryRecord,
    DeliveryState,
    MessageInfo,
    OutcomeUpdate,
    QueueStore,
    StoreError,
)
from postillon.routing.router import Route, Router

log = logging.getLogger("postillon.runner")


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    message: MessageInfo
    records: tuple[DeliveryRecord, ...]
    route: Route
    store: QueueStore
    cached_body: bytes | None = None  # from intake's recent-message cache

    def body(self) -> Iterator[bytes]:
        """The stored body in chunks; blocking, so call it from a thread."""
        if self.cached_body is not None:
            return iter((self.cached_body,))
        return self.store.open_body(self.message.queue_id)


class Transport(Protocol):
    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        """Deliver ``job.records``; return one outcome per record, in order.

        Contract: never raises for delivery problems (they are outcomes); an
        exception that escapes anyway is recorded as a temporary failure.
        """
        ...


def _keep_unnotified(
    updates: list[OutcomeUpdate], record_ids: set[int], now: float
) -> list[OutcomeUpdate]:
    """The updates with the given records' FAILED outcomes turned into a
    deferral that counts no attempt: they stay queued until their bounce can be."""
    return [
        replace(
            update,
            state=DeliveryState.DEFERRED,
            next_try=now + UNNOTIFIED_RETRY_DELAY,
            attempted=False,
        )
        if update.record_id in record_ids and update.state is DeliveryState.FAILED
        else update
        for update in updates
    ]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Work a transport could not even start is offered again after about this long.
NOT_ATTEMPTED_DELAY = 2.0
# How soon recipients whose failure notice could not be queued are tried again.
UNNOTIFIED_RETRY_DELAY = 60.0

NO_TRANSPORT = Reply.of(451, "4.3.5", "No transport configured for this destination")
EXPIRED = "message expired in queue"


class Runner:
    def __init__(
        self,
        store: QueueStore,
        router: Router,
        transports: dict[str, Transport],
        intake: Intake,
        retry: RetryPolicy,
        maillog: MailLog,
        hostname: str,
        *,
        concurrency: int = 50,
        lease_seconds: float = 300.0,
        poll_interval: float = 1.0,
        clock: Clock | None = None,
        owner: str | None = None,
        delay_warning: float = 0.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.router = router
        self.transports = transports
        self.intake = intake
        self.retry = retry
        self.maillog = maillog
        self.hostname = hostname
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self.delay_warning = delay_warning
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._wake = asyncio.Event()
        self._active: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        intake.on_commit(self.wake)

    def wake(self) -> None:
        self._wake.set()

    @property
    def in_flight(self) -> int:
        """Recipients being delivered right now (the admin status shows it)."""
        return self._in_flight

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="queue-runner")

    async def recover_dead_leases(self) -> int:
        """Hand back leases of earlier processes on this host that no longer run.

        After ``kill -9`` or a power cut the old process's leases would only
        expire after ``lease_seconds``; a process on the same host can tell
        that their owner is dead and resume its work at once. Leases of other
        hosts (a shared queue) are left to expire.
        """
        host = self.owner.rpartition(":")[0]
        owners: set[str] = set()
        for message in await self.store.list_messages(state=DeliveryState.LEASED, limit=100_000):
            owners.update(r.lease_owner for r in message.records if r.lease_owner)
        released = 0
        for owner in owners:
            owner_host, _, pid = owner.rpartition(":")
            if owner == self.owner or owner_host != host or not pid.isdigit():
                continue
            if _process_alive(int(pid)):
                continue
            released += await self.store.release_leases(owner)
        if released:
            log.info("returned %d delivery lease(s) of dead processes to the queue", released)
        return released

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, let deliveries in flight finish (bounded), hand leases back."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._active:
            _, pending = await asyncio.wait(self._active, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self.store.release_leases(self.owner)

    async def run_once(self) -> int:
        """Claim and deliver whatever is due now; wait for it. For tests and `queue flush`."""
        started = await self._claim_and_dispatch()
        while self._active:
            await asyncio.wait(set(self._active))
        return started

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                started = await self._claim_and_dispatch()
            except Exception:
                log.exception("queue runner: claiming work failed; retrying in 5 s")
                started = 0
                await asyncio.sleep(5)
            if self._stop.is_set():
                break
            if started and self._in_flight < self.concurrency:
                continue
            self._wake.clear()
            timeout = self.poll_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _claim_and_dispatch(self) -> int:
        free = self.concurrency - self._in_flight
        if free <= 0:
            return 0
        records = await self.store.claim_due(self.clock.now(), free, self.lease_seconds, self.owner)
        if not records:
            return 0
        by_message: dict[str, list[DeliveryRecord]] = defaultdict(list)
        for record in records:
            by_message[record.queue_id].append(record)
        for queue_id, recs in by_message.items():
            self._in_flight += len(recs)
            task = asyncio.create_task(self._deliver_message(queue_id, recs))
            self._active.add(task)
            task.add_done_callback(self._done)
        return len(records)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        self._wake.set()

    async def _deliver_message(self, queue_id: str, records: list[DeliveryRecord]) -> None:
        try:
            recent = self.intake.recent.get(queue_id)
            message = recent.info if recent else await self.store.get_message(queue_id)
            if message is None:
                return
            cached_body = recent.body if recent else None
            groups: dict[str, tuple[Route, list[DeliveryRecord]]] = {}
            for record in records:
                route = self.router.route(record.recipient)
                groups.setdefault(route.key, (route, []))[1].append(record)
            results: list[tuple[DeliveryRecord, Outcome, Route]] = []
            for route, recs in groups.values():
                outcomes = await self._run_transport(message, route, recs, cached_body)
                results.extend((r, o, route) for r, o in zip(recs, outcomes, strict=True))
            await self._record(message, results)
        finally:
            self._in_flight -= len(records)

    async def _run_transport(
        self,
        message: MessageInfo,
        route: Route,
        records: list[DeliveryRecord],
        cached_body: bytes | None = None,
    ) -> Sequence[Outcome]:
        transport = self.transports.get(route.kind)
        if transport is None:
            return [TempFail(NO_TRANSPORT, route.kind) for _ in records]
        job = DeliveryJob(message, tuple(records), route, self.store, cached_body)
        started = time.perf_counter()
        try:
            outcomes = await transport.deliver(job)
            if self.metrics is not None:
                self.metrics.attempt_seconds.labels(route.kind).observe(
                    time.perf_counter() - started
                )
        except Exception as exc:  # unknown errors count as temporary (DESIGN principle 6)
            log.exception("transport %s raised for %s", route.kind, message.queue_id)
            reply = Reply.of(
                451, "4.3.0", f"Local error in {route.kind} transport: {type(exc).__name__}"
            )
            return [TempFail(reply) for _ in records]
        if len(outcomes) != len(records):
            reply = Reply.of(451, "4.3.0", "Transport returned a wrong number of results")
            return [TempFail(reply) for _ in records]
        return outcomes

    async def _record(
        self, message: MessageInfo, results: list[tuple[DeliveryRecord, Outcome, Route]]
    ) -> None:
        now = self.clock.now()
        updates: list[OutcomeUpdate] = []
        failed: list[DsnRecipient] = []
        failed_record_ids: set[int] = set()  # the records the failure notice is about
        delayed: list[DsnRecipient] = []
        succeeded: list[DsnRecipient] = []
        expired = self.retry.expired(message.received_at, now)
        for record, outcome, route in results:
            delay = now - message.received_at
            fields = {
                "to": record.recipient,
                "orig_to": record.original_recipient,
                "relay": outcome.detail or route.kind,
                "delay": f"{delay:.2f}",
                "attempts": record.attempts + 1,
                "status": f"{outcome.reply.code} {outcome.reply.status or ''}".strip(),
                "reply": outcome.reply.text,
            }
            if isinstance(outcome, Delivered):
                updates.append(
                    OutcomeUpdate(
                        record.record_id,
                        record.lease_token or "",
                        DeliveryState.DELIVERED,
                        outcome.reply,
                        now,
                        now,
                    )
                )
                self.maillog.event("delivered", message.queue_id, **fields)
                if self.metrics is not None:
                    self.metrics.delivered.labels(route.kind).inc()
                    self.metrics.delivery_seconds.labels("delivered").observe(delay)
                action = "relayed" if outcome.relayed_without_dsn else "delivered"
                notify = route.kind in ("maildir", "lmtp") or outcome.relayed_without_dsn
                if notify and wants_notice(record.rcpt_params, action):
                    succeeded.append(
                        DsnRecipient(
                            record.recipient,
                            record.original_recipient,
                            record.rcpt_params,
                            outcome.reply,
                            remote=outcome.detail if action == "relayed" else "",
                            action=action,
                        )
                    )
                continue
            if isinstance(outcome, TempFail) and not outcome.attempted:
                # Not tried (destination slots busy): back in a few seconds,
                # no attempt counted, nothing to log at info level.
                updates.append(
                    OutcomeUpdate(
                        record.record_id,
                        record.lease_token or "",
                        DeliveryState.DEFERRED,
                        outcome.reply,
                        now + NOT_ATTEMPTED_DELAY * (0.5 + random.random()),
                        now,
                        attempted=False,
                    )
                )
                continue
            if isinstance(outcome, TempFail) and not expired:
                next_try = self.retry.next_try(record.attempts + 1, now)
                updates.append(
                    OutcomeUpdate(
                        record.record_id,
                        record.lease_token or "",
                        DeliveryState.DEFERRED,
                        outcome.reply,
                        next_try,
                        now,
                    )
                )
                self.maillog.event(
                    "deferred", message.queue_id, **fields, next_try=f"{next_try - now:.0f}s"
                )
                if self.metrics is not None:
                    self.metrics.deferred.labels(route.kind, outcome_reason(outcome.reply)).inc()
                if self._crosses_delay_warning(message, record, next_try) and wants_notice(
                    record.rcpt_params, "delayed"
                ):
                    delayed.append(
                        DsnRecipient(
                            record.recipient,
                            record.original_recipient,
                            record.rcpt_params,
                            outcome.reply,
                            remote=outcome.detail,
                            action="delayed",
                        )
                    )
                continue
            reply = outcome.reply
            if isinstance(outcome, TempFail):
                reply = Reply(
                    outcome.reply.code + 100 if outcome.reply.code < 500 else outcome.reply.code,
                    "5" + (outcome.reply.status or "4.4.7")[1:],
                    (*outcome.reply.lines[:1], EXPIRED),
                )
                self.maillog.event("expired", message.queue_id, **fields)
            updates.append(
                OutcomeUpdate(
                    record.record_id,
                    record.lease_token or "",
                    DeliveryState.FAILED,
                    reply,
                    now,
                    now,
                )
            )
            self.maillog.event("bounced", message.queue_id, **{**fields, "status": str(reply.code)})
            if self.metrics is not None:
                reason = "expired" if isinstance(outcome, TempFail) else outcome_reason(reply)
                self.metrics.bounced.labels(route.kind, reason).inc()
                self.metrics.delivery_seconds.labels("bounced").observe(delay)
            if wants_notice(record.rcpt_params, "failed"):
                failed_record_ids.add(record.record_id)
                failed.append(
                    DsnRecipient(
                        record.recipient,
                        record.original_recipient,
                        record.rcpt_params,
                        reply,
                        remote=outcome.detail if isinstance(outcome, PermFail) else "",
                    )
                )
        # Queue notifications before recording the outcomes: a crash in between
        # gives a duplicate notice, never a lost one. Never notify the null sender.
        if message.sender:
            for notice in (failed, delayed, succeeded):
                if notice and not await self._send_dsn(message, notice, now) and notice is failed:
                    # The failure notice could not be queued (the store is down,
                    # the disk is full): recording these recipients as failed now
                    # would lose the bounce for good. Keep them queued instead; the
                    # next attempt meets the same failure and queues the notice then.
                    updates = _keep_unnotified(updates, failed_record_ids, now)
        if updates:
            completed = await self._record_outcomes(updates)
            for queue_id in completed:
                self.intake.recent.drop(queue_id)

    async def _record_outcomes(self, updates: list[OutcomeUpdate]) -> list[str]:
        """Record outcomes, retrying while the store is unreachable (a shared queue's
        database restarting) for up to half the lease: an outcome that is lost makes
        the delivery run again, a duplicate, once the lease expires."""
        waited, delay = 0.0, 0.2
        while True:
            try:
                return await self.store.record_outcomes(updates)
            except StoreError:
                waited += delay
                if waited > self.lease_seconds / 2 or self._stop.is_set():
                    raise
                log.warning(
                    "recording %d outcome(s) failed; retrying in %.1f s", len(updates), delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _crosses_delay_warning(
        self, message: MessageInfo, record: DeliveryRecord, next_try: float
    ) -> bool:
        """True for exactly one attempt: the last one due before the warning
        threshold whose retry falls after it.

        Due times grow with every attempt, so exactly one attempt brackets the
        threshold; no "already warned" state needs storing. (``queue flush``
        moves due times and may, rarely, cause a second warning.)
        """
        if self.delay_warning <= 0:
            return False
        threshold = message.received_at + self.delay_warning
        return record.next_try <= threshold < next_try

    async def _send_dsn(self, message: MessageInfo, notice: list[DsnRecipient], now: float) -> bool:
        """Queue one notice to the sender; False when it could not be queued."""
        try:
            bounce_id = await queue_notice(
                self.store, self.intake, self.hostname, message, notice, now
            )
        except Exception:
            log.exception("could not queue the bounce for %s", message.queue_id)
            return False
        self.maillog.event("bounce", message.queue_id, dsn_id=bounce_id, to=message.sender)
        return True
