"""What the client core writes: the envelope commands and the message body.

The counterpart of ``_readers.py`` for ``ClientConnection`` (the server core
writes nothing but replies, ``Reply.to_bytes``). Both parts are pure functions
of their input:

* :func:`envelope_commands` - MAIL FROM and RCPT TO lines with the parameters
  the server offers (SIZE, BODY, SMTPUTF8, DSN, AUTH=, REQUIRETLS), or the client's own
  refusal when the message cannot go to this server at all.
* :class:`BodyEncoder` - the body as it goes on the wire: bare CR/LF rewritten
  to CRLF, dot-stuffing and the end marker for DATA (RFC 5321 §4.5.2),
  streaming across pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from postillon.core.address import ascii_address
from postillon.core.envelope import BodyType, MailParams, RcptParams, xtext_encode
from postillon.core.reply import Reply
from postillon.protocol.client_events import Extensions
from postillon.protocol.replies import REQUIRETLS_UNSUPPORTED

__all__ = [
    "SMTPUTF8_UNSUPPORTED",
    "BodyEncoder",
    "Envelope",
    "envelope_commands",
    "size_exceeded",
]

CRLF = b"\r\n"
_NOTIFY_ORDER = ("NEVER", "SUCCESS", "FAILURE", "DELAY")

SMTPUTF8_UNSUPPORTED = Reply.of(
    550, "5.6.7", "Non-ASCII address or header, SMTPUTF8 not supported by remote server"
)


def size_exceeded(limit: int) -> Reply:
    """The client's own refusal of a message above the server's SIZE (RFC 1870 §6.1)."""
    return Reply.of(
        552, "5.3.4", f"Message size exceeds fixed limit of remote server ({limit} octets)"
    )


# --- the envelope ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """The command lines of one transaction, and how its body will go."""

    mail: str  # without CRLF: sent with the MAIL reply expected
    rcpts: list[bytes]  # each with its CRLF
    chunking: bool  # BDAT (RFC 3030) rather than DATA
    binary: bool  # BODY=BINARYMIME: the content goes as it is


def _check_text(what: str, text: str) -> None:
    if any(c in text for c in "\r\n\x00"):
        raise ValueError(f"{what} must not contain CR, LF or NUL: {text!r}")


def _path(address: str) -> str:
    _check_text("address", address)
    return f"<{address}>"


def envelope_commands(
    sender: str,
    params: MailParams,
    recipients: Sequence[tuple[str, RcptParams]],
    ext: Extensions,
    *,
    size: int,
    eight_bit: bool,
    needs_smtputf8: bool,
    use_chunking: bool,
    authenticated: bool,
    smtputf8: bool = False,
) -> Envelope | Reply:
    """MAIL FROM and RCPT TO for ``ext``, or the Reply every recipient gets when
    the message cannot be offered to this server. ValueError for CR, LF or NUL
    in an address or ORCPT.

    SMTPUTF8 (RFC 6531) is said when offered and the message carries the flag
    (``smtputf8``), needs it (``needs_smtputf8``) or has a non-ASCII address.
    To a server without it, U-label domains go as their A-labels (IDNA 2008);
    only a non-ASCII local part (or ``needs_smtputf8``) makes the refusal."""
    addresses = [sender, *(addr for addr, _ in recipients)]
    utf8 = needs_smtputf8 or smtputf8 or not all(a.isascii() for a in addresses)
    if "SMTPUTF8" not in ext:
        ascii_forms = [ascii_address(a) for a in addresses]
        if needs_smtputf8 or None in ascii_forms:  # RFC 6531 §3.2: no silent downgrade
            return SMTPUTF8_UNSUPPORTED
        sender, *rcpts = (a for a in ascii_forms if a is not None)
        recipients = [(a, p) for a, (_, p) in zip(rcpts, recipients, strict=True)]
        utf8 = False
    mail = f"MAIL FROM:{_path(sender)}" if sender else "MAIL FROM:<>"
    rcpt_paths = [_path(addr) for addr, _ in recipients]
    if utf8:
        mail += " SMTPUTF8"
    if params.requiretls:
        # RFC 8689 §4.2.1: only to a server that offers REQUIRETLS, and say so on
        # MAIL, so the next hop keeps the requirement; never a silent downgrade.
        if "REQUIRETLS" not in ext:
            return REQUIRETLS_UNSUPPORTED
        mail += " REQUIRETLS"
    limit = ext.size
    if limit and size > limit:
        return size_exceeded(limit)
    if limit is not None and size > 0:
        mail += f" SIZE={size}"
    chunking = "CHUNKING" in ext and use_chunking
    binary = params.body is BodyType.BINARY_MIME and chunking and "BINARYMIME" in ext
    if binary:
        mail += " BODY=BINARYMIME"
    elif (eight_bit or params.body is not BodyType.SEVEN_BIT) and "8BITMIME" in ext:
        mail += " BODY=8BITMIME"
    # Without 8BITMIME the content goes as it is (no MIME downgrade here).
    dsn = "DSN" in ext
    if dsn and params.ret is not None:
        mail += f" RET={params.ret.value}"
    if dsn and params.envid:
        mail += f" ENVID={xtext_encode(params.envid)}"
    if authenticated and params.auth is not None:
        mail += f" AUTH={xtext_encode(params.auth)}"  # RFC 4954 §5
    rcpt_lines: list[bytes] = []
    for path, (_, rp) in zip(rcpt_paths, recipients, strict=True):
        line = f"RCPT TO:{path}"
        if dsn and rp.notify:
            line += " NOTIFY=" + ",".join(n for n in _NOTIFY_ORDER if n in rp.notify)
        if dsn and rp.orcpt:
            _check_text("ORCPT", rp.orcpt)
            kind, _, addr = rp.orcpt.partition(";")
            line += f" ORCPT={kind};{xtext_encode(addr)}"
        rcpt_lines.append(line.encode("utf-8") + CRLF)
    return Envelope(mail, rcpt_lines, chunking, binary)


# --- the body -------------------------------------------------------------------------


class BodyEncoder:
    """Streaming content transform: bare CR/LF to CRLF, and dot-stuffing for DATA.

    Both work on whole pieces with ``bytes.count``/``replace`` (no per-line loop),
    carrying at most a held-back CR and the last two octets sent across pieces.
    """

    __slots__ = ("_cr", "_fix", "_stuff", "_tail")

    def __init__(self, *, stuff: bool, fix_line_endings: bool) -> None:
        self._stuff = stuff
        self._fix = fix_line_endings
        self._cr = False  # a CR held back: it may be the first half of a CRLF
        self._tail = CRLF  # the last two octets sent; the body starts "after a CRLF"

    def encode(self, data: bytes, last: bool) -> bytes:
        if self._fix:
            if self._cr:
                data = b"\r" + data
            self._cr = data.endswith(b"\r") and not last
            if self._cr:
                data = data[:-1]
            crlf = data.count(CRLF)
            if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
                data = data.replace(CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", CRLF)
        if self._stuff and data:
            # The replacement never touches the two context octets in front, so
            # a "." at the start of this piece is found after the last CRLF sent.
            stuffed = (self._tail + data).replace(b"\r\n.", b"\r\n..")
            self._tail = stuffed[-2:]
            data = stuffed[2:]
        if last and self._stuff:
            data += b".\r\n" if self._tail == CRLF else b"\r\n.\r\n"
        return data
