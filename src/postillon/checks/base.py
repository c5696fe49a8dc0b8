"""The ``Check`` protocol every check implements, and ``BaseCheck`` (its defaults).

Apart from ``pipeline.py`` so a check module imports only this (the pipeline
imports every check module to compose them). The contract is in ``pipeline.py``.
"""

from __future__ import annotations

from typing import Protocol

from postillon.checks.context import (
    MessageView,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import CONTINUE, Decision, Phase, TraceStep


class Check(Protocol):
    """One policy check (one file in ``checks/``). ``name`` is unique in a pipeline
    (it keys ``SessionContext.state`` and names the check in traces); ``phases`` are
    the phases it implements: only those methods are called."""

    name: str
    phases: frozenset[Phase]

    async def connect(self, s: SessionContext) -> Decision: ...
    async def helo(self, s: SessionContext) -> Decision: ...
    async def mail(self, s: SessionContext, tx: TransactionContext) -> Decision: ...
    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision: ...
    async def data(self, s: SessionContext, tx: TransactionContext) -> Decision: ...
    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: MessageView
    ) -> Decision: ...
    async def reset(self, s: SessionContext, tx: TransactionContext) -> None: ...
    async def close(self, s: SessionContext) -> None: ...


class BaseCheck:
    """Defaults for every phase (no objection), so a check writes only its own."""

    name = "check"
    phases: frozenset[Phase] = frozenset()

    async def connect(self, s: SessionContext) -> Decision:
        return CONTINUE

    async def helo(self, s: SessionContext) -> Decision:
        return CONTINUE

    async def mail(self, s: SessionContext, tx: TransactionContext) -> Decision:
        return CONTINUE

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision:
        return CONTINUE

    async def data(self, s: SessionContext, tx: TransactionContext) -> Decision:
        return CONTINUE

    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: MessageView
    ) -> Decision:
        return CONTINUE

    async def reset(self, s: SessionContext, tx: TransactionContext) -> None:
        return None

    async def close(self, s: SessionContext) -> None:
        return None


class TraceSink(Protocol):
    """Where trace steps go (``checks/trace.py`` buffers them into the store). Must
    not block: called on the event loop for every decision."""

    def record(self, step: TraceStep) -> None: ...
