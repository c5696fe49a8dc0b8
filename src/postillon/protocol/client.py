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
  RET/ENVID (DSN), AUTH=, REQUIRETLS; RCPT TO with NOTIFY/ORCPT (DSN) - each only when
  offered. With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go in one
  write and replies are matched in order; without it one command at a time.
* Refusals without sending anything: SMTPUTF8 needed but not offered (550
  5.6.7, RFC 6531 §3.2: a non-ASCII local part; a U-label domain goes as its
  A-label, and the SMTPUTF8 flag alone is no need), REQUIRETLS needed but not offered (550 5.7.30,
  RFC 8689 §4.2.1; with it, MAIL carries REQUIRETLS), SIZE above the
  server's fixed limit (552 5.3.4, RFC 1870 §6.1).
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

# THE CLIENT'S STATE TABLE IS ``TRANSITIONS`` IN ``_client_state.py``: every state change goes
# through ``transition()``.

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence

from postillon.core.envelope import MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.protocol._client_state import TX_EXPECTS, ClientState, Expect, Trigger, transition
from postillon.protocol._client_transaction import LOST_REPLY, Transaction, TransactionReplies
from postillon.protocol._reply_reader import MAX_REPLY_LINE, MAX_REPLY_LINES, ReplyReader
from postillon.protocol._writers import BodyEncoder, envelope_commands
from postillon.protocol.client_events import (
    AuthReply,
    ClientEvent,
    CommandReply,
    ConnectionClosed,
    Extensions,
    Greeting,
    HelloAccepted,
    HelloRejected,
    ProtocolViolation,
    ServiceClosing,
    StartTlsReply,
    TransactionDone,
)
from postillon.protocol.errors import ClientProtocolError
from postillon.protocol.events import NEED_DATA
from postillon.protocol.sasl import b64encode

__all__ = [
    "MAX_REPLY_LINE",
    "MAX_REPLY_LINES",
    "NEED_DATA",
    "ClientConnection",
    "ClientProtocolError",
    "ClientState",
]

_HELLO_NAME = re.compile(r"[\x21-\x7e]+\Z")

LOST = "connection lost before the server answered"
_VIOLATION_REPLY = Reply.of(451, "4.5.0", "Malformed or unexpected reply from server")

S = ClientState


