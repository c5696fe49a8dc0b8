"""The one error type raised inside each protocol core (server and client).

Every parser and sequence check of the server core raises :class:`ProtocolError`
carrying the reply the peer should hear. ``ServerConnection`` catches it at the
single place where the peer's bytes enter (the command dispatcher) and turns it
into a queued reply plus a ``CommandRejected`` event (h11 ``_util.py`` habit).
Programming errors by the adapter (answering twice, reading events while a
decision is pending) are ``RuntimeError``, never ``ProtocolError``.

The client core's counterpart is :class:`ClientProtocolError`: the server's
replies broke the protocol; it carries no reply, as there is no one to tell.
"""

from __future__ import annotations

from postillon.core.reply import Reply


class ProtocolError(Exception):
    """The peer broke the protocol; ``reply`` is what it will be told."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        super().__init__(detail or str(reply))
        self.reply = reply
        self.detail = detail


class ClientProtocolError(Exception):
    """The server broke the protocol. Raised inside the client core only:
    ``ClientConnection.next_event`` turns it into a ``ProtocolViolation`` event
    and closes."""
