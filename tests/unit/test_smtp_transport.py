"""SmtpTransport's decisions with scripted sessions (no sockets): which host
is tried next, what a broken transaction settles, when a destination is busy."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from postillon.core.envelope import MailParams, RcptParams
from postillon.core.outcome import Delivered, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.delivery.transport import DeliveryJob
from postillon.outbound import smtp_transport
from postillon.outbound.client_session import SessionError, TransactionResult
from postillon.outbound.smtp_transport import OutboundSettings, SmtpTransport
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo
from postillon.routing.router import NextHop, Route

OK = Reply.of(250, "2.0.0", "Ok")
UNKNOWN = Reply.of(550, "5.1.1", "unknown user")
LOST = Reply.of(451, "4.4.2", "connection lost")


def record(i: int, rcpt: str) -> DeliveryRecord:
    return DeliveryRecord(
        i, "Q1", rcpt, None, RcptParams(), DeliveryState.LEASED, 0, 0.0, None, "tok", "me", 0.0, 0.0
    )


def job(rcpts: Sequence[str], hosts: Sequence[str] = ("192.0.2.1",)) -> DeliveryJob:
    info = MessageInfo("Q1", "a@s.test", MailParams(), 10, 0.0, "", "", ())
    route = Route("smtp", "smtp:d.test", "d.test", hop=NextHop(hosts[0], 25))
    return DeliveryJob(
        info,
        tuple(record(i, r) for i, r in enumerate(rcpts)),
        route,
        store=None,
        cached_body=b"x\r\n",
    )  # type: ignore[arg-type]


class FakeSession:
    def __init__(self, script: Any) -> None:
        self.script = script
        self.usable = True
        self.messages_sent = 0
        self.tls = ""
        self.tls_verified = False
        self.extensions = {"DSN": ""}

    async def send(self, *args: Any, **kw: Any) -> TransactionResult:
        async for _ in args[3]:
            pass
        if isinstance(self.script, Exception):
            raise self.script
        self.messages_sent += 1
        return TransactionResult(per_recipient=tuple(self.script), mail_reply=OK)

    async def quit(self) -> None:
        self.usable = False

    def close(self) -> None:
        self.usable = False


def transport(
    monkeypatch: pytest.MonkeyPatch, scripts: dict[str, Any]
) -> tuple[SmtpTransport, list[str]]:
    connects: list[str] = []

    async def connect(host: str, port: int, **kw: Any) -> FakeSession:
        connects.append(host)
        script = scripts[host]
        if (
            isinstance(script, SessionError)
            and script.partial is None
            and "connect" in script.detail
        ):
            raise script
        return FakeSession(script)

    monkeypatch.setattr(smtp_transport.SmtpClientSession, "connect", staticmethod(connect))
    return SmtpTransport(resolver=None, settings=OutboundSettings("me.test")), connects  # type: ignore[arg-type]


async def test_broken_transaction_keeps_settled_recipients(monkeypatch: pytest.MonkeyPatch) -> None:
    partial = TransactionResult(per_recipient=(UNKNOWN, LOST), mail_reply=OK)
    t, _ = transport(monkeypatch, {"192.0.2.1": SessionError("dropped", partial=partial)})
    outcomes = await t.deliver(job(["gone@d.test", "ok@d.test"]))
    assert isinstance(outcomes[0], PermFail) and outcomes[0].reply == UNKNOWN
    assert isinstance(outcomes[1], TempFail)


async def test_unsettled_failure_moves_to_the_next_host(monkeypatch: pytest.MonkeyPatch) -> None:
    t, connects = transport(
        monkeypatch,
        {
            "192.0.2.1": SessionError("connect refused"),
            "192.0.2.2": [OK],
        },
    )

    async def targets(route: Route) -> list[smtp_transport._Target]:
        return [
            smtp_transport._Target("mx1", "192.0.2.1", 25, None),
            smtp_transport._Target("mx2", "192.0.2.2", 25, None),
        ]

    monkeypatch.setattr(t, "_targets", targets)
    outcomes = await t.deliver(job(["ok@d.test"]))
    assert isinstance(outcomes[0], Delivered)
    assert connects == ["192.0.2.1", "192.0.2.2"]


async def test_reused_connection_closed_by_peer_is_retried_fresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, connects = transport(monkeypatch, {"192.0.2.1": [OK]})
    stale = FakeSession(SessionError("closed while idle"))
    await t.pool.put(("192.0.2.1", 25, False, None), stale)  # type: ignore[arg-type]
    outcomes = await t.deliver(job(["ok@d.test"]))
    assert isinstance(outcomes[0], Delivered)
    assert connects == ["192.0.2.1"]  # one fresh connection after the stale one failed
    await t.close()


async def test_busy_destination_is_not_an_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]})
    monkeypatch.setattr(smtp_transport, "DESTINATION_WAIT", 0.05)
    slot = t.limits.destination("smtp:d.test")
    for _ in range(t.settings.per_destination):
        await slot.acquire()
    (outcome,) = await t.deliver(job(["ok@d.test"]))
    assert isinstance(outcome, TempFail) and not outcome.attempted
    slot.release()
    (outcome,) = await t.deliver(job(["ok@d.test"]))
    assert isinstance(outcome, Delivered)
    await asyncio.sleep(0)
