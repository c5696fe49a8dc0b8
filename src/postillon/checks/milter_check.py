"""``[[milter]]`` as one check of the pipeline: every configured milter, in order.

One check (named "milter") runs the milters of a listener kind in the order they are
configured, as Postfix does with ``smtpd_milters``: at each phase each milter still
in the conversation is asked; the first reject (or tempfail) wins and the later ones
are not asked; a milter that answers "accept" is done for the message (at connect or
HELO: for the session); a discard drops the message and ends the conversation for it.
At end of data each milter sees the message as the milters before it left it (their
header changes and body replacement applied), and the combined changes go back to
the pipeline in order. A quarantine (SMFIR_QUARANTINE) becomes the pipeline's
quarantine, i.e. the message is held.

A milter that is down, too slow, closes mid-dialogue or sends garbage gets its
``default_action``: "accept" leaves it out for the rest of the session; "tempfail"
and "reject" answer 451 4.7.1 / 550 5.7.1 from MAIL FROM on (at connect and HELO the
failure is remembered, so the client first learns of it at MAIL, as with Postfix).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from postillon.checks import decision as d
from postillon.checks.base import BaseCheck
from postillon.checks.context import (
    ListenerKind,
    MessageView,
    RecipientFacts,
    SessionContext,
    TransactionContext,
)
from postillon.checks.decision import Decision, Phase
from postillon.checks.header_edit import add_header, change_header, split_fields
from postillon.checks.milter_driver import MilterConnection, MilterOutcome
from postillon.checks.milter_macros import SessionMacros, mail_args, stage_macros
from postillon.checks.milter_pool import MilterPool
from postillon.checks.parts import PipelineParts
from postillon.config.model import MilterConfig
from postillon.core.reply import Reply
from postillon.protocol import milter_wire as w
from postillon.protocol.milter import MilterClient
from postillon.protocol.milter_wire import Stage, Verdict

TEMPFAIL_REPLY = Reply.of(451, "4.7.1", "Service unavailable - try again later")
REJECT_REPLY = Reply.of(550, "5.7.1", "Command rejected")
CONNECT_REJECT_REPLY = Reply.of(554, "5.7.1", "Connection rejected")

# One protocol step: queue a command on the client, say whether a reply is due.
Sender = Callable[[MilterClient], bool]


@dataclass(slots=True)
class _Milter:
    """One milter's part in one session."""

    config: MilterConfig
    conn: MilterConnection | None = None
    done_session: bool = False  # accepted at connect/HELO, or failed with "accept"
    discard_session: bool = False  # discarded at connect/HELO: every message goes
    done_message: bool = False  # accepted (or discarded) for the current message
    in_message: bool = False  # MAIL was sent and end of message not yet
    # Connecting and negotiating while the client reads the greeting (see connect()).
    opening: asyncio.Task[MilterOutcome] | None = None

    @property
    def failed(self) -> str:
        return self.conn.failed if self.conn is not None else ""


@dataclass(slots=True)
class _Session:
    milters: list[_Milter]
    macros: SessionMacros


