"""``ClientConnection``: the sans-IO SMTP/LMTP client (RFC 5321, RFC 2033 and extensions).

The adapter's side of the contract, as one session (maddy delivery_target habit):

    conn = ClientConnection("mta.example.org")       # lmtp=True: LHLO, per-recipient replies
    while True:                                      # an adapter helper, "pump":
        event = conn.next_event()
        if event is NEED_DATA:
            send(conn.data_to_send())                # always flush before reading
            conn.receive_data(recv())                # b"" when the server closed
            continue
        ...
    # Greeting(220)        -> conn.hello()
    # HelloAccepted        -> conn.extensions; optionally conn.starttls() / conn.auth(...)
    # StartTlsReply(220)   -> flush, TLS handshake, conn.tls_established(), conn.hello()
    # conn.start_transaction(sender, params, recipients, size=..., eight_bit=...)
    # BodyRequested        -> for each piece: conn.send_body(piece)  (while conn.can_send_body;
    #                         stop early when conn.body_wanted turns False), then
    #                         conn.send_body(last_piece, last=True); flush after each call
    # TransactionDone      -> one final Reply per recipient, in input order
    # conn.quit()          -> CommandReply("QUIT"), then ``closing``

Everything the server sends enters through ``receive_data``; a malformed reply,
a reply out of turn, an overlong line or too many lines become a
:class:`ProtocolViolation` event (the one error type used inside the core,
:class:`ClientProtocolError`, never leaves ``next_event``). Calling a command in
a state that does not allow it is a programming error: ``RuntimeError``; bad
arguments (CR/LF in an address, no recipients): ``ValueError``.

What the core does by itself:

* Multi-line replies (RFC 5321 §4.2.1), enhanced status codes (RFC 2034/3463)
  into ``Reply.status``. Lines may end in CRLF or a bare LF (be liberal in
  what a *server* says; no smuggling risk in replies).
* EHLO, and HELO when EHLO gets a 5xx (RFC 5321 §3.2); LHLO in LMTP.
* The envelope: MAIL FROM with SIZE=, BODY=8BITMIME/BINARYMIME, SMTPUTF8,
  RET/ENVID (DSN), AUTH=; RCPT TO with NOTIFY/ORCPT (DSN) - each only when
  offered. With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go in one
  write and replies are matched in order; without it one command at a time.
* Refusals without sending anything: SMTPUTF8 needed but not offered (550
  5.6.7, RFC 6531 §3.2), SIZE above the server's fixed limit (552 5.3.4,
  RFC 1870 §6.1).
* No accepted recipient: no body. A pipelined DATA then gets its 503/554 (or,
  from a broken server, a 354 answered with an empty message: RFC 2920 §3.1).
  Whenever a transaction fails after MAIL was accepted the core sends RSET and
  reports ``TransactionDone`` once it is answered.
* The body: DATA with streaming dot-stuffing (RFC 5321 §4.5.2) across piece
  boundaries and a final CRLF before ".", or BDAT framing when CHUNKING is
  offered (RFC 3030). Bare CR or LF in the content is rewritten to CRLF
  (RFC 5321 §2.3.8: a client must not send them; a lenient next hop could
  read "\\n.\\r\\n" as the end of data - SMTP smuggling), except for
  BINARYMIME bodies.
* LMTP: one reply per accepted recipient after the end of data (RFC 2033 §4.2).
* STARTTLS: after its 220 every buffered or later plaintext byte is dropped
  until ``tls_established()`` (response injection, CVE-2011-0411 in reverse).
* AUTH PLAIN (initial response, RFC 4616) and LOGIN (334 challenges).
* 421 at any point: the pending command's event carries it, every unanswered
  recipient gets it, ``closing`` is set.
"""

# THE CLIENT'S STATE TABLE IS ``TRANSITIONS`` BELOW: every state change goes through it.

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from postillon.core.envelope import BodyType, MailParams, RcptParams, xtext_encode
from postillon.core.reply import Reply
from postillon.protocol.client_events import (
    AuthReply,
    BodyRequested,
    ChunkReply,
    ClientEvent,
    CommandReply,
    ConnectionClosed,
    Extensions,
    Greeting,
    HelloAccepted,
    HelloRejected,
    MailReply,
    ProtocolViolation,
    RcptReply,
    ServiceClosing,
    StartTlsReply,
    TransactionDone,
)
from postillon.protocol.events import NEED_DATA

__all__ = [
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "NEED_DATA",
    "ClientConnection",
    "ClientProtocolError",
    "ClientState",
]

# RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; real servers send longer
# ones (long EHLO AUTH lists, policy texts), so 4096 including the line end.
MAX_REPLY_LINE = 4096
# Lines per reply: a long EHLO list has ~20, a verbose policy reply a few dozen.
# More is a broken or hostile server holding us in a loop.
MAX_REPLY_LINES = 200

