"""What the session does with the pipeline's answers, over a real socket with smtplib.

    smtplib ──SMTP──▶ Session (real listener socket) ──▶ Pipeline [relay, Scripted]
                                │
                                └──▶ Intake ──▶ MemoryStore

A scripted check stands in for a milter: header and body changes, a new sender,
recipients added and removed, quarantine (the message is committed *held*), discard
(250, nothing queued) and a refusal at each phase; every decision is a trace step.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from postillon.checks.base import BaseCheck
from postillon.checks.context import MessageView, SessionContext, TransactionContext
from postillon.checks.decision import (
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Decision,
    DeleteRecipient,
    Phase,
    ReplaceBody,
    proceed,
    reject,
)
from postillon.checks.pipeline import Pipeline
from postillon.checks.relay import RelayPolicy
from postillon.checks.relay_check import RelayCheck
from postillon.checks.simulate import ListSink
from postillon.config.model import DomainConfig, LimitsConfig
from postillon.core.clock import SystemClock
from postillon.core.reply import Reply
from postillon.inbound.session import Session, SessionDeps
from postillon.intake.intake import Intake
from postillon.observability.maillog import null_maillog
from postillon.protocol.server import ServerSettings
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import DeliveryState
from postillon.routing.local import LocalRecipients

MESSAGE = b"Subject: hello\r\nX-Spam: maybe\r\nFrom: a@remote.test\r\n\r\noriginal body\r\n"
EndOfData = Callable[[TransactionContext, MessageView], Decision]
Served = tuple[int, MemoryStore, "Scripted", ListSink]


class Scripted(BaseCheck):
    name = "milterish"
    phases: frozenset[Phase] = frozenset({"helo", "end_of_data"})

    def __init__(self) -> None:
        self.at_end: EndOfData = lambda tx, m: proceed()
        self.seen_body = b""

    async def helo(self, s: SessionContext) -> Decision:
        if s.client.helo == "refused.test":
            return reject(Reply.of(550, "5.7.1", "Not you"), "a HELO we refuse")
        return proceed()

    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: MessageView
    ) -> Decision:
        self.seen_body = b"".join(message.body_chunks())
        return self.at_end(tx, message)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Served]:
    local = LocalRecipients(
        [DomainConfig(name="example.org", mailboxes=("alice", "bob", "carol"))], {}, hostname="mx"
    )
    store = MemoryStore()
    scripted = Scripted()
    sink = ListSink()
    deps = SessionDeps(
        settings=ServerSettings("mx.test"),
        intake=Intake(store, "mx.test", tmp_path / "spool"),
        pipeline=Pipeline([RelayCheck(RelayPolicy(local, [])), scripted], SystemClock(), sink),
        maillog=null_maillog(),
        limits=LimitsConfig(),
        listener="smtp",
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Session(deps, reader, writer).run()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1], store, scripted, sink
    finally:
        srv.close()
        await srv.wait_closed()


def send(port: int, helo: str = "client.test") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        code, text = client.ehlo(helo)
        if code != 250:
            return code, text.decode()
        client.mail("sender@remote.test")
        client.rcpt("alice@example.org")
        client.rcpt("bob@example.org")
        code, text = client.data(MESSAGE)
    return code, text.decode()


async def stored(store: MemoryStore) -> tuple[str, bytes, list[tuple[str, DeliveryState]]]:
    [info] = await store.list_messages()
    body = b"".join([c async for c in store.read_body(info.queue_id)])
    return info.sender, body, sorted((r.recipient, r.state) for r in info.records)


async def test_changes_are_applied_before_the_commit(server: Served) -> None:
    port, store, scripted, sink = server
    scripted.at_end = lambda tx, m: proceed(
        "scanned",
        AddHeader("X-Scanned", "yes", None),
        ChangeHeader("X-Spam", 1, None),
        ReplaceBody(b"new body\r\n"),
        ChangeSender("bounces@example.org"),
        AddRecipient("carol@example.org"),
        DeleteRecipient("bob@example.org"),
    )
    code, _ = await asyncio.to_thread(send, port)
    assert code == 250
    assert scripted.seen_body == b"original body\r\n"
    sender, body, records = await stored(store)
    assert sender == "bounces@example.org"
    header, _, rest = body.partition(b"\r\n\r\n")
    assert b"X-Spam" not in header and header.endswith(b"From: a@remote.test\r\nX-Scanned: yes")
    assert header.startswith(b"Received: from client.test")
    assert rest == b"new body\r\n"
    assert records == [
        ("alice@example.org", DeliveryState.PENDING),
        ("carol@example.org", DeliveryState.PENDING),
    ]
    assert ("end_of_data", "milterish", "continue", "scanned") in [
        (s.phase, s.check, s.action, s.saw) for s in sink.steps
    ]


async def test_quarantine_commits_the_message_held(server: Served) -> None:
    port, store, scripted, sink = server
    scripted.at_end = lambda tx, m: Decision("quarantine", reason="virus suspected")
    code, text = await asyncio.to_thread(send, port)
    assert code == 250 and "queued as" in text
    _, _, records = await stored(store)
    assert {state for _, state in records} == {DeliveryState.HELD}
    assert sink.steps[-1].action == "quarantine" and sink.steps[-1].saw == "virus suspected"


async def test_discard_answers_250_and_queues_nothing(server: Served) -> None:
    port, store, scripted, sink = server
    scripted.at_end = lambda tx, m: Decision("discard", reason="spam")
    code, _ = await asyncio.to_thread(send, port)
    assert code == 250
    assert await store.list_messages() == []
    assert sink.steps[-1].action == "discard"


async def test_a_refusal_at_end_of_data_queues_nothing(server: Served) -> None:
    port, store, scripted, _sink = server
    scripted.at_end = lambda tx, m: reject(Reply.of(554, "5.7.1", "Spam"), "GTUBE")
    code, text = await asyncio.to_thread(send, port)
    assert code == 554 and "5.7.1 Spam" in text
    assert await store.list_messages() == []


async def test_a_refused_helo_keeps_the_session_open(server: Served) -> None:
    port, _, _, _ = server
    code, text = await asyncio.to_thread(send, port, "refused.test")
    assert code == 550 and "Not you" in text
