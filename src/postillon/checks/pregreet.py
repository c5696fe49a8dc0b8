"""Pregreet: a client that talks before the greeting (postscreen's pregreet test).

An SMTP client must wait for the 220 greeting (RFC 5321 §3.1); bots that spray
mail often do not. With ``[client_checks] greet_pause`` the session waits that long
before greeting, reading; whatever arrived meanwhile is ``client.pregreet``, and this
check refuses such a client with ``554 5.5.1`` and closes. Trusted networks are
exempt. Only on port 25 (``smtp`` listeners).
"""

from __future__ import annotations

from postillon.checks.base import BaseCheck
from postillon.checks.context import ListenerKind, SessionContext
from postillon.checks.decision import Decision, Phase, proceed, reject
from postillon.checks.parts import PipelineParts
from postillon.core.reply import Reply

PREGREET = Reply.of(554, "5.5.1", "Protocol error: you talked before the greeting")
_SHOWN = 40  # bytes of the pregreet shown in the trace


class PregreetCheck(BaseCheck):
    name = "pregreet"
    phases: frozenset[Phase] = frozenset({"connect"})

    def __init__(self, pause: float) -> None:
        self.pause = pause

    async def connect(self, s: SessionContext) -> Decision:
        said = s.client.pregreet
        if not said:
            return proceed(f"waited {self.pause:g}s before the greeting: the client did too")
        saw = f"the client sent {said[:_SHOWN]!r} before the greeting ({len(said)} bytes)"
        if s.client.trusted:
            return proceed(saw + "; trusted network")
        return reject(PREGREET, saw, disconnect=True, metric="pregreet")


def build(kind: ListenerKind, parts: PipelineParts) -> PregreetCheck | None:
    pause = parts.config.client_checks.greet_pause
    if kind != "smtp" or pause <= 0:
        return None
    return PregreetCheck(pause)
