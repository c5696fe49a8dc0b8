"""The queue runner with an in-memory store, a fake clock and scripted
transports: retries follow the policy, expiry and permanent failures bounce
(never for a null sender), delay warnings go out once, success notices when
asked."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from postillon.config.model import DomainConfig
from postillon.core.clock import FakeClock
from postillon.core.envelope import MailParams, RcptParams
from postillon.core.outcome import Delivered, Outcome, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.delivery.retry import RetryPolicy
from postillon.delivery.runner import Runner
from postillon.delivery.transport import DeliveryJob
from postillon.intake.intake import Intake
from postillon.observability.maillog import null_maillog
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import DeliveryState, NewRecipient, StoreError
from postillon.routing.local import LocalRecipients
from postillon.routing.router import Router

OK = Reply.of(250, "2.0.0", "Ok")
BUSY = Reply.of(451, "4.3.0", "try later")
GONE = Reply.of(550, "5.1.1", "no such user")


class Scripted:
    """A transport answering from a script: recipient → list of outcomes in order."""

    def __init__(self, script: dict[str, list[Outcome]]) -> None:
        self.script = script
        self.calls: list[tuple[str, ...]] = []

    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        self.calls.append(tuple(r.recipient for r in job.records))
        body = b"".join([c async for c in job.body()])
        assert body.endswith(b"body\r\n")
        return [self.script[r.recipient].pop(0) for r in job.records]


class Capture:
    """Maildir stand-in that records what local recipients got (bounces land here)."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, bytes]] = []

    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        body = b"".join([c async for c in job.body()])
        self.delivered.extend((r.recipient, body) for r in job.records)
        return [Delivered(OK, "capture") for _ in job.records]


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    clock = FakeClock()
    store = MemoryStore(clock_now=clock.now)
    intake = Intake(store, "mx.test", tmp_path / "spool", clock=clock)
    local = LocalRecipients(
        [DomainConfig(name="local.test", mailboxes=("alice",))], {}, hostname="mx.test"
    )
    return clock, store, intake, local


def make_runner(env, remote: Scripted, **kw):  # type: ignore[no-untyped-def]
    clock, store, intake, local = env
    capture = Capture()
    runner = Runner(
        store,
        Router(local),
        {"smtp": remote, "maildir": capture},
        intake,
        RetryPolicy(first_delay=300, max_delay=3600, max_lifetime=86400),
        null_maillog(),
        "mx.test",
        clock=clock,
        recent=intake.recent,
        **kw,
    )
    intake.on_commit(runner.wake)
    return runner, capture


async def submit(
    intake: Intake,
    rcpts: list[str],
    sender: str = "alice@local.test",
    params: RcptParams | None = None,
    mail: MailParams | None = None,
) -> str:
    return await intake.submit(
        sender,
        [NewRecipient(r, params or RcptParams()) for r in rcpts],
        b"Subject: t\r\n\r\nbody\r\n",
        params=mail,
    )


async def test_temp_failures_retry_then_deliver(env) -> None:  # type: ignore[no-untyped-def]
    clock, store, intake, _ = env
    remote = Scripted({"bob@remote.test": [TempFail(BUSY), TempFail(BUSY), Delivered(OK)]})
    runner, capture = make_runner(env, remote)
    qid = await submit(intake, ["bob@remote.test"])
    assert await runner.run_once() == 1
    info = await store.get_message(qid)
    assert info is not None and info.records[0].state is DeliveryState.DEFERRED
    assert info.records[0].last_reply == BUSY
    assert 240 <= info.records[0].next_try - clock.now() <= 300  # first retry ~5 min, jittered
    assert await runner.run_once() == 0  # not due yet
    clock.advance(300)
    assert await runner.run_once() == 1
    clock.advance(600)
    assert await runner.run_once() == 1
    assert await store.get_message(qid) is None  # complete → removed
    assert capture.delivered == []  # no bounce
    assert len(remote.calls) == 3


async def test_deferred_messages_leave_the_recent_cache(env) -> None:  # type: ignore[no-untyped-def]
    """Memory bounded by the active set: a deferred message's body is not kept in
    memory until its retry (before, every deferred message stayed cached, up to the
    cache's 32 MiB: a backlog accepted through the server grew the process by that)."""
    _, store, intake, _ = env
    count = 50
    remote = Scripted({f"u{i}@remote.test": [TempFail(BUSY)] for i in range(count)})
    runner, _ = make_runner(env, remote)
    for i in range(count):
        await submit(intake, [f"u{i}@remote.test"])
    assert len(intake.recent) == count  # committed, not yet attempted: the active set
    assert await runner.run_once() == count
    assert len(intake.recent) == 0
    assert len(await store.list_messages(state=DeliveryState.DEFERRED)) == count


