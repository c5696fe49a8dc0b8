"""The policy pipeline: the checks of one listener kind, asked in order at each phase.

The session (``inbound/session.py``) owns the protocol and the I/O; at each phase it
calls the matching method here and acts on the ``Verdict`` it gets back. The
contract, as a transaction (the package note has the why):

1. ``connect(s)`` once, after the greet pause and before the greeting: a reject
   (554/421) is said instead of the greeting and the connection closes.
2. ``helo(s)`` at each HELO/EHLO (``s.client.helo`` set): a reject refuses the
   command (the session stays open unless ``disconnect``).
3. ``mail(s, tx)`` at MAIL FROM with a fresh ``TransactionContext``: a reject
   refuses MAIL and the transaction is dropped.
4. ``rcpt(s, tx, rcpt)`` per RCPT TO: a reject refuses that recipient; otherwise
   ``verdict.targets`` are its final addresses (alias expansion) and the session adds
   them to ``tx.recipients`` and the intake transaction.
5. ``data(s, tx)`` at DATA/first BDAT: a reject refuses the command.
6. ``end_of_data(s, tx, message)`` once the body is spooled: a reject refuses the
   message (nothing is committed); otherwise ``MessageVerdict`` says what to commit:
   the header fields to put on top, the new header section, a new body, a new
   sender, recipients added/removed, and whether to discard (250, not queued) or
   quarantine (queued and held).
7. ``reset(s, tx)`` when a transaction ends without end of data (RSET, new MAIL,
   an error, the client gone); ``close(s)`` once at the end of the session.

Each check is asked only at the phases it lists in ``Check.phases``; a check that
answered "accept" is not asked again for that transaction (at connect/helo: the
session). A check that raises counts as ``451 4.3.0`` (the error goes to the log,
never to the client), so a broken check cannot lose mail or let it through
unchecked. Every decision is a ``TraceStep`` for ``postillon explain``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from postillon.checks import (
    authentication_check,
    dnsbl,
    greylist,
    helo_check,
    milter_check,
    policy_service,
    pregreet,
    relay_check,
    reverse_dns,
    smtp_rate_limit,
    submission_check,
)
from postillon.checks.base import Check, TraceSink
from postillon.checks.context import (
    ClientFacts,
    ListenerKind,
    MessageView,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import (
    CONTINUE,
    AddHeader,
    AddRawFields,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    Decision,
    DeleteRecipient,
    Phase,
    ReplaceBody,
    RouteRecipient,
    SetHeaderSection,
    TraceStep,
)
from postillon.checks.header_edit import add_header, change_header
from postillon.checks.parts import PipelineParts
from postillon.core.clock import Clock
from postillon.core.reply import TEMP_LOCAL_ERROR, Reply

log = logging.getLogger("postillon.checks")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The pipeline's answer at one phase. ``reply`` None: go on with the session's
    usual positive reply; else say ``reply`` (4xx/5xx) and, with ``disconnect``, close."""

    reply: Reply | None = None
    disconnect: bool = False
    check: str = ""  # the check that rejected
    reason: str = ""  # for the mail log
    metric: str = ""  # the metrics reason of a reject
    targets: tuple[str, ...] = ()  # rcpt: the final addresses


GO_ON = Verdict()


@dataclass(slots=True)
class MessageVerdict:
    """End of data: refuse (``reply``), or commit the message changed as below."""

    reply: Reply | None = None
    check: str = ""
    reason: str = ""
    metric: str = ""
    prepend: bytes = b""  # fields to put on top of the message
    header: bytes = b""  # the client's header section as it should be stored
    header_changed: bool = False
    body: bytes | None = None  # a replacement body, None = unchanged
    sender: str | None = None  # a new envelope sender, None = unchanged
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    discard: str = ""  # non-empty: answer 250 and drop (the reason)
    quarantine: str = ""  # non-empty: commit and hold (the reason)


class _EditedMessage:
    """The message view a check sees: the session's, with the changes so far."""

    def __init__(self, base: MessageView, verdict: MessageVerdict) -> None:
        self._base = base
        self._verdict = verdict

    @property
    def header(self) -> bytes:
        return self._verdict.header

    @property
    def prepend(self) -> bytes:
        return self._verdict.prepend

    @property
    def size(self) -> int:
        return self._base.size

    def message_bytes(self) -> bytes:
        if not self._verdict.header_changed and self._verdict.body is None:
            return self._base.message_bytes()
        return self._verdict.header + b"\r\n" + b"".join(self.body_chunks())

    def body_chunks(self, size: int = 65536) -> Iterator[bytes]:
        if self._verdict.body is not None:
            yield self._verdict.body
        else:
            yield from self._base.body_chunks(size)


