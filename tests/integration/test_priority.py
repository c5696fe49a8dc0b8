"""Delivery priorities (core/priority.py) against a real SQLite queue with a bulk
backlog of 50,000 messages: a message a person just submitted, a bounce, and a
retry are claimed ahead of the backlog, so they wait for a handful of deliveries,
not for 50,000.

The runner, intake and store are the real ones; only the transport is a recorder
(a 1 ms "delivery"), so the test measures claim order, not network speed. The bound
asserted is in deliveries (how many went out between the commit and the urgent
message's delivery); the delay in seconds is printed for the closing note.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from postillon.config.model import DomainConfig
from postillon.core.envelope import MailParams
from postillon.core.outcome import Delivered, Outcome
from postillon.core.reply import Reply
from postillon.delivery.retry import RetryPolicy
from postillon.delivery.runner import Runner
from postillon.delivery.transport import DeliveryJob
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import Intake
from postillon.observability.maillog import null_maillog
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import NewMessage, NewRecipient
from postillon.routing.local import LocalRecipients
from postillon.routing.router import Router

pytestmark = pytest.mark.integration

BACKLOG = 50_000
CONCURRENCY = 50
OK = Reply.of(250, "2.0.0", "Ok")


class Recorder:
    """A transport that takes 1 ms per message and remembers the order."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.at: dict[str, float] = {}

    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        await asyncio.sleep(0.001)
        for record in job.records:
            self.order.append(record.recipient)
            self.at[record.recipient] = time.monotonic()
        return [Delivered(OK) for _ in job.records]


async def fill(store: SqliteStore, count: int) -> None:
    body = b"Subject: newsletter\r\n\r\nbulk\r\n"
    now = time.time()

    def bulk(i: int) -> NewMessage:
        return NewMessage(
            queue_id=f"BULK{i:07d}",
            sender="news@bulk.example",
            mail_params=MailParams(mt_priority=-5),  # untrusted: not honoured, so 0
            recipients=[NewRecipient(f"reader{i}@remote.example")],
            body=io.BytesIO(body),
            size=len(body),
            received_at=now - 60 + i / count,  # all due, oldest first
            source="smtp",
        )

    for start in range(0, count, 1000):
        await asyncio.gather(*(store.commit(bulk(i)) for i in range(start, start + 1000)))


async def test_a_new_submission_is_not_stuck_behind_a_bulk_backlog(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "queue.db")
    intake = Intake(store, "mx.test", tmp_path / "spool")
    local = LocalRecipients(
        [DomainConfig(name="local.test", mailboxes=("alice",))], {}, hostname="mx.test"
    )
    recorder = Recorder()
    runner = Runner(
        store,
        Router(local),
        {"smtp": recorder},
        intake,
        RetryPolicy(first_delay=300, max_delay=3600, max_lifetime=86400),
        null_maillog(),
        "mx.test",
        concurrency=CONCURRENCY,
        recent=intake.recent,
    )
    intake.on_commit(runner.wake)
    try:
        await fill(store, BACKLOG)
        runner.start()
        while len(recorder.order) < 2000:  # the backlog is flowing
            await asyncio.sleep(0.01)
        body = b"Subject: password reset\r\n\r\nurgent\r\n"
        submitted = time.monotonic()
        before = len(recorder.order)
        await intake.submit(
            "alice@local.test",
            [NewRecipient("boss@remote.example")],
            body,
            client=ClientInfo(ip="192.0.2.7", authenticated=True),
            source="submission",
        )
        await intake.submit(  # a bounce: the null sender, source "bounce"
            "", [NewRecipient("sender@remote.example")], body, source="bounce"
        )
        while (
            "boss@remote.example" not in recorder.at or "sender@remote.example" not in recorder.at
        ):
            await asyncio.sleep(0.01)
        waited = recorder.order.index("boss@remote.example") - before
        notice_waited = recorder.order.index("sender@remote.example") - before
        delay = recorder.at["boss@remote.example"] - submitted
        remaining = BACKLOG - len([r for r in recorder.order if r.startswith("reader")])
        print(
            f"submission delivered after {waited} other deliveries and {delay:.3f} s, "
            f"the bounce after {notice_waited}, with {remaining} bulk messages still queued"
        )
        # At most the deliveries already in flight or claimed in the same batch
        # (two active sets); without priorities it would wait for ~48,000.
        assert waited <= 2 * CONCURRENCY
        assert notice_waited <= 2 * CONCURRENCY
        assert remaining > BACKLOG // 2  # the backlog was really there
    finally:
        await runner.stop(grace=1)
        await store.close()