class MilterCheck(BaseCheck):
    name = "milter"
    phases: frozenset[Phase] = frozenset(("connect", "helo", "mail", "rcpt", "data", "end_of_data"))

    def __init__(
        self, milters: tuple[MilterConfig, ...], hostname: str, message_size: int = 0
    ) -> None:
        self.milters = milters
        self.hostname = hostname
        self.message_size = message_size  # bounds a milter's replacement body (0: default)
        # Idle connections kept between sessions, by milter name (milter_pool.py).
        self.pools: dict[str, MilterPool] = {
            m.name: MilterPool() for m in milters if m.reuse_connections != "never"
        }
        # Milters whose last negotiation asked for no answer to SMFIC_CONNECT (NR_CONN or
        # NOCONNECT): a new session opens their connection in the background.
        self.quiet_connect: set[str] = set()

    def _session(self, s: SessionContext) -> _Session:
        state = s.state.get(self.name)
        if state is None:
            state = s.state[self.name] = _Session(
                [_Milter(m) for m in self.milters], SessionMacros(self.hostname)
            )
        assert isinstance(state, _Session)
        return state

    async def _opened(self, s: SessionContext, m: _Milter) -> MilterOutcome:
        """Connect, negotiate and send SMFIC_CONNECT the first time a milter is needed."""
        if m.conn is not None:
            return MilterOutcome(failed=m.conn.failed)
        pool = self.pools.get(m.config.name)
        idle = pool.take() if pool is not None else None
        if idle is not None:
            m.conn = idle
            idle.reuse()  # SMFIC_QUIT_NC goes out with the SMFIC_CONNECT below
        else:
            m.conn = MilterConnection(
                m.config.name,
                m.config.address,
                m.config.timeout,
                self.message_size,
                m.config.reuse_connections,
            )
            outcome = await m.conn.open()
            if outcome.failed:
                return outcome
            negotiated = m.conn.negotiated
            assert negotiated is not None
            if negotiated.protocol & _QUIET_CONNECT:
                self.quiet_connect.add(m.config.name)
            else:
                self.quiet_connect.discard(m.config.name)
        c = s.client
        family = "unknown" if not c.ip else ("inet6" if ":" in c.ip else "inet")
        known = self._session(s).macros.known(s)
        return await m.conn.step(
            lambda cl: cl.connect(
                c.rdns or "unknown",
                c.ip,
                c.port,
                family=family,
                macros=stage_macros(Stage.CONNECT, known),
            )
        )

    # -- the phases ----------------------------------------------------------------
    async def connect(self, s: SessionContext) -> Decision:
        """A milter that last negotiated no answer to SMFIC_CONNECT and has no idle
        connection is connected and negotiated in the background: the greeting does
        not wait for that round trip, the next phase does (``_settle``). Otherwise
        (first session, a milter that answers at connect) as at any phase."""
        for m in self._session(s).milters:
            name = m.config.name
            pool = self.pools.get(name)
            if name in self.quiet_connect and (pool is None or not len(pool)):
                m.opening = asyncio.ensure_future(self._opened(s, m))
        return await self._session_phase(s, "connect")

    async def helo(self, s: SessionContext) -> Decision:
        return await self._session_phase(s, "helo")

    async def _settle(self, s: SessionContext, phase: Phase, saw: list[str]) -> Decision | None:
        """The outcome of connections opened in the background at connect, at the first
        phase after it: a failure gets the default action as at connect; a milter that
        now answers SMFIC_CONNECT after all (reconfigured) is heard here."""
        for m in self._session(s).milters:
            if m.opening is None:
                continue
            opening, m.opening = m.opening, None
            outcome = await opening
            decision = self._session_outcome(m, outcome, phase, saw)
            if decision is not None:
                return decision
        return None

    async def _session_phase(self, s: SessionContext, phase: Phase) -> Decision:
        saw: list[str] = []
        if phase != "connect":
            decision = await self._settle(s, phase, saw)
            if decision is not None:
                return decision
        for m in self._session(s).milters:
            if m.done_session or m.failed or m.opening is not None:
                continue
            outcome = await self._opened(s, m)
            if phase == "helo" and not outcome.failed and outcome.kind == "continue":
                assert m.conn is not None
                macros = stage_macros(Stage.HELO, self._session(s).macros.known(s))
                helo = s.client.helo
                outcome = await m.conn.step(partial(MilterClient.helo, name=helo, macros=macros))
            decision = self._session_outcome(m, outcome, phase, saw)
            if decision is not None:
                return decision
        return _proceed(saw)

    def _session_outcome(
        self, m: _Milter, outcome: MilterOutcome, phase: Phase, saw: list[str]
    ) -> Decision | None:
        name = m.config.name
        if outcome.failed:
            if m.config.default_action == "accept":
                m.done_session = True
            saw.append(f"{name} failed ({outcome.failed}): {m.config.default_action}")
            return None
        kind = outcome.kind
        saw.append(f"{name}: {_describe(outcome.verdict)}")
        if kind == "accept":
            m.done_session = True
        elif kind == "discard":
            m.discard_session = True
        elif kind in ("reject", "tempfail"):
            fallback = CONNECT_REJECT_REPLY if phase == "connect" else REJECT_REPLY
            reply = _reply(outcome.verdict, fallback)
            return d.reject(
                reply, "; ".join(saw), reason=f"milter {name}", disconnect=phase == "connect"
            )
        return None

    async def mail(self, s: SessionContext, tx: TransactionContext) -> Decision:
        saw: list[str] = []
        decision = await self._settle(s, "mail", saw)
        if decision is not None:
            return decision
        for m in self._session(s).milters:
            if m.done_session:
                continue
            if m.in_message and m.conn is not None:
                await m.conn.abort()  # the previous transaction ended without end of data
            m.done_message = False
            m.in_message = False
            outcome = await self._opened(s, m)
            if not outcome.failed and outcome.kind == "continue":
                assert m.conn is not None
                m.in_message = True
                known = self._session(s).macros.known(s, tx)
                macros = stage_macros(Stage.ENVFROM, known)
                sender = f"<{tx.sender}>"
                args = mail_args(tx.params)
                outcome = await m.conn.step(
                    partial(MilterClient.mail, sender=sender, args=args, macros=macros)
                )
            decision = self._message_outcome(m, outcome, saw)
            if decision is not None:
                return decision
            if m.discard_session:
                return d.discard("; ".join(saw), f"discarded by milter {m.config.name}")
        return _proceed(saw)

    async def rcpt(
        self, s: SessionContext, tx: TransactionContext, rcpt: RecipientFacts
    ) -> Decision:
        known = self._session(s).macros.known(s, tx, rcpt)
        macros = stage_macros(Stage.ENVRCPT, known)
        path = f"<{rcpt.address}>"
        return await self._message_phase(s, tx, lambda cl: cl.rcpt(path, macros=macros))

    async def data(self, s: SessionContext, tx: TransactionContext) -> Decision:
        macros = stage_macros(Stage.DATA, self._session(s).macros.known(s, tx))
        return await self._message_phase(s, tx, lambda cl: cl.data(macros=macros))

    async def _message_phase(
        self, s: SessionContext, tx: TransactionContext, send: Sender
    ) -> Decision:
        saw: list[str] = []
        if tx.discarded:
            return d.CONTINUE
        for m in self._session(s).milters:
            if m.done_session or m.done_message:
                continue
            if m.conn is None or m.failed or not m.in_message:
                outcome = MilterOutcome(failed=m.failed or "not in the conversation")
            else:
                outcome = await m.conn.step(send)
            decision = self._message_outcome(m, outcome, saw)
            if decision is not None:
                return decision
        return _proceed(saw)

    def _message_outcome(
        self, m: _Milter, outcome: MilterOutcome, saw: list[str]
    ) -> Decision | None:
        """A reject/discard ``Decision`` that ends the phase, or None to go on."""
        name = m.config.name
        if outcome.failed:
            action = m.config.default_action
            saw.append(f"{name} failed ({outcome.failed}): default_action {action}")
            if action == "accept":
                m.done_session = True
                return None
            reply = TEMPFAIL_REPLY if action == "tempfail" else REJECT_REPLY
            return d.reject(
                reply, "; ".join(saw), reason=f"milter {name} unavailable", metric="milter"
            )
        saw.append(f"{name}: {_describe(outcome.verdict)}")
        kind = outcome.kind
        if kind == "accept":
            m.done_message = True
        elif kind == "discard":
            m.done_message = True
            return d.discard("; ".join(saw), f"discarded by milter {name}")
        elif kind in ("reject", "tempfail"):
            fallback = TEMPFAIL_REPLY if kind == "tempfail" else REJECT_REPLY
            return d.reject(
                _reply(outcome.verdict, fallback),
                "; ".join(saw),
                reason=f"milter {name}",
                metric="milter",
            )
        return None

    async def end_of_data(
        self, s: SessionContext, tx: TransactionContext, message: MessageView
    ) -> Decision:
        if tx.discarded:
            return d.CONTINUE
        saw: list[str] = []
        changes: list[d.Change] = []
        prepend, header = message.prepend, message.header
        body: bytes | None = None
        quarantine = ""
        for m in self._session(s).milters:
            if m.done_session or m.done_message:
                continue
            if m.conn is None or m.failed or not m.in_message:
                outcome = MilterOutcome(failed=m.failed or "not in the conversation")
            else:
                known = self._session(s).macros.known(s, tx)
                fields = _fields(prepend + header)
                chunks = [body] if body is not None else message.body_chunks()
                outcome = await m.conn.message(
                    fields,
                    chunks,
                    stage_macros(Stage.EOH, known),
                    stage_macros(Stage.EOM, known),
                )
                m.in_message = False
            decision = self._message_outcome(m, outcome, saw)
            if decision is not None:
                return decision
            new_body: list[bytes] = []
            prepend_count = len(split_fields(prepend))
            for mod in outcome.modifications:
                if isinstance(mod, w.Quarantine):
                    quarantine = (
                        quarantine or mod.reason or f"quarantined by milter {m.config.name}"
                    )
                    continue
                if isinstance(mod, w.ReplaceBody):
                    new_body.append(mod.chunk)
                    continue
                change = _change(mod, prepend_count)
                changes.append(change)
                if isinstance(change, d.AddHeader):
                    prepend, header = add_header(prepend, header, change)
                elif isinstance(change, d.ChangeHeader):
                    header = change_header(header, change)
            if new_body:
                body = b"".join(new_body)
            if outcome.modifications:
                saw[-1] += f" ({_summary(outcome.modifications)})"
        if body is not None:
            changes.append(d.ReplaceBody(body))
        if quarantine:
            return d.quarantine(quarantine, "; ".join(saw), *changes)
        return d.proceed("; ".join(saw), *changes)

    async def reset(self, s: SessionContext, tx: TransactionContext) -> None:
        for m in self._session(s).milters:
            if m.in_message and m.conn is not None:
                await m.conn.abort()
            m.in_message = False
            m.done_message = False

    async def close(self, s: SessionContext) -> None:
        state = s.state.pop(self.name, None)
        if isinstance(state, _Session):
            for m in state.milters:
                if m.opening is not None:  # the client left before the next phase
                    await m.opening
                    m.opening = None
                if m.conn is None:
                    continue
                # Kept for the next session when it qualifies (milter_pool.py),
                # closed with SMFIC_QUIT otherwise.
                pool = self.pools.get(m.config.name)
                if pool is None or not pool.put(m.conn):
                    await m.conn.close()