class Pipeline:
    """The checks of one listener kind, in order (``build_pipeline``)."""

    def __init__(
        self, checks: Sequence[Check], clock: Clock, trace: TraceSink | None = None
    ) -> None:
        names = [c.name for c in checks]
        if len(set(names)) != len(names):
            raise ValueError(f"check names must be unique: {names}")
        self.checks = tuple(checks)
        self.clock = clock
        self.trace = trace
        self._by_phase: dict[str, tuple[Check, ...]] = {
            phase: tuple(c for c in self.checks if phase in c.phases)
            for phase in ("connect", "helo", "mail", "rcpt", "data", "end_of_data")
        }

    def wants(self, phase: Phase) -> bool:
        """Whether any check listens at ``phase`` (the session may skip the call)."""
        return bool(self._by_phase[phase])

    # -- tracing ---------------------------------------------------------------
    def note(
        self,
        s: SessionContext,
        phase: Phase,
        check: str,
        action: str,
        saw: str = "",
        reply: Reply | None = None,
        queue_id: str = "",
    ) -> None:
        """Record one step (the session's own steps too: the command, the final reply)."""
        if self.trace is None:
            return
        self.trace.record(
            TraceStep(
                s.session_id,
                self.clock.now(),
                phase,
                check,
                action,
                saw,
                str(reply) if reply is not None else "",
                queue_id,
                s.client.ip,
            )
        )

    async def _ask(
        self,
        s: SessionContext,
        phase: Phase,
        check: Check,
        tx: TransactionContext | None,
        rcpt: RecipientFacts | None = None,
        message: MessageView | None = None,
    ) -> Decision:
        try:
            if phase == "connect":
                decision = await check.connect(s)
            elif phase == "helo":
                decision = await check.helo(s)
            elif phase == "mail":
                assert tx is not None
                decision = await check.mail(s, tx)
            elif phase == "rcpt":
                assert tx is not None and rcpt is not None
                decision = await check.rcpt(s, tx, rcpt)
            elif phase == "data":
                assert tx is not None
                decision = await check.data(s, tx)
            else:
                assert tx is not None and message is not None
                decision = await check.end_of_data(s, tx, message)
        except Exception as exc:
            log.exception("check %s failed at %s", check.name, phase)
            decision = Decision(
                "reject",
                TEMP_LOCAL_ERROR,
                saw=f"the check failed: {type(exc).__name__}",
                reason=f"check {check.name} failed",
                metric="local_error",
            )
        if decision is not CONTINUE:  # the bare "nothing to say" is not a step of the story
            self.note(
                s, phase, check.name, decision.action, decision.saw, decision.reply,
                tx.queue_id if tx is not None else "",
            )  # fmt: skip
        return decision

    def _skip(self, s: SessionContext, check: Check, tx: TransactionContext | None) -> bool:
        done = tx.checks_done if tx is not None else s.notes.get("_accepted", set())
        return check.name in done or check.name in s.notes.get("_accepted", set())

    def _accepted(self, s: SessionContext, check: Check, tx: TransactionContext | None) -> None:
        if tx is not None:
            tx.checks_done.add(check.name)
        else:
            s.notes.setdefault("_accepted", set()).add(check.name)

    async def _run(
        self,
        s: SessionContext,
        phase: Phase,
        tx: TransactionContext | None,
        rcpt: RecipientFacts | None = None,
    ) -> Verdict:
        targets: tuple[str, ...] = ()
        for check in self._by_phase[phase]:
            if self._skip(s, check, tx):
                continue
            decision = await self._ask(s, phase, check, tx, rcpt)
            if decision.action == "reject":
                return Verdict(
                    decision.reply,
                    decision.disconnect,
                    check.name,
                    decision.reason,
                    decision.metric or check.name,
                )
            if decision.action == "accept":
                self._accepted(s, check, tx)
            elif tx is not None and decision.action == "discard" and not tx.discarded:
                tx.discarded = decision.reason or f"discarded by {check.name}"
            elif tx is not None and decision.action == "quarantine" and not tx.quarantined:
                tx.quarantined = decision.reason or f"quarantined by {check.name}"
            for change in decision.changes:
                if isinstance(change, RouteRecipient):
                    targets = change.targets
                    if rcpt is not None:
                        rcpt = replace(rcpt, targets=targets)
        return Verdict(targets=targets)

    # -- the phases (the contract is in the module docstring) ------------------
    async def connect(self, s: SessionContext) -> Verdict:
        return await self._run(s, "connect", None)

    async def helo(self, s: SessionContext) -> Verdict:
        return await self._run(s, "helo", None)

    async def mail(self, s: SessionContext, tx: TransactionContext) -> Verdict:
        return await self._run(s, "mail", tx)

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Verdict:
        verdict = await self._run(s, "rcpt", tx, rcpt)
        if verdict.reply is None and not verdict.targets:
            return replace(verdict, targets=(rcpt.address,))
        return verdict

    async def data(self, s: SessionContext, tx: TransactionContext) -> Verdict:
        return await self._run(s, "data", tx)

    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: MessageView
    ) -> MessageVerdict:
        out = MessageVerdict(prepend=message.prepend, header=message.header)
        view = _EditedMessage(message, out)
        replaced: list[bytes] = []
        for check in self._by_phase["end_of_data"]:
            if self._skip(s, check, tx):
                continue
            decision = await self._ask(s, "end_of_data", check, tx, message=view)
            if decision.action == "reject":
                assert decision.reply is not None
                out.reply = decision.reply
                out.check = check.name
                out.reason = decision.reason
                out.metric = decision.metric or check.name
                return out
            if decision.action == "discard" and not tx.discarded:
                tx.discarded = decision.reason or f"discarded by {check.name}"
            if decision.action == "quarantine" and not tx.quarantined:
                tx.quarantined = decision.reason or f"quarantined by {check.name}"
            replaced.clear()
            for change in decision.changes:
                _apply(out, change, replaced)
            if replaced:
                out.body = b"".join(replaced)
        out.discard = tx.discarded
        out.quarantine = tx.quarantined
        return out

    async def reset(self, s: SessionContext, tx: TransactionContext) -> None:
        for check in self.checks:
            try:
                await check.reset(s, tx)
            except Exception:
                log.exception("check %s failed at reset", check.name)

    async def close(self, s: SessionContext) -> None:
        for check in self.checks:
            try:
                await check.close(s)
            except Exception:
                log.exception("check %s failed at close", check.name)


