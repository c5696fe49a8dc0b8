"""Drive the milter check through the real policy pipeline, as the session does, without
an SMTP server: connect, HELO, MAIL, RCPT..., DATA, end of data, close. For tests of
``checks/milter_check.py`` against real milters (the end-to-end tests go through
``postillon serve`` instead)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from postillon.checks.context import (
    ClientFacts,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import TraceStep
from postillon.checks.milter_check import MilterCheck
from postillon.checks.pipeline import MessageVerdict, Pipeline, Verdict
from postillon.config.milter import MilterConfig
from postillon.core.clock import SystemClock


class Message:
    """A ``MessageView`` over bytes in memory."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        self.header = head + b"\r\n"
        self.prepend = b""

    @property
    def size(self) -> int:
        return len(self.header) + 2 + len(self.body)

    def message_bytes(self) -> bytes:
        return self.header + b"\r\n" + self.body

    def body_chunks(self, size: int = 65536) -> Iterator[bytes]:
        for i in range(0, len(self.body), size):
            yield self.body[i : i + size]


class Steps:
    def __init__(self) -> None:
        self.steps: list[TraceStep] = []

    def record(self, step: TraceStep) -> None:
        self.steps.append(step)


@dataclass
class Run:
    """What the pipeline answered at each phase of one session."""

    connect: Verdict | None = None
    helo: Verdict | None = None
    mail: Verdict | None = None
    rcpts: list[Verdict] = field(default_factory=list)
    data: Verdict | None = None
    message: MessageVerdict | None = None
    tx: TransactionContext | None = None
    trace: list[TraceStep] = field(default_factory=list)

    @property
    def refused(self) -> str:
        """The first refusal as text ("" when none)."""
        for v in (self.connect, self.helo, self.mail, *self.rcpts, self.data):
            if v is not None and v.reply is not None:
                return str(v.reply)
        if self.message is not None and self.message.reply is not None:
            return str(self.message.reply)
        return ""


def milter_pipeline(
    *milters: MilterConfig, hostname: str = "mx.example.org", message_size: int = 0
) -> Pipeline:
    check = MilterCheck(tuple(milters), hostname, message_size)
    return Pipeline([check], SystemClock(), Steps())


async def run_session(
    pipeline: Pipeline,
    raw: bytes,
    *,
    sender: str = "sender@example.net",
    recipients: tuple[str, ...] = ("alice@example.org",),
    client: ClientFacts | None = None,
    queue_id: str = "QTEST0001",
    messages: int = 1,
) -> Run:
    """One session of ``messages`` transactions, stopping where the pipeline refuses."""
    client = client or ClientFacts(
        ip="127.0.0.1", port=40000, listener="smtp:127.0.0.1:25", helo="client.example.net"
    )
    s = SessionContext("S1", client)
    run = Run()
    try:
        run.connect = await pipeline.connect(s)
        if run.connect.reply is not None:
            return run
        run.helo = await pipeline.helo(s)
        if run.helo.reply is not None:
            return run
        for n in range(messages):
            tx = TransactionContext(sender=sender, queue_id=f"{queue_id}{n}" if n else queue_id)
            run.tx = tx
            run.mail = await pipeline.mail(s, tx)
            if run.mail.reply is not None:
                await pipeline.reset(s, tx)
                continue
            run.rcpts = []
            for address in recipients:
                rcpt = RecipientFacts(address)
                verdict = await pipeline.rcpt(s, tx, rcpt)
                run.rcpts.append(verdict)
                if verdict.reply is None:
                    tx.recipients.append(rcpt)
            if not tx.recipients:
                await pipeline.reset(s, tx)
                continue
            run.data = await pipeline.data(s, tx)
            if run.data.reply is not None:
                await pipeline.reset(s, tx)
                continue
            run.message = await pipeline.end_of_data(s, tx, Message(raw))
    finally:
        await pipeline.close(s)
        assert isinstance(pipeline.trace, Steps)
        run.trace = list(pipeline.trace.steps)
    return run
