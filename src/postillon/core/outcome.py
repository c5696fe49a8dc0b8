"""Delivery outcomes as values (DESIGN principle 6).

A transport returns one outcome per recipient; it never raises across the
module boundary. An error nobody classified counts as temporary: retrying a
message is recoverable, bouncing it wrongly is not.
"""

from __future__ import annotations

from dataclasses import dataclass

from postillon.core.reply import Reply


@dataclass(frozen=True, slots=True)
class TlsDetails:
    """The TLS of the SMTP session an outcome came from (the last host tried), for
    the mail log, the message history and the admin page's per-recipient view.

    ``policy``: what applied, as an operator names it: ``dane``, ``mta-sts``
    (an enforce policy; a testing one is ``mta-sts-testing``), or the table's mode
    (``verify``, ``fingerprint``, ``encrypt``, ``opportunistic``, ``none``).
    ``result``: the TLS label (``verified``, ``dane-ee``, ``not-verified``,
    ``plaintext``, ``sts-mx-mismatch``, ...); ``verified``: the server proved its
    identity (verified, pinned, DANE). ``version``/``cipher`` are "" when no TLS
    came up (refused before connecting, or plaintext)."""

    mx: str
    address: str
    policy: str
    result: str
    verified: bool
    version: str = ""
    cipher: str = ""

    def log_fields(self) -> dict[str, object]:
        """The mail log / history fields (flat: the history keeps plain values)."""
        fields: dict[str, object] = {
            "mx": self.mx,
            "tls_policy": self.policy,
            "tls_result": self.result,
            "tls_verified": "yes" if self.verified else "no",
        }
        if self.version:
            fields["tls_version"] = self.version
        if self.cipher:
            fields["tls_cipher"] = self.cipher
        return fields


@dataclass(frozen=True, slots=True)
class Delivered:
    reply: Reply
    detail: str = ""  # e.g. the Maildir file name or "mx.example.org[192.0.2.1]"
    # Handed to a next hop that does not support DSN (RFC 3461 §6.2.2), so a
    # requested success notice must come from us, with Action: relayed.
    relayed_without_dsn: bool = False
    tls: TlsDetails | None = None  # an SMTP/LMTP session's TLS (None: no session)


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
    tls: TlsDetails | None = None
    # Not attempted because the destination is suspended (shaping): every due record
    # of the same recipient domain can wait as long, postponed in one write.
    suspended: bool = False


@dataclass(frozen=True, slots=True)
class PermFail:
    reply: Reply
    detail: str = ""
    tls: TlsDetails | None = None


Outcome = Delivered | TempFail | PermFail


def outcome_from_reply(reply: Reply, detail: str = "", tls: TlsDetails | None = None) -> Outcome:
    """Classify a remote reply: 2xx delivered, 5xx permanent, anything else temporary."""
    if reply.code < 400:
        return Delivered(reply, detail, tls=tls)
    if reply.code >= 500:
        return PermFail(reply, detail, tls=tls)
    return TempFail(reply, detail, tls=tls)