async def test_permanent_failure_bounces_to_sender(env) -> None:  # type: ignore[no-untyped-def]
    _, store, intake, _ = env
    remote = Scripted({"bob@remote.test": [PermFail(GONE, "mx.remote.test[192.0.2.1]:25")]})
    runner, capture = make_runner(env, remote)
    qid = await submit(intake, ["bob@remote.test"])
    await runner.run_once()
    await runner.run_once()  # delivers the bounce locally
    assert await store.get_message(qid) is None
    ((rcpt, dsn),) = capture.delivered
    assert rcpt == "alice@local.test"
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn
    assert b"Final-Recipient: rfc822; bob@remote.test" in dsn
    assert b"Action: failed" in dsn and b"Status: 5.1.1" in dsn
    assert b"Remote-MTA: dns; mx.remote.test[192.0.2.1]:25" in dsn
    assert b"Subject: t" in dsn  # the original is returned


async def test_no_bounce_for_null_sender_or_notify_never(env) -> None:  # type: ignore[no-untyped-def]
    _, store, intake, _ = env
    remote = Scripted({"bob@remote.test": [PermFail(GONE), PermFail(GONE)]})
    runner, capture = make_runner(env, remote)
    await submit(intake, ["bob@remote.test"], sender="")
    await submit(intake, ["bob@remote.test"], params=RcptParams(notify=frozenset({"NEVER"})))
    await runner.run_once()
    await runner.run_once()
    assert capture.delivered == []
    assert await store.list_messages() == []


async def test_expiry_turns_temporary_into_bounce(env) -> None:  # type: ignore[no-untyped-def]
    clock, store, intake, _ = env
    remote = Scripted({"bob@remote.test": [TempFail(BUSY)] * 100})
    runner, capture = make_runner(env, remote)
    qid = await submit(intake, ["bob@remote.test"])
    while await store.get_message(qid) is not None:
        await runner.run_once()
        clock.advance(3600)
    assert clock.now() - 1_800_000_000.0 >= 86400  # lifetime of one day ran out
    await runner.run_once()
    ((_, dsn),) = capture.delivered
    assert b"Action: failed" in dsn and b"Status: 5.3.0" in dsn
    assert b"expired" in dsn


async def test_delay_warning_sent_once(env) -> None:  # type: ignore[no-untyped-def]
    clock, store, intake, _ = env
    remote = Scripted({"bob@remote.test": [TempFail(BUSY)] * 20 + [Delivered(OK)]})
    runner, capture = make_runner(env, remote, delay_warning=4 * 3600)
    qid = await submit(intake, ["bob@remote.test"])
    while await store.get_message(qid) is not None:
        await runner.run_once()
        clock.advance(1800)
    await runner.run_once()
    warnings = [b for _, b in capture.delivered if b"Action: delayed" in b]
    assert len(warnings) == 1
    assert b"Subject: Delayed Mail (still being retried)" in warnings[0]


async def test_success_notice_when_asked(env) -> None:  # type: ignore[no-untyped-def]
    _, _, intake, _ = env
    runner, capture = make_runner(env, Scripted({}))
    await submit(
        intake,
        ["alice@local.test"],
        sender="carol@local.test",
        params=RcptParams(notify=frozenset({"SUCCESS"})),
    )
    await runner.run_once()
    await runner.run_once()
    notices = [b for r, b in capture.delivered if r == "carol@local.test"]
    assert len(notices) == 1 and b"Action: delivered" in notices[0]


async def test_transport_exception_is_temporary(env) -> None:  # type: ignore[no-untyped-def]
    _, store, intake, _ = env

    class Broken:
        async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
            raise RuntimeError("bug")

    runner, _ = make_runner(env, Broken())  # type: ignore[arg-type]
    qid = await submit(intake, ["bob@remote.test"])
    await runner.run_once()
    info = await store.get_message(qid)
    assert info is not None and info.records[0].state is DeliveryState.DEFERRED
    assert info.records[0].last_reply is not None and info.records[0].last_reply.code == 451