CRLF = b"\r\n"
_CODE = re.compile(rb"[2-5][0-5][0-9]\Z")  # RFC 5321 §4.2.1: second digit 0-5
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|\Z)")
_HELLO_NAME = re.compile(r"[\x21-\x7e]+\Z")
_NOTIFY_ORDER = ("NEVER", "SUCCESS", "FAILURE", "DELAY")

SMTPUTF8_UNSUPPORTED = Reply.of(
    550, "5.6.7", "Non-ASCII address or header, SMTPUTF8 not supported by remote server"
)
LOST = "connection lost before the server answered"
_LOST_REPLY = Reply.of(451, "4.4.2", "Connection lost before the server answered")
_VIOLATION_REPLY = Reply.of(451, "4.5.0", "Malformed or unexpected reply from server")


def size_exceeded(limit: int) -> Reply:
    """The client's own refusal of a message above the server's SIZE (RFC 1870 §6.1)."""
    return Reply.of(
        552, "5.3.4", f"Message size exceeds fixed limit of remote server ({limit} octets)"
    )


class ClientProtocolError(Exception):
    """The server broke the protocol. Raised inside the core only: ``next_event``
    turns it into a :class:`ProtocolViolation` event and closes."""


# --- the state table -------------------------------------------------------------


class ClientState(StrEnum):
    GREETING = "GREETING"  # waiting for the server's greeting
    GREETED = "GREETED"  # 220 received (or TLS established): send hello()
    HELLO = "HELLO"  # EHLO/HELO/LHLO sent
    READY = "READY"  # hello accepted, no transaction: commands may be sent
    COMMAND = "COMMAND"  # RSET or NOOP sent
    STARTTLS = "STARTTLS"  # STARTTLS sent
    TLS = "TLS"  # 220 to STARTTLS: handshake, then tls_established()
    AUTH = "AUTH"  # AUTH exchange in progress
    ENVELOPE = "ENVELOPE"  # MAIL/RCPT(/DATA) sent, replies outstanding
    BODY = "BODY"  # the adapter sends the message (send_body)
    BODY_END = "BODY_END"  # body ended (or failed): final replies outstanding
    QUIT = "QUIT"  # QUIT sent
    REFUSED = "REFUSED"  # greeting or hello refused, or RSET failed: only QUIT
    CLOSED = "CLOSED"  # 221, 421, EOF or protocol violation: close the socket


class _T(StrEnum):
    """Triggers."""

    GREETING_OK = "GREETING_OK"
    GREETING_REFUSED = "GREETING_REFUSED"
    HELLO_SENT = "HELLO_SENT"
    HELLO_OK = "HELLO_OK"
    HELLO_REFUSED = "HELLO_REFUSED"
    COMMAND_SENT = "COMMAND_SENT"  # RSET, NOOP
    COMMAND_DONE = "COMMAND_DONE"
    STARTTLS_SENT = "STARTTLS_SENT"
    STARTTLS_READY = "STARTTLS_READY"
    STARTTLS_REFUSED = "STARTTLS_REFUSED"
    TLS_ESTABLISHED = "TLS_ESTABLISHED"
    AUTH_SENT = "AUTH_SENT"
    AUTH_DONE = "AUTH_DONE"
    MAIL_SENT = "MAIL_SENT"
    BODY_WANTED = "BODY_WANTED"
    BODY_ENDED = "BODY_ENDED"  # last piece sent, or a BDAT chunk refused
    TX_DONE = "TX_DONE"
    TX_BROKEN = "TX_BROKEN"  # the RSET after a failed transaction failed
    QUIT_SENT = "QUIT_SENT"
    CLOSE = "CLOSE"  # 221, 421, EOF, protocol violation: from any state


S = ClientState
TRANSITIONS: dict[tuple[ClientState, _T], ClientState] = {
    (S.GREETING, _T.GREETING_OK): S.GREETED,
    (S.GREETING, _T.GREETING_REFUSED): S.REFUSED,
    (S.GREETED, _T.HELLO_SENT): S.HELLO,
    (S.HELLO, _T.HELLO_OK): S.READY,
    (S.HELLO, _T.HELLO_REFUSED): S.REFUSED,
    (S.READY, _T.COMMAND_SENT): S.COMMAND,
    (S.COMMAND, _T.COMMAND_DONE): S.READY,
    (S.READY, _T.STARTTLS_SENT): S.STARTTLS,
    (S.STARTTLS, _T.STARTTLS_READY): S.TLS,
    (S.STARTTLS, _T.STARTTLS_REFUSED): S.READY,
    (S.TLS, _T.TLS_ESTABLISHED): S.GREETED,
    (S.READY, _T.AUTH_SENT): S.AUTH,
    (S.AUTH, _T.AUTH_DONE): S.READY,
    (S.READY, _T.MAIL_SENT): S.ENVELOPE,
    (S.ENVELOPE, _T.BODY_WANTED): S.BODY,
    (S.ENVELOPE, _T.TX_DONE): S.READY,
    (S.ENVELOPE, _T.TX_BROKEN): S.REFUSED,
    (S.BODY, _T.BODY_ENDED): S.BODY_END,
    (S.BODY_END, _T.TX_DONE): S.READY,
    (S.BODY_END, _T.TX_BROKEN): S.REFUSED,
    (S.GREETED, _T.QUIT_SENT): S.QUIT,
    (S.READY, _T.QUIT_SENT): S.QUIT,
    (S.REFUSED, _T.QUIT_SENT): S.QUIT,
}
# CLOSE leads to CLOSED from every state.


