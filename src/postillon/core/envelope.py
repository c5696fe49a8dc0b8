"""Envelope values: MAIL and RCPT parameters (RFC 1870, 6152, 6531, 3030, 3461, 8689).

The protocol core parses ESMTP parameters into these values; intake stores them
with the message so that outbound delivery can pass DSN parameters on, and
`dsn/` can honour RET/NOTIFY/ENVID/ORCPT when it writes a notification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class BodyType(StrEnum):
    SEVEN_BIT = "7BIT"
    EIGHT_BIT_MIME = "8BITMIME"
    BINARY_MIME = "BINARYMIME"


class DsnRet(StrEnum):
    FULL = "FULL"
    HDRS = "HDRS"


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body: BodyType = BodyType.SEVEN_BIT
    smtputf8: bool = False
    ret: DsnRet | None = None
    envid: str | None = None  # xtext-decoded
    auth: str | None = None  # RFC 4954 AUTH= parameter, decoded; "<>" means unknown
    # RFC 8689 §4.1: MAIL FROM ... REQUIRETLS was given (only accepted over TLS);
    # every onward SMTP hop must then be verified TLS to a server offering REQUIRETLS.
    requiretls: bool = False
    # RFC 8689 §3: the message carries "TLS-Required: No" (set by intake from the
    # header section; ignored when ``requiretls`` is set, §4.1): it may go out
    # under opportunistic TLS whatever the destination's policy asks.
    tls_required_no: bool = False
    # RFC 6710 MT-PRIORITY (-9 .. 9) as the client gave it; None: not given. Only
    # trusted and authenticated senders' values count (core/priority.py).
    mt_priority: int | None = None


@dataclass(frozen=True, slots=True)
class RcptParams:
    # RFC 3461 §4.1: NEVER, or any of SUCCESS, FAILURE, DELAY. Empty = not given.
    notify: frozenset[str] = field(default_factory=frozenset)
    orcpt: str | None = None  # "addr-type;xtext-decoded address", e.g. "rfc822;a@b"

    @property
    def notify_never(self) -> bool:
        return "NEVER" in self.notify


def xtext_decode(text: str) -> str:
    """RFC 3461 §4: '+' followed by two upper-case hex digits encodes one byte."""
    out = bytearray()
    i = 0
    raw = text.encode("ascii")
    while i < len(raw):
        b = raw[i]
        if b == 0x2B:  # '+'
            hexpart = raw[i + 1 : i + 3]
            if len(hexpart) != 2 or not all(c in b"0123456789ABCDEF" for c in hexpart):
                raise ValueError("invalid xtext hexchar")
            out.append(int(hexpart, 16))
            i += 3
            continue
        if b < 33 or b > 126 or b == 0x3D:  # '=' is not allowed in xtext
            raise ValueError("invalid xtext character")
        out.append(b)
        i += 1
    return out.decode("utf-8", errors="replace")


def is_printable_ascii(text: str) -> bool:
    """RFC 3461 §4.2 and §4.4: a decoded ENVID or ORCPT address is printable
    US-ASCII (space through "~"). Anything else (CR, LF, escapes) would be
    written into a DSN or a log, so the protocol core refuses it."""
    return all(32 <= ord(c) <= 126 for c in text)


def has_controls(text: str) -> bool:
    """C0 controls, DEL or C1 controls: never part of a value we write out."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)


def xtext_encode(text: str) -> str:
    out = []
    for b in text.encode("utf-8"):
        if 33 <= b <= 126 and b not in (0x2B, 0x3D):
            out.append(chr(b))
        else:
            out.append(f"+{b:02X}")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class NewRecipient:
    """One recipient as a transaction hands it to the queue: the session makes it,
    intake and the store take it (``queue.store`` re-exports it)."""

    address: str  # the mailbox to deliver to (after alias/catch-all resolution)
    params: RcptParams = field(default_factory=RcptParams)
    original: str | None = None  # the address the client gave, if it differs
