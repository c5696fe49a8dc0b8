"""Events returned by ``ServerConnection.next_event()``.

Two kinds:

* :class:`Decision` events need exactly one answer from the adapter
  (``reply()``, or ``accept_hello()`` for :class:`Hello`) before
  ``next_event()`` may be called again. :class:`MessageComplete` in LMTP mode
  needs one answer per accepted recipient (``recipients`` of them).
* All other events are information: the core has already done (and queued the
  reply for) whatever the event reports.

When ``next_event()`` has nothing to report it returns the class
:class:`NEED_DATA` itself (h11 style): flush ``data_to_send()``, then read more
bytes from the peer (or close when ``closing`` is set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postillon.core.address import Address
from postillon.core.envelope import MailParams, RcptParams
from postillon.core.reply import Reply


class NEED_DATA:  # a sentinel class, compared with ``is`` (h11 style)
    """Sentinel: the core needs more bytes from the peer before it can say more."""

    def __init__(self) -> None:
        raise TypeError("NEED_DATA is a sentinel class; do not instantiate it")


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of everything ``next_event()`` returns (except NEED_DATA)."""


@dataclass(frozen=True, slots=True)
class Decision(Event):
    """An event the adapter must answer before the core goes on."""


# --- decision events ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Decision):
    """EHLO, HELO or LHLO with a syntactically valid domain or address literal.

    Answer with ``accept_hello()`` (the core builds the 250 and, for EHLO/LHLO,
    the extension list) or ``reply()`` with an error.
    """

    verb: str
    name: str


@dataclass(frozen=True, slots=True)
class MailFrom(Decision):
    """MAIL FROM, already checked for sequence, syntax, parameters and SIZE.

    ``sender`` is ``None`` for the null reverse path ``<>``.
    """

    sender: Address | None
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptTo(Decision):
    """RCPT TO, already checked for sequence, syntax, parameters and the limit.

    A 2xx answer counts the recipient as accepted. ``<Postmaster>`` arrives as
    ``Address("Postmaster", "")``.
    """

    recipient: Address
    params: RcptParams


@dataclass(frozen=True, slots=True)
class DataRequested(Decision):
    """DATA, or the first BDAT of a transaction; at least one recipient is accepted.

    For DATA answer 354 to go on (the core then reads the body) or an error.
    For BDAT any reply below 400 means go (it is not sent: the core answers the
    chunk itself); an error is sent, the chunk is discarded and the
    transaction ends (RFC 3030 §2), signalled by a ``TransactionReset``.
    """


@dataclass(frozen=True, slots=True)
class StartTlsRequested(Decision):
    """STARTTLS (offered, hello done, no transaction open).

    Answer 220 to go on: the core discards every byte buffered or received
    until ``tls_established()`` (CVE-2011-0411). Or answer 454 4.7.0.
    """


@dataclass(frozen=True, slots=True)
class MessageComplete(Decision):
    """The end of DATA, or of the LAST BDAT chunk, after all ``BodyData``.

    ``size`` is the number of content octets delivered in ``BodyData`` events.
    ``recipients`` is ``None`` in SMTP mode (answer once) and, in LMTP mode,
    the number of accepted recipients: answer once per recipient, in the order
    they were accepted (RFC 2033 §4.2).
    """

    size: int
    recipients: int | None = None


@dataclass(frozen=True, slots=True)
class AuthPassword(Decision):
    """PLAIN or LOGIN gave a username and password (RFC 4954, RFC 4616).

    Check them (a slow hash: off the event loop) and answer ``auth_accept()``
    (235 2.7.0, then ``Authenticated``) or ``reply()`` with 535 5.7.8, 454
    4.7.0 or 421. ``authzid`` is the identity asked to act as ("" = the same).
    """

    mechanism: str
    username: str
    authzid: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthScramLookup(Decision):
    """SCRAM needs ``username``'s stored credentials (RFC 5802 §3).

    Answer ``auth_credentials(creds)``; ``None`` for an unknown user (the
    exchange goes on with made-up values and fails at the proof, so users
    cannot be enumerated). Or ``reply()`` with 454 4.7.0 or 421.
    """

    mechanism: str
    username: str
    authzid: str


@dataclass(frozen=True, slots=True)
class AuthProof(Decision):
    """SCRAM checked the client's proof.

    ``valid``: answer ``auth_accept()`` (the core sends the server signature in
    a 334, waits for the client's empty line, then 235 and ``Authenticated``)
    or ``reply()`` with 535 5.7.8. Not valid: answer ``reply()`` with 535.
    """

    mechanism: str
    username: str
    authzid: str
    valid: bool


# --- information events -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated(Event):
    """The 235 is queued: the connection is authenticated as ``username``."""

    mechanism: str
    username: str
    authzid: str


@dataclass(frozen=True, slots=True)
class AuthAborted(Event):
    """The SASL exchange ended without a verdict: ``*`` (501 5.0.0) or a
    malformed response (501 5.5.2). The core has answered."""

    mechanism: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class BodyData(Event):
    """Message content: DATA dot-unstuffed, CRLF line endings as received.

    For DATA the final ``.CRLF`` is excluded; the CRLF ending the last line is
    included. For BDAT the chunk octets are passed on unchanged.
    """

    data: bytes = field(repr=False)

    def __repr__(self) -> str:
        head = self.data[:40]
        more = f"+{len(self.data) - 40} octets" if len(self.data) > 40 else ""
        return f"BodyData({head!r}{more})"


@dataclass(frozen=True, slots=True)
class MessageAborted(Event):
    """The core refused the body (size, bare CR/LF, NUL) and queued ``reply``.

    The data has been consumed up to the real end marker (or the BDAT count),
    so the session is in sync. Discard the transaction.
    """

    reply: Reply


@dataclass(frozen=True, slots=True)
class TransactionReset(Event):
    """RSET, a new hello, or a refused first BDAT: discard the open transaction."""


@dataclass(frozen=True, slots=True)
class CommandRejected(Event):
    """The core answered a command with an error itself (for the log).

    ``line`` is the command as received, made printable and shortened; AUTH
    credentials are masked.
    """

    reply: Reply
    line: str


@dataclass(frozen=True, slots=True)
class QuitRequested(Event):
    """QUIT: the 221 is queued and ``closing`` is set."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side (EOF). An open transaction or message is abandoned."""


@dataclass(frozen=True, slots=True)
class TooManyErrors(Event):
    """The error limit was reached: the 421 is queued and ``closing`` is set."""