async def test_outcome_recorded_once_the_store_is_back(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A shared queue's database restarting: recording the outcome fails twice,
    # the runner retries instead of leaving the delivery to run again later.
    _, store, intake, _ = env
    remote = Scripted({"bob@remote.test": [Delivered(OK)]})
    runner, _ = make_runner(env, remote)
    qid = await submit(intake, ["bob@remote.test"])
    real = store.record_outcomes
    failures = [StoreError("database connection lost"), StoreError("still down")]

    async def flaky(updates):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop(0)
        return await real(updates)

    monkeypatch.setattr(store, "record_outcomes", flaky)
    assert await runner.run_once() == 1
    assert failures == []
    assert await store.get_message(qid) is None  # delivered and recorded
    assert len(remote.calls) == 1


async def test_failed_recipient_stays_queued_while_its_bounce_cannot_be(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The store refuses the bounce (disk full, database down): the failed
    # recipient must not be recorded as failed, or the notice is lost for good.
    clock, store, intake, _ = env
    remote = Scripted({"bob@remote.test": [PermFail(GONE), PermFail(GONE)]})
    runner, capture = make_runner(env, remote)
    qid = await submit(intake, ["bob@remote.test"])
    # The notice streams into an intake transaction: refuse its commit.
    real_commit = store.commit
    refusals = [StoreError("disk full")]

    async def refusing(*args, **kwargs):  # type: ignore[no-untyped-def]
        if refusals:
            raise refusals.pop(0)
        return await real_commit(*args, **kwargs)

    monkeypatch.setattr(store, "commit", refusing)
    assert await runner.run_once() == 1
    info = await store.get_message(qid)
    assert info is not None and info.records[0].state is DeliveryState.DEFERRED
    assert info.records[0].attempts == 0  # not counted: it is the bounce that waits
    assert capture.delivered == []
    clock.advance(60)
    assert await runner.run_once() == 1  # the same failure, and now the bounce is queued
    await runner.run_once()
    assert await store.get_message(qid) is None
    ((rcpt, dsn),) = capture.delivered
    assert rcpt == "alice@local.test" and b"Final-Recipient: rfc822; bob@remote.test" in dsn


async def test_beat_takes_over_the_leases_of_a_silent_runner(env) -> None:  # type: ignore[no-untyped-def]
    clock, store, intake, _ = env
    remote = Scripted({"bob@remote.test": [Delivered(OK)]})
    runner, _ = make_runner(env, remote, lease_seconds=600, node_timeout=30)
    qid = await submit(intake, ["bob@remote.test"])
    await store.heartbeat("other-node:1", clock.now())
    assert len(await store.claim_due(clock.now(), 10, 600, "other-node:1")) == 1
    assert await runner.beat() == 0  # the other runner beat just now
    assert await runner.run_once() == 0  # its lease holds
    clock.advance(31)  # ... then it fell silent, its lease still has 9 minutes
    assert await runner.beat() == 1
    assert await runner.run_once() == 1
    assert await store.get_message(qid) is None


class Parallel:
    """A transport that delivers everything, counting calls and the most at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.running = 0
        self.most = 0

    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        self.calls.append(tuple(r.recipient for r in job.records))
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.01)
        finally:
            self.running -= 1
        return [Delivered(OK, "parallel") for _ in job.records]


async def test_a_wide_message_is_one_delivery_per_domain_all_at_once(env) -> None:  # type: ignore[no-untyped-def]
    """1,000 recipients in 50 domains, given in RCPT order that mixes the domains: one
    transport call per domain (intake stores each domain's recipients together; the
    runner counts deliveries, not recipients, against ``concurrency``), delivered in
    parallel, not one call per recipient one after another."""
    _, store, intake, _ = env
    remote = Parallel()
    runner, _ = make_runner(env, remote, concurrency=50)  # type: ignore[arg-type]
    rcpts = [f"r{i}@d{i % 50}.remote.test" for i in range(1000)]
    qid = await submit(intake, rcpts)
    runner.start()
    try:
        for _ in range(3000):  # up to 30 s on a loaded machine; done in well under 1
            if await store.get_message(qid) is None:
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.stop()
    assert await store.get_message(qid) is None  # all delivered
    assert sorted(r for call in remote.calls for r in call) == sorted(rcpts)
    # A domain may be split across claims: a claim takes as many *records* as there are
    # free delivery slots, so how many calls depends on when slots free up (50-110 seen;
    # claiming a message's records together is the open fix, bench/README.md). The
    # regression this guards, one call per recipient, would be 1,000.
    assert len(remote.calls) < len(rcpts) // 4
    assert remote.most > 1
