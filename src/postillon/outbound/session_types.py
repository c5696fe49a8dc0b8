"""The values a client session hands its caller: timeouts, results, errors.

Kept apart from ``client_session`` (which re-exports them) so the driver
stays a driver; the transport and the tests import them from either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from postillon.core.reply import Reply
from postillon.outbound.tls import TlsCheck

__all__ = [
    "TLS_POLICY_STATUS",
    "ClientTimeouts",
    "SessionError",
    "TlsChecker",
    "TransactionResult",
]

# Judges a finished handshake: the server's chain (DER, leaf first) → TlsCheck.
TlsChecker = Callable[[list[bytes]], TlsCheck]
# The enhanced status of a made-up reply when TLS did not meet the policy
# (RFC 3463 X.7.5 "cryptographic failure", as Postfix uses it).
TLS_POLICY_STATUS = "4.7.5"


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Seconds; RFC 5321 §4.5.3.2 minimums for the protocol phases."""

    connect: float = 30  # TCP connect (and the TLS handshake for implicit TLS)
    greeting: float = 300  # §4.5.3.2.1 initial 220
    command: float = 300  # §4.5.3.2.2-3 MAIL, RCPT; also EHLO, STARTTLS, AUTH, RSET, QUIT
    data_block: float = 180  # §4.5.3.2.5 each write of body data
    data_end: float = 600  # §4.5.3.2.6 the reply after the end of data


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """The final reply for each recipient, in input order: its RCPT rejection, the
    reply to the end of data, or (LMTP) its own reply after the end of data."""

    per_recipient: tuple[Reply, ...]
    mail_reply: Reply | None


class SessionError(Exception):
    """The connection failed or the server refused the session.

    ``permanent`` is True only when the server said so for the whole session
    (a 5xx greeting or hello); connection failures, timeouts, TLS failures and
    4xx are temporary. ``partial`` (from ``send``) holds the replies known when
    the connection broke; recipients still unanswered carry a made-up 451.
    ``status`` is the enhanced status for a reply made up from ``detail``
    (set for TLS policy failures); ``tls_result`` says what TLS came to
    ("starttls-not-supported", "not-verified", ...; see ``TlsCheck.result``) and
    ``tls`` the session's TLS ("TLSv1.3 TLS_AES_256_GCM_SHA384") when it came up.
    """

    def __init__(
        self,
        detail: str,
        *,
        reply: Reply | None = None,
        permanent: bool = False,
        partial: TransactionResult | None = None,
        status: str = "",
        tls_result: str = "",
        tls: str = "",
    ) -> None:
        super().__init__(f"{detail}: {reply}" if reply is not None else detail)
        self.detail = detail
        self.reply = reply
        self.permanent = permanent
        self.partial = partial
        self.status = status
        self.tls_result = tls_result
        self.tls = tls