def _transition(state: ClientState, trigger: _T) -> ClientState:
    if trigger is _T.CLOSE:
        return S.CLOSED
    try:
        return TRANSITIONS[state, trigger]
    except KeyError:
        raise RuntimeError(f"not allowed in state {state.value} ({trigger.value})") from None


# --- what each outstanding reply answers ---------------------------------------------


class _K(StrEnum):
    GREETING = "GREETING"
    EHLO = "EHLO"
    HELO = "HELO"
    LHLO = "LHLO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DATA_END = "DATA_END"  # end of data; LMTP: one per accepted recipient
    EMPTY_END = "EMPTY_END"  # "." after a 354 that came with no recipient accepted
    BDAT = "BDAT"
    BDAT_LAST = "BDAT_LAST"  # LMTP: one per accepted recipient
    TX_RSET = "TX_RSET"  # the core's own RSET after a failed transaction
    RSET = "RSET"
    NOOP = "NOOP"
    QUIT = "QUIT"


_TX_KINDS = frozenset(
    {_K.MAIL, _K.RCPT, _K.DATA, _K.DATA_END, _K.EMPTY_END, _K.BDAT, _K.BDAT_LAST, _K.TX_RSET}
)


@dataclass(slots=True)
class _Transaction:
    """One mail transaction (OpenSMTPD smtp_tx): MAIL to the last final reply."""

    count: int
    pipelined: bool
    bdat: bool
    binary: bool
    to_send: deque[bytes]  # RCPT lines still to send one by one (no PIPELINING)
    mail_reply: Reply | None = None
    final: list[Reply | None] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)  # indices, in acceptance order
    failure: Reply | None = None  # what ended it early (MAIL, DATA, a BDAT chunk)
    lmtp_next: int = 0  # next accepted recipient to get an LMTP end-of-data reply
    outstanding_chunks: int = 0
    deferred_last: bytes | None = None  # LMTP: LAST chunk waiting for earlier chunk replies
    data_pipelined: bool = False

    @property
    def mail_ok(self) -> bool:
        return self.mail_reply is not None and self.mail_reply.code < 400

    def result(self, fallback: Reply) -> tuple[Reply, ...]:
        return tuple(r if r is not None else fallback for r in self.final)


class _BodyEncoder:
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


