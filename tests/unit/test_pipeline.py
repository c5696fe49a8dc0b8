"""The policy pipeline's contract (checks/pipeline.py): order, first reject wins,
accept retires a check for the transaction, changes are applied in order, a check
that raises is a 451, every decision is a trace step."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from postillon.checks.base import BaseCheck
from postillon.checks.context import (
    ClientFacts,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import (
    AddHeader,
    AddRawFields,
    ChangeHeader,
    Decision,
    Phase,
    ReplaceBody,
    RouteRecipient,
    TraceStep,
    proceed,
    reject,
)
from postillon.checks.pipeline import Pipeline
from postillon.core.clock import FakeClock
from postillon.core.reply import Reply

REFUSED = Reply.of(550, "5.7.1", "No")


class Message:
    def __init__(self, header: bytes, body: bytes) -> None:
        self.header = header
        self.prepend = b""
        self.body = body

    @property
    def size(self) -> int:
        return len(self.header) + 2 + len(self.body)

    def message_bytes(self) -> bytes:
        return self.header + b"\r\n" + self.body

    def body_chunks(self, size: int = 65536) -> Iterator[bytes]:
        yield self.body


class Sink:
    def __init__(self) -> None:
        self.steps: list[TraceStep] = []

    def record(self, step: TraceStep) -> None:
        self.steps.append(step)


class Scripted(BaseCheck):
    """Answers from a script: phase -> decisions in order."""

    def __init__(self, name: str, **answers: list[Decision]) -> None:
        self.name = name
        self.answers = answers
        self.phases: frozenset[Phase] = frozenset(answers)  # type: ignore[arg-type]
        self.seen: list[str] = []

    def _next(self, phase: str) -> Decision:
        self.seen.append(phase)
        answer = self.answers[phase].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def connect(self, s: SessionContext) -> Decision:
        return self._next("connect")

    async def mail(self, s: SessionContext, tx: TransactionContext) -> Decision:
        return self._next("mail")

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision:
        return self._next("rcpt")

    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: object
    ) -> Decision:
        self.last_header = getattr(message, "header", b"")
        return self._next("end_of_data")


def session() -> SessionContext:
    return SessionContext("s1", ClientFacts(ip="192.0.2.1"))


async def test_first_reject_wins_and_later_checks_are_not_asked() -> None:
    first = Scripted("first", rcpt=[reject(REFUSED, "listed")])
    second = Scripted("second", rcpt=[proceed()])
    sink = Sink()
    pipeline = Pipeline([first, second], FakeClock(), sink)
    tx = TransactionContext("a@example.org", queue_id="Q1")
    verdict = await pipeline.rcpt(session(), tx, RecipientFacts("b@example.org"))
    assert verdict.reply == REFUSED and verdict.check == "first"
    assert second.seen == []
    assert [(s.check, s.phase, s.action, s.reply, s.queue_id) for s in sink.steps] == [
        ("first", "rcpt", "reject", str(REFUSED), "Q1")
    ]


async def test_route_recipient_gives_targets_and_default_is_the_address() -> None:
    router = Scripted("relay", rcpt=[proceed("alias", RouteRecipient(("x@l", "y@l"))), proceed()])
    pipeline = Pipeline([router], FakeClock())
    tx = TransactionContext("")
    assert (await pipeline.rcpt(session(), tx, RecipientFacts("a@l"))).targets == ("x@l", "y@l")
    assert (await pipeline.rcpt(session(), tx, RecipientFacts("b@l"))).targets == ("b@l",)


async def test_accept_retires_the_check_for_the_transaction_only() -> None:
    milter = Scripted("milter", mail=[Decision("accept"), proceed()], rcpt=[proceed()])
    pipeline = Pipeline([milter], FakeClock())
    s = session()
    tx = TransactionContext("a@b")
    await pipeline.mail(s, tx)
    await pipeline.rcpt(s, tx, RecipientFacts("c@d"))
    assert milter.seen == ["mail"]
    await pipeline.mail(s, TransactionContext("a@b"))
    assert milter.seen == ["mail", "mail"]


async def test_a_check_that_raises_is_a_451_and_the_error_is_not_echoed() -> None:
    broken = Scripted("broken", connect=[RuntimeError("secret detail")])  # type: ignore[list-item]
    sink = Sink()
    verdict = await Pipeline([broken], FakeClock(), sink).connect(session())
    assert verdict.reply is not None and verdict.reply.code == 451
    assert "secret" not in str(verdict.reply)
    assert sink.steps[0].action == "reject" and "RuntimeError" in sink.steps[0].saw


async def test_end_of_data_changes_apply_in_order_and_later_checks_see_them() -> None:
    header = b"Subject: hi\r\nX-Spam: old\r\nFrom: a@b\r\n"
    first = Scripted(
        "first",
        end_of_data=[
            proceed(
                "",
                AddRawFields(b"Authentication-Results: x; none\r\n"),
                ChangeHeader("X-Spam", 1, None),
                AddHeader("X-Scanned", "yes", None),
            )
        ],
    )
    second = Scripted(
        "second", end_of_data=[proceed("", ReplaceBody(b"new "), ReplaceBody(b"body\r\n"))]
    )
    tx = TransactionContext("a@b")
    out = await Pipeline([first, second], FakeClock()).end_of_data(
        session(), tx, Message(header, b"old body\r\n")
    )
    assert out.reply is None
    assert out.prepend == b"Authentication-Results: x; none\r\n"
    assert out.header == b"Subject: hi\r\nFrom: a@b\r\nX-Scanned: yes\r\n"
    assert second.last_header == out.header
    assert out.body == b"new body\r\n"


async def test_quarantine_and_discard_are_carried_to_the_message_verdict() -> None:
    check = Scripted("milter", rcpt=[Decision("discard", reason="virus")], end_of_data=[proceed()])
    tx = TransactionContext("a@b")
    pipeline = Pipeline([check], FakeClock())
    await pipeline.rcpt(session(), tx, RecipientFacts("c@d"))
    out = await pipeline.end_of_data(session(), tx, Message(b"", b""))
    assert out.discard == "virus"


def test_a_reject_needs_an_error_reply() -> None:
    with pytest.raises(ValueError):
        Decision("reject", Reply.of(250, "2.0.0", "Ok"))