class ClientConnection(TransactionReplies):
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
        self._expect: deque[tuple[Expect, int]] = deque([(Expect.GREETING, 0)])
        self._replies = ReplyReader()
        self._eof = False
        self._extensions = Extensions()
        self._esmtp = False
        self._authenticated = False
        self._tx: Transaction | None = None
        self._encoder: BodyEncoder | None = None
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
                reply = self._replies.read(self._in)
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
        self._state = transition(self._state, Trigger.HELLO_SENT)
        verb = "LHLO" if self.lmtp else "EHLO"
        self._command(f"{verb} {self.helo_name}", Expect(verb))

    def starttls(self) -> None:
        self._state = transition(self._state, Trigger.STARTTLS_SENT)
        self._command("STARTTLS", Expect.STARTTLS)

    def tls_established(self) -> None:
        """The handshake after a 220 to STARTTLS succeeded: hello() again (RFC 3207 §4.2)."""
        self._state = transition(self._state, Trigger.TLS_ESTABLISHED)
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
        self._state = transition(self._state, Trigger.AUTH_SENT)
        user, pw = username.encode("utf-8"), password.encode("utf-8")
        if mechanism == "PLAIN":
            self._auth_steps = deque()
            self._command("AUTH PLAIN " + b64encode(b"\0" + user + b"\0" + pw), Expect.AUTH)
        else:
            self._auth_steps = deque([b64encode(user), b64encode(pw)])
            self._command("AUTH LOGIN", Expect.AUTH)

    def rset(self) -> None:
        self._state = transition(self._state, Trigger.COMMAND_SENT)
        self._command("RSET", Expect.RSET)

    def noop(self) -> None:
        self._state = transition(self._state, Trigger.COMMAND_SENT)
        self._command("NOOP", Expect.NOOP)

    def quit(self) -> None:
        self._state = transition(self._state, Trigger.QUIT_SENT)
        self._command("QUIT", Expect.QUIT)

    def start_transaction(
        self,
        sender: str,
        params: MailParams,
        recipients: Sequence[tuple[str, RcptParams]],
        *,
        size: int = 0,
        eight_bit: bool = False,
        needs_smtputf8: bool = False,
        smtputf8: bool = False,
    ) -> None:
        """MAIL FROM and every RCPT TO (and DATA, pipelined when possible).

        ``sender`` is "" for the null reverse path. ``size`` is the message size
        in octets (0: unknown). ``eight_bit``: the content has octets above 127.
        ``needs_smtputf8``: a header needs SMTPUTF8 (non-ASCII addresses are
        detected here); ``smtputf8``: the message carries the flag, said where
        offered (elsewhere the addresses go in ASCII when they can: A-labels).
        Answered by MailReply, RcptReply..., then BodyRequested and/or
        TransactionDone.
        """
        if self._state is not S.READY:
            raise RuntimeError(f"start_transaction() not allowed in state {self._state.value}")
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        ext = self._extensions
        count = len(recipients)
        env = envelope_commands(
            sender,
            params,
            recipients,
            ext,
            size=size,
            eight_bit=eight_bit,
            needs_smtputf8=needs_smtputf8,
            smtputf8=smtputf8,
            use_chunking=self.use_chunking,
            authenticated=self._authenticated,
        )
        if isinstance(env, Reply):  # the client's own refusal: nothing is sent
            self._events.append(TransactionDone(None, (env,) * count))
            return
        chunking = env.chunking
        pipelined = self.use_pipelining and "PIPELINING" in ext
        tx = Transaction(
            count=count,
            pipelined=pipelined,
            bdat=chunking,
            binary=env.binary,
            to_send=deque(),
            final=[None] * count,
        )
        self._tx = tx
        self._body_octets = 0
        self._state = transition(self._state, Trigger.MAIL_SENT)
        self._command(env.mail, Expect.MAIL)
        if pipelined:
            for i, line_bytes in enumerate(env.rcpts):
                self._out += line_bytes
                self._expect.append((Expect.RCPT, i))
            if not chunking:
                tx.data_pipelined = True
                self._command("DATA", Expect.DATA)
        else:
            tx.to_send.extend(env.rcpts)

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
                    self._expect.append((Expect.DATA_END, 0))
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
            self._expect.append((Expect.BDAT, 0))

    # --- internals: reading replies ---------------------------------------------------

    def _on_reply(self, reply: Reply) -> None:
        if not self._expect:
            self._unsolicited(reply)
            return
        kind, index = self._expect.popleft()
        if reply.code == 421 and kind is not Expect.QUIT:
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

    def _service_closing(self, reply: Reply, kind: Expect | None) -> None:
        """421 (RFC 5321 §3.8): report it for the pending command, then close."""
        tx = self._tx
        self._close()
        if kind is None or (kind is Expect.TX_RSET):
            if tx is not None:
                self._finish(tx.failure or reply)
            self._events.append(ServiceClosing(reply))
        elif kind in TX_EXPECTS:
            assert tx is not None
            if kind is Expect.MAIL:
                tx.mail_reply = reply
            self._finish(reply)
        elif kind is Expect.GREETING:
            self._events.append(Greeting(reply))
        elif kind in (Expect.EHLO, Expect.HELO, Expect.LHLO):
            self._events.append(HelloRejected(reply))
        elif kind is Expect.STARTTLS:
            self._events.append(StartTlsReply(reply))
        elif kind is Expect.AUTH:
            self._events.append(AuthReply(reply))
        else:
            self._events.append(CommandReply(kind.value, reply))

    def _lost(self) -> None:
        detail = "EOF"
        if self._in or self._replies.partial:
            detail = "EOF inside a reply"
        elif self._expect:
            detail = f"EOF while waiting for the reply to {self._expect[0][0].value}"
        elif self._state is S.BODY:
            detail = "EOF while sending the message"
        self._broken(detail, LOST_REPLY, ConnectionClosed(detail))

    def _broken(self, detail: str, reply: Reply, event: ClientEvent) -> None:
        tx = self._tx
        self._close()
        if tx is not None:
            self._finish(reply, interrupted=detail)
        self._events.append(event)

    def _close(self) -> None:
        self._state = transition(self._state, Trigger.CLOSE)
        self._in.clear()
        self._replies.reset()
        self._expect.clear()
        self._encoder = None

    # --- internals: reply handlers ----------------------------------------------------

    def _on_greeting(self, reply: Reply, _: int) -> None:
        ok = reply.code == 220
        self._state = transition(
            self._state, Trigger.GREETING_OK if ok else Trigger.GREETING_REFUSED
        )
        self._events.append(Greeting(reply))

    def _on_hello(self, reply: Reply, _: int, verb: str) -> None:
        if reply.code < 300:
            self._state = transition(self._state, Trigger.HELLO_OK)
            self._esmtp = verb != "HELO"
            self._extensions = Extensions.parse_ehlo(reply.lines) if self._esmtp else Extensions()
            self._events.append(HelloAccepted(verb, reply, self._extensions))
        elif verb == "EHLO" and reply.code >= 500:  # RFC 5321 §3.2: fall back to HELO
            self._command(f"HELO {self.helo_name}", Expect.HELO)
        else:
            self._state = transition(self._state, Trigger.HELLO_REFUSED)
            self._events.append(HelloRejected(reply))

    def _on_ehlo(self, reply: Reply, i: int) -> None:
        self._on_hello(reply, i, "EHLO")

    def _on_helo(self, reply: Reply, i: int) -> None:
        self._on_hello(reply, i, "HELO")

    def _on_lhlo(self, reply: Reply, i: int) -> None:
        self._on_hello(reply, i, "LHLO")

    def _on_starttls(self, reply: Reply, _: int) -> None:
        if reply.code == 220:
            self._state = transition(self._state, Trigger.STARTTLS_READY)
            self._in.clear()  # plaintext after the 220 is an injection attempt
            self._replies.reset()
        else:
            self._state = transition(self._state, Trigger.STARTTLS_REFUSED)
        self._events.append(StartTlsReply(reply))

    def _on_auth(self, reply: Reply, _: int) -> None:
        if reply.code == 334:
            # LOGIN: username, then password; anything unexpected: "*" cancels (RFC 4954 §4).
            step = self._auth_steps.popleft() if self._auth_steps else "*"
            self._command(step, Expect.AUTH)
            return
        if 300 <= reply.code < 400:
            raise ClientProtocolError(f"unexpected reply to AUTH: {reply}")
        self._auth_steps.clear()
        self._authenticated = reply.code < 300
        self._state = transition(self._state, Trigger.AUTH_DONE)
        self._events.append(AuthReply(reply))

    def _on_simple(self, reply: Reply, kind: Expect) -> None:
        if kind is Expect.QUIT:
            self._close()
        else:
            self._state = transition(self._state, Trigger.COMMAND_DONE)
        self._events.append(CommandReply(kind.value, reply))

    def _on_rset(self, reply: Reply, _: int) -> None:
        self._on_simple(reply, Expect.RSET)

    def _on_noop(self, reply: Reply, _: int) -> None:
        self._on_simple(reply, Expect.NOOP)

    def _on_quit(self, reply: Reply, _: int) -> None:
        self._on_simple(reply, Expect.QUIT)


_HANDLERS: dict[Expect, Callable[[ClientConnection, Reply, int], None]] = {
    Expect.GREETING: ClientConnection._on_greeting,
    Expect.EHLO: ClientConnection._on_ehlo,
    Expect.HELO: ClientConnection._on_helo,
    Expect.LHLO: ClientConnection._on_lhlo,
    Expect.STARTTLS: ClientConnection._on_starttls,
    Expect.AUTH: ClientConnection._on_auth,
    Expect.MAIL: ClientConnection._on_mail,
    Expect.RCPT: ClientConnection._on_rcpt,
    Expect.DATA: ClientConnection._on_data,
    Expect.DATA_END: ClientConnection._on_data_end,
    Expect.EMPTY_END: ClientConnection._on_empty_end,
    Expect.BDAT: ClientConnection._on_bdat,
    Expect.BDAT_LAST: ClientConnection._on_bdat_last,
    Expect.TX_RSET: ClientConnection._on_tx_rset,
    Expect.RSET: ClientConnection._on_rset,
    Expect.NOOP: ClientConnection._on_noop,
    Expect.QUIT: ClientConnection._on_quit,
}