def build(kind: ListenerKind, parts: PipelineParts) -> MilterCheck | None:
    """The milters of this listener kind, in configured order; None when there are none."""
    milters = tuple(m for m in parts.config.milter if kind in m.listeners)
    if not milters:
        return None
    return MilterCheck(milters, parts.config.hostname, parts.config.limits.message_size)


# -- translating the milter's answers ------------------------------------------------
_QUIET_CONNECT = int(w.ProtocolFlag.NR_CONN | w.ProtocolFlag.NOCONNECT)
_PLAIN = (": continue", ": continue (no reply due)")


def _proceed(saw: list[str]) -> Decision:
    """Go on; a phase where every milter just said "continue" is not worth a line in
    the explain trace (the bare ``CONTINUE`` is not recorded), anything else is."""
    if all(entry.endswith(_PLAIN) for entry in saw):
        return d.CONTINUE
    return d.proceed("; ".join(saw))


def _describe(verdict: Verdict | None) -> str:
    if verdict is None:
        return "continue (no reply due)"
    if verdict.code is not None:
        status = f" {verdict.status}" if verdict.status else ""
        return f"{verdict.kind} {verdict.code}{status} {' / '.join(verdict.text)}".rstrip()
    return verdict.kind


def _reply(verdict: Verdict | None, fallback: Reply) -> Reply:
    """The milter's own SMFIR_REPLYCODE reply, or the standard one."""
    if verdict is None or verdict.code is None:
        return fallback
    status = verdict.status or ("4.7.1" if verdict.code < 500 else "5.7.1")
    return Reply(verdict.code, status, verdict.text or ("",))


