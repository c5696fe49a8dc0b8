"""Replay a saved message through a pipeline without queueing it (``explain --simulate``).

The phases run as a session would run them (connect, HELO, MAIL, each RCPT, DATA,
end of data), each decision is recorded, and the first refusal ends the replay as
it would end the session. Nothing is written: there is no intake transaction, and
checks built with ``PipelineParts.dry_run`` leave shared state alone.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

from postillon.checks.context import ClientFacts, RecipientFacts, SessionContext, TransactionContext
from postillon.checks.pipeline import Pipeline
from postillon.core.clock import Clock
from postillon.core.trace import TraceStep


class ListSink:
    def __init__(self) -> None:
        self.steps: list[TraceStep] = []

    def record(self, step: TraceStep) -> None:
        self.steps.append(step)


class SavedMessage:
    """A ``MessageView`` over a message file (LF line ends made CRLF)."""

    def __init__(self, data: bytes) -> None:
        if b"\r\n" not in data:
            data = data.replace(b"\n", b"\r\n")
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self._header, self._body = data, b""
        else:
            self._header, self._body = data[: end + 2], data[end + 4 :]

    @property
    def header(self) -> bytes:
        return self._header

    @property
    def prepend(self) -> bytes:
        return b""

    @property
    def size(self) -> int:
        return len(self._header) + 2 + len(self._body)

    def message_bytes(self) -> bytes:
        return self._header + b"\r\n" + self._body

    def body_chunks(self, size: int = 65536) -> Iterator[bytes]:
        for i in range(0, len(self._body), size):
            yield self._body[i : i + size]


@dataclass
class Simulation:
    client: ClientFacts
    sender: str
    recipients: list[str]
    message: bytes
    steps: list[TraceStep] = field(default_factory=list)
    outcome: str = ""


async def simulate(pipeline: Pipeline, clock: Clock, sink: ListSink, run: Simulation) -> Simulation:
    """Run ``run`` through ``pipeline`` (whose trace sink is ``sink``)."""
    s = SessionContext("SIM" + secrets.token_hex(5).upper(), run.client)
    queue_id = "SIMULATED"

    def note(phase: str, action: str, saw: str = "") -> None:
        sink.record(
            TraceStep(
                s.session_id,
                clock.now(),
                phase,
                "session",
                action,
                saw,
                "",
                queue_id if phase not in ("connect", "helo") else "",
                run.client.ip,
            )
        )

    def done(outcome: str) -> Simulation:
        run.steps = list(sink.steps)
        run.outcome = outcome
        return run

    note("connect", "connect", f"{run.client.ip} (simulated)")
    verdict = await pipeline.connect(s)
    if verdict.reply is not None:
        return done(f"refused at connect: {verdict.reply}")
    note("helo", "command", f"EHLO {run.client.helo}")
    verdict = await pipeline.helo(s)
    if verdict.reply is not None:
        return done(f"HELO refused: {verdict.reply}")
    tx = TransactionContext(run.sender, None, queue_id)
    note("mail", "command", f"MAIL FROM:<{run.sender}>")
    verdict = await pipeline.mail(s, tx)
    if verdict.reply is not None:
        await pipeline.reset(s, tx)
        return done(f"MAIL refused: {verdict.reply}")
    for address in run.recipients:
        note("rcpt", "command", f"RCPT TO:<{address}>")
        verdict = await pipeline.rcpt(s, tx, RecipientFacts(address))
        if verdict.reply is None:
            tx.recipients.append(RecipientFacts(address, targets=verdict.targets))
    if not tx.recipients:
        await pipeline.reset(s, tx)
        return done("no recipient accepted")
    verdict = await pipeline.data(s, tx)
    if verdict.reply is not None:
        await pipeline.reset(s, tx)
        return done(f"DATA refused: {verdict.reply}")
    result = await pipeline.end_of_data(s, tx, SavedMessage(run.message))
    await pipeline.close(s)
    if result.reply is not None:
        return done(f"message refused: {result.reply}")
    if result.discard:
        return done(f"accepted and discarded ({result.discard})")
    if result.quarantine:
        return done(f"accepted and quarantined ({result.quarantine})")
    targets = sorted({t for r in tx.recipients for t in r.targets} | set(result.added))
    return done(f"accepted for {', '.join(targets)} (not queued: a simulation)")