def _apply(out: MessageVerdict, change: object, replaced: list[bytes]) -> None:
    """One end-of-data change onto the verdict (header edits at once, so the next
    check sees them)."""
    if isinstance(change, AddHeader):
        prepend, header = add_header(out.prepend, out.header, change)
        out.header_changed = out.header_changed or header != out.header
        out.prepend, out.header = prepend, header
    elif isinstance(change, AddRawFields):
        out.prepend += change.fields
    elif isinstance(change, ChangeHeader):
        out.header = change_header(out.header, change)
        out.header_changed = True
    elif isinstance(change, SetHeaderSection):
        out.header_changed = out.header_changed or change.header != out.header
        out.header = change.header
    elif isinstance(change, ReplaceBody):
        replaced.append(change.body)
    elif isinstance(change, ChangeSender):
        out.sender = change.address
    elif isinstance(change, AddRecipient):
        out.added.append(change.address)
    elif isinstance(change, DeleteRecipient):
        out.removed.append(change.address)


# -- composition ---------------------------------------------------------------------
# A check module exposes ``build(kind, parts) -> Check | None``: None when it has
# nothing to do on that listener kind or is not configured. The order below is the
# order checks are asked in; a new check adds one line here.
# A factory may also return a list (``policy_service``: one check per configured server).
CheckFactory = Callable[[ListenerKind, PipelineParts], Check | Sequence[Check] | None]


def factories() -> tuple[CheckFactory, ...]:
    return (
        # connect / helo: who is talking (port 25 protection)
        pregreet.build,
        dnsbl.build,
        reverse_dns.build,
        helo_check.build,
        # mail / rcpt: who may send where
        relay_check.build,
        submission_check.build,
        # after relay: a recipient refused anyway is neither counted nor greylisted
        greylist.build,  # before the rate limit: a greylisted recipient is not counted
        smtp_rate_limit.build,
        policy_service.build_all,
        # end of data: what the message is
        authentication_check.build,
        # [[milter]]: after authentication, so a milter sees Authentication-Results:
        milter_check.build,
    )


def build_pipeline(
    kind: ListenerKind, parts: PipelineParts, trace: TraceSink | None = None
) -> Pipeline:
    """The pipeline of one listener kind, from the shared parts (``parts.py``)."""
    checks: list[Check] = []
    for make in factories():
        made = make(kind, parts)
        if isinstance(made, Sequence):
            checks.extend(made)
        elif made is not None:
            checks.append(made)
    return Pipeline(checks, parts.clock, trace)


def client_facts(ip: str, **known: object) -> ClientFacts:
    """A ``ClientFacts`` for tools (``explain --simulate``) and tests."""
    return replace(ClientFacts(ip=ip), **known)  # type: ignore[arg-type]