def _fields(header: bytes) -> list[tuple[str, str]]:
    """(name, raw value after the colon) per field, as SMFIC_HEADER sends them."""
    out: list[tuple[str, str]] = []
    for raw in split_fields(header):
        name, sep, value = raw.decode("utf-8", "surrogateescape").partition(":")
        if not sep:
            continue  # not a field (intake keeps such lines out; be safe)
        out.append((name.strip(), value.removesuffix("\r\n")))
    return out


def _summary(mods: list[w.Modification]) -> str:
    """The changes a milter asked for, in a few words for the explain trace."""
    words: list[str] = []
    for mod in mods:
        if isinstance(mod, w.AddHeader | w.InsertHeader):
            words.append(f"add {mod.name}")
        elif isinstance(mod, w.ChangeHeader):
            words.append(f"{'change' if mod.value else 'delete'} {mod.name}")
        elif isinstance(mod, w.ReplaceBody):
            if "new body" not in words:
                words.append("new body")
        elif isinstance(mod, w.ChangeSender):
            words.append(f"sender {mod.address}")
        elif isinstance(mod, w.AddRecipient):
            words.append(f"add recipient {mod.address}")
        elif isinstance(mod, w.DeleteRecipient):
            words.append(f"delete recipient {mod.address}")
        else:
            words.append(f"quarantine: {mod.reason}")
    return ", ".join(words)


def _unbracket(address: str) -> str:
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def _value(raw: str) -> str:
    """The raw value after the colon into the form ``render_field`` writes after ": "."""
    return raw[1:] if raw.startswith(" ") else raw


def _change(mod: w.Modification, prepend_count: int) -> d.Change:
    if isinstance(mod, w.AddHeader):
        return d.AddHeader(mod.name, _value(mod.value), index=None)
    if isinstance(mod, w.InsertHeader):
        # The milter counts fields from the top of what it was sent (the fields
        # added on top first); the pipeline counts within the client's section.
        index = 0 if mod.index <= prepend_count else mod.index - prepend_count
        return d.AddHeader(mod.name, _value(mod.value), index=index)
    if isinstance(mod, w.ChangeHeader):
        return d.ChangeHeader(mod.name, mod.index, _value(mod.value) if mod.value else None)
    if isinstance(mod, w.ChangeSender):
        return d.ChangeSender(_unbracket(mod.address), " ".join(mod.args))
    if isinstance(mod, w.AddRecipient):
        return d.AddRecipient(_unbracket(mod.address), " ".join(mod.args))
    assert isinstance(mod, w.DeleteRecipient)
    return d.DeleteRecipient(_unbracket(mod.address))
