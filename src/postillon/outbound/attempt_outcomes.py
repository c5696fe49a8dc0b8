"""What one delivery attempt over several addresses comes to: the outcomes
already settled when a connection broke, the outcome when every address
failed, and the host/TLS description for the delivery log line (split from
``smtp_transport``)."""

from __future__ import annotations

from typing import Protocol

from postillon.core.outcome import Outcome, PermFail, TempFail, TlsDetails, outcome_from_reply
from postillon.core.reply import Reply
from postillon.outbound import session_tls
from postillon.outbound.client_session import SessionError, SmtpClientSession
from postillon.outbound.shaping import all_busy
from postillon.outbound.tls_policy import HostRefused, TlsRequirement

__all__ = ["describe", "failure", "settled_before_failure"]


class Where(Protocol):
    """Where a connection went (``smtp_transport.Target``)."""

    @property
    def host(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def port(self) -> int: ...


NO_ADDRESSES = Reply.of(451, "4.4.4", "No usable address for the destination host")


def settled_before_failure(
    exc: SessionError, detail: str, tls: TlsDetails | None = None
) -> list[Outcome] | None:
    """Outcomes already final when a connection broke mid-transaction.

    A recipient refused with 5xx at RCPT, or (LMTP) given its own 250 after
    DATA, must not be sent again: that would bounce late or deliver twice.
    The still-open recipients get the made-up 4xx and are retried later.
    None when nothing was settled, so the next host may take the whole job.
    """
    partial = exc.partial
    if partial is None or all(r.is_transient for r in partial.per_recipient):
        return None
    return [outcome_from_reply(reply, detail, tls) for reply in partial.per_recipient]


def failure(errors: list[SessionError], detail: str, tls: TlsDetails | None = None) -> Outcome:
    if not errors:
        return TempFail(NO_ADDRESSES, detail)
    last = errors[-1]
    if (busy := all_busy(errors, detail)) is not None:  # no slot anywhere: not tried
        return busy
    if last.reply is not None:
        reply = last.reply
    elif last.status:  # a TLS policy or local failure: the reason is the reply
        reply = Reply.of(550 if last.permanent else 451, last.status, last.detail[:400])
    else:
        reply = Reply.of(451, "4.4.1", f"Connection failed: {last.detail}"[:400])
    if all(e.permanent for e in errors) and reply.is_permanent:
        return PermFail(reply, detail, tls)
    if reply.is_permanent:
        # Some host failed temporarily: try again later rather than bounce.
        reply = Reply.of(451, "4.4.1", f"{reply.code} {' / '.join(reply.lines)}"[:400])
    return TempFail(reply, detail, tls=tls)


def describe(
    target: Where, session: SmtpClientSession | None, req: TlsRequirement | HostRefused
) -> str:
    """The delivery log line's relay text (``session_tls.describe``)."""
    return session_tls.describe(target.host, target.address, target.port, session, req)
