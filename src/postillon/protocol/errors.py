"""The one error type raised inside the protocol core.

Every parser and sequence check in ``protocol/`` raises :class:`ProtocolError`
carrying the reply the peer should hear. ``ServerConnection`` catches it at the
single place where the peer's bytes enter (the command dispatcher) and turns it
into a queued reply plus a ``CommandRejected`` event (h11 ``_util.py`` habit).
Programming errors by the adapter (answering twice, reading events while a
decision is pending) are ``RuntimeError``, never ``ProtocolError``.
"""

from __future__ import annotations

from postillon.core.reply import Reply


class ProtocolError(Exception):
    """The peer broke the protocol; ``reply`` is what it will be told."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or str(reply))
        self.reply = reply
        self.detail = detail
