"""Delivery outcomes as values (DESIGN principle 6).

A transport returns one outcome per recipient; it never raises across the
module boundary. An error nobody classified counts as temporary: retrying a
message is recoverable, bouncing it wrongly is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from postillon.core.reply import Reply


@dataclass(frozen=True, slots=True)
class Delivered:
    reply: Reply
    detail: str = ""  # e.g. the Maildir file name or "mx.example.org[192.0.2.1]"
    # Handed to a next hop that does not support DSN (RFC 3461 §6.2.2), so a
    # requested success notice must come from us, with Action: relayed.
    relayed_without_dsn: bool = False


@dataclass(frozen=True, slots=True)
class TempFail:
    reply: Reply
    detail: str = ""
    # Not tried at all (e.g. no free connection slot to the destination): the
    # queue reschedules soon without counting an attempt.
    attempted: bool = True
    # Not attempted: how many seconds until it is worth trying again (a suspended
    # destination, a message rate whose next token is further away); 0 = soon.
    retry_after: float = 0.0


@dataclass(frozen=True, slots=True)
class PermFail:
    reply: Reply
    detail: str = ""


Outcome = Delivered | TempFail | PermFail


def outcome_from_reply(reply: Reply, detail: str = "") -> Outcome:
    """Classify a remote reply: 2xx delivered, 5xx permanent, anything else temporary."""
    if reply.code < 400:
        return Delivered(reply, detail)
    if reply.code >= 500:
        return PermFail(reply, detail)
    return TempFail(reply, detail)