def _b64(data: bytes) -> str:
    """Base64 (RFC 4648 §4) for SASL; the protocol core imports no codec modules."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = bytearray()
    full = len(data) - len(data) % 3
    for i in range(0, full, 3):
        n = int.from_bytes(data[i : i + 3], "big")
        out += bytes(
            (alphabet[n >> 18], alphabet[n >> 12 & 63], alphabet[n >> 6 & 63], alphabet[n & 63])
        )
    rest = len(data) - full
    if rest:
        n = int.from_bytes(data[full:] + b"\0" * (3 - rest), "big")
        quad = bytes((alphabet[n >> 18], alphabet[n >> 12 & 63], alphabet[n >> 6 & 63]))
        out += quad[: rest + 1] + b"=" * (3 - rest)
    return out.decode("ascii")


def _check_text(what: str, text: str) -> None:
    if any(c in text for c in "\r\n\x00"):
        raise ValueError(f"{what} must not contain CR, LF or NUL: {text!r}")


def _path(address: str) -> str:
    _check_text("address", address)
    return f"<{address}>"


def _parse_line(line: bytes) -> tuple[int, bool, str]:
    """(code, is_last, text) of one reply line (RFC 5321 §4.2: Reply-line)."""
    if not _CODE.match(line[:3]):
        raise ClientProtocolError(f"malformed reply line {_show(line)}")
    sep = line[3:4]
    if sep not in (b"", b" ", b"-"):
        raise ClientProtocolError(f"malformed reply line {_show(line)}")
    text = line[4:].decode("utf-8", "replace")
    if "\r" in text or "\x00" in text:
        text = text.replace("\r", "?").replace("\x00", "?")
    return int(line[:3]), sep != b"-", text


def _show(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")


def _make_reply(code: int, texts: list[str]) -> Reply:
    """Split the enhanced status code (RFC 2034) off the lines that carry it."""
    status: str | None = None
    m = _STATUS.match(texts[0])
    if m is not None and m.group(1) == str(code)[0]:
        status = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    if status is None:
        return Reply(code, None, tuple(texts))
    lines = []
    for text in texts:
        m = _STATUS.match(text)
        if m is not None and f"{m.group(1)}.{m.group(2)}.{m.group(3)}" == status:
            text = text[m.end() :]
        lines.append(text)
    return Reply(code, status, tuple(lines))


class ClientConnection:
    """The client side of one SMTP or LMTP connection, without I/O.

    Read-only views: ``state`` (a :class:`ClientState`), ``closing`` (close the
    socket after flushing), ``extensions`` (of the last accepted hello),
    ``esmtp`` (EHLO/LHLO accepted, not HELO), ``body_wanted``,
    ``can_send_body``, ``pending_replies``, ``body_octets`` (sent for the
    current or last message, after stuffing/framing).
    """

    def __init__(
        self,
        helo_name: str,
        *,
        lmtp: bool = False,
        use_pipelining: bool = True,
        use_chunking: bool = True,
    ) -> None:
        if not _HELLO_NAME.match(helo_name):
            raise ValueError(f"invalid hello name {helo_name!r}")
        self.helo_name = helo_name
        self.lmtp = lmtp
        self.use_pipelining = use_pipelining  # off: never pipeline even if offered
        self.use_chunking = use_chunking  # off: DATA even if CHUNKING is offered
        self._state = S.GREETING
        self._in = bytearray()
        self._out = bytearray()
        self._events: deque[ClientEvent] = deque()
        self._expect: deque[tuple[_K, int]] = deque([(_K.GREETING, 0)])
        self._lines: list[str] = []  # the lines of the reply being read
        self._code = 0
        self._eof = False
        self._extensions = Extensions()
        self._esmtp = False
        self._authenticated = False
        self._tx: _Transaction | None = None
        self._encoder: _BodyEncoder | None = None
        self._auth_steps: deque[str] = deque()
        self._body_octets = 0

    # --- read-only views -----------------------------------------------------------

    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def closing(self) -> bool:
        return self._state is S.CLOSED

    @property
    def extensions(self) -> Extensions:
        return self._extensions

    @property
    def esmtp(self) -> bool:
        return self._esmtp

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def body_wanted(self) -> bool:
        """The transaction waits for (more of) the body."""
        return self._state is S.BODY

    @property
    def can_send_body(self) -> bool:
        """``send_body`` may be called now: without PIPELINING a BDAT chunk's
        reply must arrive before the next chunk (RFC 3030 §4.2)."""
        tx = self._tx
        if self._state is not S.BODY or tx is None:
            return False
        return not tx.bdat or tx.pipelined or tx.outstanding_chunks == 0

    @property
    def pending_replies(self) -> int:
        """Replies still expected (for an adapter that bounds pipelined BDAT chunks)."""
        return len(self._expect)

    @property
    def body_octets(self) -> int:
        return self._body_octets

    # --- bytes in and out ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` means it closed its side."""
        if self._eof:
            if data:
                raise RuntimeError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
        elif self._state not in (S.TLS, S.CLOSED):  # after 220 to STARTTLS: dropped
            self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> ClientEvent | type[NEED_DATA]:
        while not self._events and self._state is not S.CLOSED:
            try:
                reply = self._read_reply()
            except ClientProtocolError as exc:
                self._broken(str(exc), _VIOLATION_REPLY, ProtocolViolation(str(exc)))
                break
            if reply is None:
                if self._eof:
                    self._lost()
                break
            try:
                self._on_reply(reply)
            except ClientProtocolError as exc:
                self._broken(str(exc), _VIOLATION_REPLY, ProtocolViolation(str(exc)))
        if self._events:
            return self._events.popleft()
        return NEED_DATA

    # --- commands ----------------------------------------------------------------------

    def hello(self) -> None:
        """EHLO (LHLO in LMTP); HELO follows by itself if EHLO gets a 5xx."""
        self._state = _transition(self._state, _T.HELLO_SENT)
        verb = "LHLO" if self.lmtp else "EHLO"
        self._command(f"{verb} {self.helo_name}", _K(verb))

    def starttls(self) -> None:
        self._state = _transition(self._state, _T.STARTTLS_SENT)
        self._command("STARTTLS", _K.STARTTLS)

    def tls_established(self) -> None:
        """The handshake after a 220 to STARTTLS succeeded: hello() again (RFC 3207 §4.2)."""
        self._state = _transition(self._state, _T.TLS_ESTABLISHED)
        self._in.clear()
        self._extensions = Extensions()
        self._esmtp = False
        self._authenticated = False

    def auth(self, mechanism: str, username: str, password: str) -> None:
        """AUTH PLAIN (RFC 4616, initial response) or AUTH LOGIN; answered by AuthReply."""
        mechanism = mechanism.upper()
        if mechanism not in ("PLAIN", "LOGIN"):
            raise ValueError(f"unsupported SASL mechanism {mechanism!r}")
        if "\x00" in username or "\x00" in password:
            raise ValueError("NUL in credentials")
        self._state = _transition(self._state, _T.AUTH_SENT)
        user, pw = username.encode("utf-8"), password.encode("utf-8")
        if mechanism == "PLAIN":
            self._auth_steps = deque()
            self._command("AUTH PLAIN " + _b64(b"\0" + user + b"\0" + pw), _K.AUTH)
        else:
            self._auth_steps = deque([_b64(user), _b64(pw)])
            self._command("AUTH LOGIN", _K.AUTH)

    def rset(self) -> None:
        self._state = _transition(self._state, _T.COMMAND_SENT)
        self._command("RSET", _K.RSET)

    def noop(self) -> None:
        self._state = _transition(self._state, _T.COMMAND_SENT)
        self._command("NOOP", _K.NOOP)

    def quit(self) -> None:
        self._state = _transition(self._state, _T.QUIT_SENT)
        self._command("QUIT", _K.QUIT)

    def start_transaction(
        self,
        sender: str,
        params: MailParams,
        recipients: Sequence[tuple[str, RcptParams]],
        *,
        size: int = 0,
        eight_bit: bool = False,
        needs_smtputf8: bool = False,
    ) -> None:
        """MAIL FROM and every RCPT TO (and DATA, pipelined when possible).

        ``sender`` is "" for the null reverse path. ``size`` is the message size
        in octets (0: unknown). ``eight_bit``: the content has octets above 127.
        ``needs_smtputf8``: a header needs SMTPUTF8 (non-ASCII addresses are
        detected here). Answered by MailReply, RcptReply..., then BodyRequested
        and/or TransactionDone.
        """
        if self._state is not S.READY:
            raise RuntimeError(f"start_transaction() not allowed in state {self._state.value}")
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        ext = self._extensions
        mail = f"MAIL FROM:{_path(sender)}" if sender else "MAIL FROM:<>"
        rcpt_paths = [_path(addr) for addr, _ in recipients]
        count = len(recipients)
        if needs_smtputf8 or not sender.isascii() or not all(p.isascii() for p in rcpt_paths):
            if "SMTPUTF8" not in ext:  # RFC 6531 §3.2: never downgrade silently
                self._events.append(TransactionDone(None, (SMTPUTF8_UNSUPPORTED,) * count))
                return
            mail += " SMTPUTF8"
        limit = ext.size
        if limit and size > limit:
            self._events.append(TransactionDone(None, (size_exceeded(limit),) * count))
            return
        if limit is not None and size > 0:
            mail += f" SIZE={size}"
        chunking = "CHUNKING" in ext and self.use_chunking
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
        if self._authenticated and params.auth is not None:
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
        pipelined = self.use_pipelining and "PIPELINING" in ext
        tx = _Transaction(
            count=count,
            pipelined=pipelined,
            bdat=chunking,
            binary=binary,
            to_send=deque(),
            final=[None] * count,
        )
        self._tx = tx
        self._body_octets = 0
        self._state = _transition(self._state, _T.MAIL_SENT)
        self._command(mail, _K.MAIL)
        if pipelined:
            for i, line_bytes in enumerate(rcpt_lines):
                self._out += line_bytes
                self._expect.append((_K.RCPT, i))
            if not chunking:
                tx.data_pipelined = True
                self._command("DATA", _K.DATA)
        else:
            tx.to_send.extend(rcpt_lines)

    def send_body(self, data: bytes, *, last: bool = False) -> None:
        """A piece of the message; ``last=True`` with the final piece (which may be b"").

        DATA: dot-stuffed, and ended with CRLF "." CRLF. BDAT: one chunk per
        non-empty piece, ``BDAT n LAST`` for the final one. Call only while
        ``can_send_body``; when ``body_wanted`` turns False (a chunk was
        refused, or the server answered early) stop and wait for TransactionDone.
        """
        tx = self._tx
        if not self.can_send_body or tx is None or self._encoder is None:
            raise RuntimeError(f"send_body() not allowed now (state {self._state.value})")
        content = self._encoder.encode(data, last)
        if not tx.bdat:
            self._out += content
            self._body_octets += len(content)
            if last:
                self._end_body()
                for _ in tx.accepted if self.lmtp else (0,):
                    self._expect.append((_K.DATA_END, 0))
            return
        if last:
            self._end_body()
            frame = f"BDAT {len(content)} LAST\r\n".encode("ascii") + content
            if self.lmtp and tx.outstanding_chunks:
                # LMTP answers LAST once per recipient, but a refused chunk may have
                # ended the transaction: wait for the earlier answers first.
                tx.deferred_last = frame
            else:
                self._send_last(frame)
        elif content:
            head = f"BDAT {len(content)}\r\n".encode("ascii")
            self._out += head
            self._out += content
            self._body_octets += len(head) + len(content)
            tx.outstanding_chunks += 1
            self._expect.append((_K.BDAT, 0))

    # --- internals: output ------------------------------------------------------------

    def _command(self, line: str, kind: _K) -> None:
        self._out += line.encode("utf-8") + CRLF
        self._expect.append((kind, 0))

    def _end_body(self) -> None:
        self._state = _transition(self._state, _T.BODY_ENDED)
        self._encoder = None

    def _send_last(self, frame: bytes) -> None:
        tx = self._tx
        assert tx is not None
        self._out += frame
        self._body_octets += len(frame)
        for _ in tx.accepted if self.lmtp else (0,):
            self._expect.append((_K.BDAT_LAST, 0))

    # --- internals: reading replies ---------------------------------------------------

    def _read_reply(self) -> Reply | None:
        """One complete reply from the buffer, or None if more bytes are needed."""
        buf = self._in
        while True:
            i = buf.find(b"\n", 0, MAX_REPLY_LINE)
            if i < 0:
                if len(buf) >= MAX_REPLY_LINE:
                    raise ClientProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
                return None
            line = bytes(buf[:i])
            del buf[: i + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            code, is_last, text = _parse_line(line)
            if self._lines and code != self._code:
                raise ClientProtocolError(f"reply code changed within a reply: {_show(line)}")
            self._code = code
            self._lines.append(text)
            if is_last:
                texts, self._lines = self._lines, []
                return _make_reply(code, texts)
            if len(self._lines) >= MAX_REPLY_LINES:
                raise ClientProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")

    def _on_reply(self, reply: Reply) -> None:
        if not self._expect:
            self._unsolicited(reply)
            return
        kind, index = self._expect.popleft()
        if reply.code == 421 and kind is not _K.QUIT:
            self._service_closing(reply, kind)
            return
        _HANDLERS[kind](self, reply, index)

    def _unsolicited(self, reply: Reply) -> None:
        tx = self._tx
        if reply.code == 421:
            self._service_closing(reply, None)
        elif self._state is S.BODY and tx is not None and not tx.bdat and reply.code >= 400:
            # The server gave up on the DATA body (e.g. a size limit) and answered
            # early; it no longer reads in step with us, so the connection ends.
            self._close()
            for i in tx.accepted:
                tx.final[i] = reply
            self._finish(reply)
        else:
            raise ClientProtocolError(f"unexpected reply in state {self._state.value}: {reply}")

    def _service_closing(self, reply: Reply, kind: _K | None) -> None:
        """421 (RFC 5321 §3.8): report it for the pending command, then close."""
        tx = self._tx
        self._close()
        if kind is None or (kind is _K.TX_RSET):
            if tx is not None:
                self._finish(tx.failure or reply)
            self._events.append(ServiceClosing(reply))
        elif kind in _TX_KINDS:
            assert tx is not None
            if kind is _K.MAIL:
                tx.mail_reply = reply
            self._finish(reply)
        elif kind is _K.GREETING:
            self._events.append(Greeting(reply))
        elif kind in (_K.EHLO, _K.HELO, _K.LHLO):
            self._events.append(HelloRejected(reply))
        elif kind is _K.STARTTLS:
            self._events.append(StartTlsReply(reply))
        elif kind is _K.AUTH:
            self._events.append(AuthReply(reply))
        else:
            self._events.append(CommandReply(kind.value, reply))

    def _lost(self) -> None:
        detail = "EOF"
        if self._in or self._lines:
            detail = "EOF inside a reply"
        elif self._expect:
            detail = f"EOF while waiting for the reply to {self._expect[0][0].value}"
        elif self._state is S.BODY:
            detail = "EOF while sending the message"
        self._broken(detail, _LOST_REPLY, ConnectionClosed(detail))

    def _broken(self, detail: str, reply: Reply, event: ClientEvent) -> None:
        tx = self._tx
        self._close()
        if tx is not None:
            self._finish(reply, interrupted=detail)
        self._events.append(event)

    def _close(self) -> None:
        self._state = _transition(self._state, _T.CLOSE)
        self._in.clear()
        self._lines = []
        self._expect.clear()
        self._encoder = None

    # --- internals: reply handlers ----------------------------------------------------

    def _on_greeting(self, reply: Reply, _: int) -> None:
        ok = reply.code == 220
        self._state = _transition(self._state, _T.GREETING_OK if ok else _T.GREETING_REFUSED)
        self._events.append(Greeting(reply))

    def _on_hello(self, reply: Reply, _: int, verb: str) -> None:
        if reply.code < 300:
            self._state = _transition(self._state, _T.HELLO_OK)
            self._esmtp = verb != "HELO"
            self._extensions = Extensions.parse_ehlo(reply.lines) if self._esmtp else Extensions()
            self._events.append(HelloAccepted(verb, reply, self._extensions))
        elif verb == "EHLO" and reply.code >= 500:  # RFC 5321 §3.2: fall back to HELO
            self._command(f"HELO {self.helo_name}", _K.HELO)
        else:
            self._state = _transition(self._state, _T.HELLO_REFUSED)
            self._events.append(HelloRejected(reply))

    def _on_ehlo(self, reply: Reply, i: int) -> None:
        self._on_hello(reply, i, "EHLO")

    def _on_helo(self, reply: Reply, i: int) -> None:
        self._on_hello(reply, i, "HELO")

    def _on_lhlo(self, reply: Reply, i: int) -> None:
        self._on_hello(reply, i, "LHLO")

    def _on_starttls(self, reply: Reply, _: int) -> None:
        if reply.code == 220:
            self._state = _transition(self._state, _T.STARTTLS_READY)
            self._in.clear()  # plaintext after the 220 is an injection attempt
            self._lines = []
        else:
            self._state = _transition(self._state, _T.STARTTLS_REFUSED)
        self._events.append(StartTlsReply(reply))

    def _on_auth(self, reply: Reply, _: int) -> None:
        if reply.code == 334:
            # LOGIN: username, then password; anything unexpected: "*" cancels (RFC 4954 §4).
            step = self._auth_steps.popleft() if self._auth_steps else "*"
            self._command(step, _K.AUTH)
            return
        if 300 <= reply.code < 400:
            raise ClientProtocolError(f"unexpected reply to AUTH: {reply}")
        self._auth_steps.clear()
        self._authenticated = reply.code < 300
        self._state = _transition(self._state, _T.AUTH_DONE)
        self._events.append(AuthReply(reply))

    def _on_simple(self, reply: Reply, kind: _K) -> None:
        if kind is _K.QUIT:
            self._close()
        else:
            self._state = _transition(self._state, _T.COMMAND_DONE)
        self._events.append(CommandReply(kind.value, reply))

    def _on_rset(self, reply: Reply, _: int) -> None:
        self._on_simple(reply, _K.RSET)

    def _on_noop(self, reply: Reply, _: int) -> None:
        self._on_simple(reply, _K.NOOP)

    def _on_quit(self, reply: Reply, _: int) -> None:
        self._on_simple(reply, _K.QUIT)

    def _on_mail(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        tx.mail_reply = reply
        self._events.append(MailReply(reply))
        if reply.code >= 400:
            tx.failure = reply
            if not tx.pipelined:
                self._finish(reply)  # nothing else was sent
        elif reply.code >= 300:
            raise ClientProtocolError(f"unexpected reply to MAIL: {reply}")
        elif tx.to_send:
            self._send_next_rcpt()

    def _send_next_rcpt(self) -> None:
        """Without PIPELINING: the next RCPT once the previous command is answered."""
        tx = self._tx
        assert tx is not None
        self._out += tx.to_send.popleft()
        self._expect.append((_K.RCPT, tx.count - len(tx.to_send) - 1))

    def _on_rcpt(self, reply: Reply, index: int) -> None:
        tx = self._tx
        assert tx is not None
        if 300 <= reply.code < 400:
            raise ClientProtocolError(f"unexpected reply to RCPT: {reply}")
        self._events.append(RcptReply(index, reply))
        if not tx.mail_ok:
            pass  # MAIL was refused: its reply is every recipient's (see _finish)
        elif reply.code < 300:
            tx.accepted.append(index)
        else:
            tx.final[index] = reply
        if tx.to_send:
            self._send_next_rcpt()
        elif index == tx.count - 1 and not tx.data_pipelined:
            self._envelope_done()

    def _envelope_done(self) -> None:
        """Every RCPT is answered and DATA was not pipelined."""
        tx = self._tx
        assert tx is not None
        if tx.failure is not None:  # MAIL refused (pipelined)
            self._finish(tx.failure)
        elif not tx.accepted:
            self._finish_with_rset(None)
        elif tx.bdat:
            self._want_body(None)
        else:
            self._command("DATA", _K.DATA)

    def _on_data(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        if tx.failure is not None:  # MAIL refused: this is its 503 (or worse)
            if reply.code == 354:
                self._command_raw(b".\r\n", _K.EMPTY_END)
                return
            self._finish(tx.failure)
        elif reply.code == 354:
            if tx.accepted:
                self._want_body(reply)
            else:  # RFC 2920 §3.1: a 354 despite no recipient; send an empty message
                self._command_raw(b".\r\n", _K.EMPTY_END)
        elif reply.code >= 400:
            tx.failure = reply
            self._finish_with_rset(reply)
        else:
            raise ClientProtocolError(f"unexpected reply to DATA: {reply}")

    def _on_empty_end(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        self._finish(tx.failure or reply)

    def _want_body(self, reply: Reply | None) -> None:
        tx = self._tx
        assert tx is not None
        self._encoder = _BodyEncoder(stuff=not tx.bdat, fix_line_endings=not tx.binary)
        self._state = _transition(self._state, _T.BODY_WANTED)
        self._events.append(BodyRequested(reply))

    def _on_message_reply(self, reply: Reply) -> None:
        """The reply to the end of data (SMTP), or one of the per-recipient ones (LMTP)."""
        tx = self._tx
        assert tx is not None
        if 300 <= reply.code < 400:
            raise ClientProtocolError(f"unexpected reply to the end of data: {reply}")
        if self.lmtp:
            tx.final[tx.accepted[tx.lmtp_next]] = reply
            tx.lmtp_next += 1
            if tx.lmtp_next < len(tx.accepted):
                return
        else:
            for i in tx.accepted:
                tx.final[i] = reply
        self._finish(reply)

    def _on_data_end(self, reply: Reply, _: int) -> None:
        self._on_message_reply(reply)

    def _on_bdat(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        tx.outstanding_chunks -= 1
        self._events.append(ChunkReply(reply))
        if reply.code >= 300 and tx.failure is None:
            # RFC 3030 §3: a refused chunk fails the transaction; no more chunks.
            tx.failure = reply
            if self._state is S.BODY:
                self._end_body()
        if tx.outstanding_chunks:
            return
        if tx.failure is not None:
            tx.deferred_last = None
            if not any(k is _K.BDAT_LAST for k, _ in self._expect) and self._state is S.BODY_END:
                self._finish_with_rset(tx.failure)
        elif tx.deferred_last is not None:
            frame, tx.deferred_last = tx.deferred_last, None
            self._send_last(frame)

    def _on_bdat_last(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        if tx.failure is not None:  # a chunk was refused; this LAST only confirms it
            self._finish_with_rset(tx.failure)
        else:
            self._on_message_reply(reply)

    def _on_tx_rset(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        if reply.code >= 400:  # the server is in an unknown state: only QUIT now
            self._finish(tx.failure or reply, broken=True)
        else:
            self._finish(tx.failure or reply)

    # --- internals: ending a transaction -----------------------------------------------

    def _command_raw(self, data: bytes, kind: _K) -> None:
        self._out += data
        self._expect.append((kind, 0))

    def _finish_with_rset(self, failure: Reply | None) -> None:
        """A transaction failed after MAIL was accepted: RSET, then TransactionDone."""
        tx = self._tx
        assert tx is not None
        if failure is not None:
            tx.failure = failure
        elif tx.failure is None:
            tx.failure = next((r for r in tx.final if r is not None), None)
        if tx.mail_ok:
            self._command("RSET", _K.TX_RSET)
        else:
            self._finish(tx.failure or _LOST_REPLY)

    def _finish(self, fallback: Reply, *, interrupted: str = "", broken: bool = False) -> None:
        tx = self._tx
        assert tx is not None
        self._tx = None
        self._encoder = None
        self._events.append(TransactionDone(tx.mail_reply, tx.result(fallback), interrupted))
        if self._state is not S.CLOSED:
            self._state = _transition(self._state, _T.TX_BROKEN if broken else _T.TX_DONE)


_HANDLERS: dict[_K, Callable[[ClientConnection, Reply, int], None]] = {
    _K.GREETING: ClientConnection._on_greeting,
    _K.EHLO: ClientConnection._on_ehlo,
    _K.HELO: ClientConnection._on_helo,
    _K.LHLO: ClientConnection._on_lhlo,
    _K.STARTTLS: ClientConnection._on_starttls,
    _K.AUTH: ClientConnection._on_auth,
    _K.MAIL: ClientConnection._on_mail,
    _K.RCPT: ClientConnection._on_rcpt,
    _K.DATA: ClientConnection._on_data,
    _K.DATA_END: ClientConnection._on_data_end,
    _K.EMPTY_END: ClientConnection._on_empty_end,
    _K.BDAT: ClientConnection._on_bdat,
    _K.BDAT_LAST: ClientConnection._on_bdat_last,
    _K.TX_RSET: ClientConnection._on_tx_rset,
    _K.RSET: ClientConnection._on_rset,
    _K.NOOP: ClientConnection._on_noop,
    _K.QUIT: ClientConnection._on_quit,
}
