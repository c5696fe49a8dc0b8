"""The queue runner: claims due work, routes it, hands it to transports, and
records each outcome.

Design note
-----------
The runner keeps a bounded active set (``concurrency`` deliveries in flight).
It claims due records with a lease, so a crashed process's work returns to
the queue when the lease expires; on shutdown it hands its leases back.
Records of one message with the same route travel together (one transport
call, one body read; the contract is ``delivery/transport.py``), and the
routes of one message are delivered at once, not one after another. A
delivery (one route of one message) is what ``concurrency`` counts, not a
recipient: a message to 1,000 recipients in 50 domains is 50 deliveries,
and claiming goes on while fewer are in flight (intake stores a message's
recipients grouped by domain, so one claim brings whole groups). What the
outcomes change is decided by the pure ``outcomes.plan_outcomes`` (delivered →
done; temporary → deferred with the next try from ``RetryPolicy``, until the
message's lifetime runs out; permanent or expired → failed, with a delivery
status notification to the sender, never to a null sender); the runner only
applies its plan: notices first (through intake), then the updates with the
fenced lease tokens, then the log events and metrics.

The runner wakes when intake commits in this process (the composition root
connects intake's commit hook to ``wake``), and polls the store every
``poll_interval`` seconds so that work made due from elsewhere (the
``postillon queue flush`` command, another node) is seen. Messages just
committed here come from the injected recent-message cache, not the store; each is
dropped from it after its first attempt, so the cache holds the active set only.

Every few seconds the runner writes a heartbeat to the store and hands back the
leases of runners whose heartbeat is older than ``node_timeout``: on a shared
queue a dead node's work is taken over in about that time, not after its
leases (``lease_seconds``) expire; a live node's long delivery keeps its lease,
because the node keeps beating. Fencing makes a runner wrongly declared dead
harmless (its late outcome is not recorded; the delivery may happen twice).
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
from collections.abc import Mapping, Sequence
from typing import Protocol

from postillon.core.clock import Clock, SystemClock
from postillon.core.outcome import Outcome, TempFail
from postillon.core.reply import Reply
from postillon.delivery.outcomes import MetricTick, keep_unnotified, plan_outcomes
from postillon.delivery.postpone import Postponer
from postillon.delivery.retry import RetryPolicy
from postillon.delivery.transport import DeliveryJob, Transport, checked_outcomes, group_by_route
from postillon.dsn.bounce import DsnRecipient
from postillon.dsn.notify import NoticeIntake, queue_notice
from postillon.observability.maillog import MailLog
from postillon.observability.metrics import Metrics
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


class CachedMessage(Protocol):
    """A message this process just committed (intake's recent-message cache)."""

    @property
    def info(self) -> MessageInfo: ...  # the envelope; ``records`` is empty

    @property
    def body(self) -> bytes | None: ...  # None: too large to cache, read the store


class RecentMessages(Protocol):
    """The recent-message cache the runner reads instead of the store (injected:
    the runner never reaches into intake)."""

    def get(self, queue_id: str) -> CachedMessage | None: ...

    def drop(self, queue_id: str) -> None: ...


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


NO_TRANSPORT = Reply.of(451, "4.3.5", "No transport configured for this destination")


class Runner:
    def __init__(
        self,
        store: QueueStore,
        router: Router,
        transports: dict[str, Transport],
        intake: NoticeIntake,
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
        recent: RecentMessages | None = None,
        node_timeout: float = 30.0,
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
        self.recent = recent
        self.node_timeout = node_timeout
        self._heartbeat: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self._wake = asyncio.Event()
        self._active: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # recipients being delivered
        self._deliveries = 0  # (message, route) groups being delivered: what concurrency bounds
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._postponer = Postponer(store)  # a suspended destination's due work

    def wake(self) -> None:
        self._wake.set()

    def reconfigure(
        self,
        router: Router,
        retry: RetryPolicy,
        hostname: str,
        *,
        concurrency: int,
        lease_seconds: float,
        delay_warning: float,
        node_timeout: float,
        transports: Mapping[str, Transport],
    ) -> None:
        """New settings from a reload. Deliveries in flight finish with what they
        started with; the next claim uses these. ``transports`` replaces the named
        transports only (the others stay)."""
        self.router = router
        self.retry = retry
        self.hostname = hostname
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.delay_warning = delay_warning
        self.node_timeout = node_timeout
        self.transports.update(transports)
        self.wake()  # a larger active set or a new route may have work now

    @property
    def in_flight(self) -> int:
        """Recipients being delivered right now (the admin status shows it)."""
        return self._in_flight

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="queue-runner")
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="queue-heartbeat")

    async def beat(self) -> int:
        """Say this runner is alive; take over the leases of runners that are not.

        Returns how many records came back to the queue. Runs every
        ``node_timeout / 3`` seconds (at most 5), so a live runner is never
        taken for dead while it merely delivers something slowly.
        """
        now = self.clock.now()
        await self.store.heartbeat(self.owner, now)
        released = await self.store.release_dead_owners(now, self.node_timeout)
        if released:
            log.warning(
                "took over %d delivery lease(s) of runner(s) silent for over %.0f s",
                released,
                self.node_timeout,
            )
            self._wake.set()
        return released

    async def _heartbeat_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await self.beat()
            except Exception:  # the store is down: the claims notice and log it too
                log.debug("queue heartbeat failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(self.node_timeout / 3, 5.0)):
                    await self._stop.wait()

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
        if self._heartbeat is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._active:
            _, pending = await asyncio.wait(self._active, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._postponer.stop()
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
            if started and self._deliveries < self.concurrency:
                continue
            self._wake.clear()
            timeout = self.poll_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _claim_and_dispatch(self) -> int:
        free = self.concurrency - self._deliveries
        if free <= 0:
            return 0
        await self._postponer.settled()  # a dead destination's wave leaves the due range
        records = await self.store.claim_due(self.clock.now(), free, self.lease_seconds, self.owner)
        if not records:
            return 0
        by_message: dict[str, list[DeliveryRecord]] = defaultdict(list)
        for record in records:
            by_message[record.queue_id].append(record)
        for queue_id, recs in by_message.items():
            groups = group_by_route(recs, self.router.route)
            self._in_flight += len(recs)
            self._deliveries += len(groups)
            task = asyncio.create_task(self._deliver_message(queue_id, recs, groups))
            self._active.add(task)
            task.add_done_callback(self._done)
        return len(records)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._active.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        self._wake.set()

    async def _deliver_message(
        self,
        queue_id: str,
        records: list[DeliveryRecord],
        groups: list[tuple[Route, list[DeliveryRecord]]],
    ) -> None:
        pending = len(groups)
        try:
            recent = self.recent.get(queue_id) if self.recent is not None else None
            message = recent.info if recent else await self.store.get_message(queue_id)
            if message is None:
                return
            cached_body = recent.body if recent else None

            async def deliver(
                route: Route, recs: list[DeliveryRecord]
            ) -> list[tuple[DeliveryRecord, Outcome, Route]]:
                nonlocal pending
                try:
                    outcomes = await self._run_transport(message, route, recs, cached_body)
                finally:
                    pending -= 1
                    self._deliveries -= 1  # a slot for the next claim at once
                    self._wake.set()
                return [(r, o, route) for r, o in zip(recs, outcomes, strict=True)]

            # Every route at once: 50 domains of one message are 50 parallel deliveries
            # (each transport keeps its own per-destination limits), not 50 in a row.
            parts = await asyncio.gather(*(deliver(route, recs) for route, recs in groups))
            await self._record(message, [item for part in parts for item in part])
        finally:
            self._in_flight -= len(records)
            self._deliveries -= pending
            if self.recent is not None:
                # Attempted: a message still queued is deferred for minutes at least,
                # and is read from the store then. Kept, the cache would hold every
                # deferred message of a backlog (up to its 32 MiB cap), not the active set.
                self.recent.drop(queue_id)

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
        return checked_outcomes(outcomes, records)

    async def _record(
        self, message: MessageInfo, results: list[tuple[DeliveryRecord, Outcome, Route]]
    ) -> None:
        """Apply what ``plan_outcomes`` decided about this attempt."""
        now = self.clock.now()
        plan = plan_outcomes(
            message, results, now, self.retry, delay_warning=self.delay_warning, rng=self._rng
        )
        self._postponer.note([(r, o) for r, o, _ in results], now, self.retry.max_lifetime)
        for event in plan.events:
            self.maillog.event(event.event, message.queue_id, **event.fields)
        if self.metrics is not None:
            self._count(plan.metrics)
        updates = plan.updates
        # Queue notifications before recording the outcomes: a crash in between
        # gives a duplicate notice, never a lost one.
        for notice in plan.notices:
            sent = await self._send_dsn(message, list(notice.recipients), now)
            if not sent and notice.kind == "failed":
                # The failure notice could not be queued (the store is down,
                # the disk is full): recording these recipients as failed now
                # would lose the bounce for good. Keep them queued instead; the
                # next attempt meets the same failure and queues the notice then.
                updates = keep_unnotified(updates, notice.record_ids, now)
        if updates:
            await self._record_outcomes(list(updates))

    def _count(self, ticks: Sequence[MetricTick]) -> None:
        metrics = self.metrics
        assert metrics is not None
        for tick in ticks:
            if tick.kind == "delivered":
                metrics.delivered.labels(tick.route_kind).inc()
            elif tick.kind == "deferred":
                metrics.deferred.labels(tick.route_kind, tick.reason).inc()
            else:
                metrics.bounced.labels(tick.route_kind, tick.reason).inc()
            if tick.delay is not None:
                metrics.delivery_seconds.labels(tick.kind).observe(tick.delay)

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
