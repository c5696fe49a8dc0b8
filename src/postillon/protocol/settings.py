"""Per-connection settings of the SMTP/LMTP server core (a plain value, no config import)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from postillon.protocol.sasl import MECHANISMS

_MECHANISM = re.compile(r"[A-Z0-9\-_]{1,20}\Z")  # RFC 4422 §3.1 sasl-mech


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What one ``ServerConnection`` offers and enforces.

    Every limit has its reason beside it (DESIGN.md principle 8); 0 means "no
    limit" for ``max_message_size``, ``max_recipients`` and ``max_errors``.
    """

    hostname: str
    # RFC 1870: advertised as "SIZE n"; checked at MAIL (SIZE=) and while
    # reading DATA/BDAT.
    max_message_size: int = 52_428_800
    # RFC 5321 §4.5.3.1.8: at least 100 must be accepted; past the limit 452 4.5.3.
    max_recipients: int = 1000
    # RFC 9422 MAILMAX: transactions (accepted MAIL commands) per session; past
    # it MAIL gets 451 4.5.3 and the client reconnects. 0: no limit.
    max_transactions: int = 0
    # RFC 9422: advertise "LIMITS RCPTMAX=max_recipients MAILMAX=max_transactions"
    # (the limits that are set), so clients split instead of collecting 452s.
    limits: bool = False
    # Every 4xx/5xx reply counts; on reaching it the core sends 421 4.7.0 and
    # closes (a client that only collects errors is probing or broken).
    max_errors: int = 20
    # RFC 5321 §4.5.3.1.4 says 512 octets including CRLF; SMTPUTF8 addresses
    # and ESMTP parameters need more, so 2048 by default (never less than 512).
    max_command_line: int = 2048
    starttls: bool = False  # offer STARTTLS (RFC 3207) while not already TLS
    tls_active: bool = False  # implicit TLS from the start (RFC 8314, port 465)
    lmtp: bool = False  # RFC 2033: LHLO, one reply per accepted recipient after data
    chunking: bool = True  # RFC 3030 CHUNKING / BDAT
    smtputf8: bool = True  # RFC 6531
    dsn: bool = True  # RFC 3461
    # RFC 8689 REQUIRETLS: offered (and accepted) only once TLS is active, on SMTP
    # (not LMTP: final delivery is this machine's business, §4.4).
    requiretls: bool = True
    # RFC 6710 MT-PRIORITY on MAIL (offered by the server's SMTP listeners; off here
    # so that a bare ServerSettings keeps the minimal EHLO of the transcripts).
    mt_priority: bool = False
    # RFC 4954 SASL mechanisms (names from protocol.sasl.MECHANISMS). Offered
    # and accepted only once TLS is active (RFC 4954 §4, RFC 8314), unless
    # auth_plaintext allows it on this listener (never by default).
    auth_mechanisms: tuple[str, ...] = ()
    auth_plaintext: bool = False
    # RFC 6409 §4.3 submission: MAIL before a successful AUTH gets 530 5.7.0.
    require_auth: bool = False

    def __post_init__(self) -> None:
        if not self.hostname or any(c in self.hostname for c in "\r\n\x00 "):
            raise ValueError(f"invalid hostname {self.hostname!r}")
        for name in ("max_message_size", "max_recipients", "max_transactions", "max_errors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_command_line < 512:
            raise ValueError("max_command_line must be at least 512 (RFC 5321 4.5.3.1.4)")
        for mech in self.auth_mechanisms:
            if not _MECHANISM.match(mech):
                raise ValueError(f"invalid SASL mechanism name {mech!r}")
            if mech not in MECHANISMS:
                # SCRAM-SHA-256-PLUS needs the TLS exporter, which Python 3.11's
                # ssl does not provide (see protocol/sasl.py).
                raise ValueError(f"unsupported SASL mechanism {mech!r}")
