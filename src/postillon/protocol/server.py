"""``ServerConnection``: the sans-IO SMTP/LMTP server (RFC 5321, RFC 2033 and extensions).

The adapter's side of the contract, as one session (maddy delivery_target habit):

    conn = ServerConnection(settings)
    conn.greet(Reply.of(220, None, "mx.example ESMTP postillon"))
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            send(conn.data_to_send())          # batches pipelined replies (RFC 2920)
            if conn.closing:
                break                          # then close the socket
            conn.receive_data(recv())          # b"" when the peer closed
        elif isinstance(event, Hello):
            conn.accept_hello()                # or conn.reply(error)
        elif isinstance(event, MailFrom | RcptTo | DataRequested):
            conn.reply(policy_decision(event))
        elif isinstance(event, StartTlsRequested):
            conn.reply(Reply.of(220, "2.0.0", "Ready to start TLS"))
            send(conn.data_to_send()); handshake()
            conn.tls_established()
        elif isinstance(event, AuthPassword):    # PLAIN, LOGIN: the core ran the SASL dialogue
            conn.auth_accept() if check(event) else conn.reply(R.AUTH_FAILED)
        elif isinstance(event, AuthScramLookup):
            conn.auth_credentials(store.scram_credentials(event.username))   # None if unknown
        elif isinstance(event, AuthProof):       # SCRAM-SHA-256 checked the proof
            conn.auth_accept() if event.valid else conn.reply(R.AUTH_FAILED)
        elif isinstance(event, BodyData):
            stream_to_intake(event.data)
        elif isinstance(event, MessageComplete):
            for _ in range(event.recipients or 1):   # LMTP: one per recipient
                conn.reply(commit_and_answer())
        elif isinstance(event, MessageAborted | TransactionReset | ConnectionClosed):
            discard_transaction()
        # Authenticated: the 235 is queued. AuthAborted (501: "*" or malformed),
        # CommandRejected, QuitRequested, TooManyErrors: log; the core has answered.
    # On a timeout or shutdown: conn.shutdown(TIMEOUT); send(conn.data_to_send()).

Each decision event (``events.Decision``) must be answered before
``next_event()`` is called again; doing otherwise raises ``RuntimeError``.
Everything the peer sends is checked here; the one error type raised inside the
core (``ProtocolError``) is turned into a reply in ``_handle_line``, where a
command line enters; the body readers record content faults and the core
answers them once the message's end has been read.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping

from postillon.core.reply import Reply
from postillon.protocol import replies as R
from postillon.protocol._readers import ChunkReader, DataReader, discard_line, read_line
from postillon.protocol._server_auth import AuthExchange
from postillon.protocol._server_message import MessageContent, Transaction
from postillon.protocol._state import (
    READS_LINES,
    Command,
    State,
    Trigger,
    check,
    transition,
)
from postillon.protocol.commands import (
    BdatCommand,
    parse_hello,
    parse_mail,
    parse_no_args,
    parse_rcpt,
    split_command,
)
from postillon.protocol.errors import ProtocolError
from postillon.protocol.events import (
    NEED_DATA,
    AuthPassword,
    AuthProof,
    AuthScramLookup,
    CommandRejected,
    ConnectionClosed,
    DataRequested,
    Decision,
    Event,
    Hello,
    MailFrom,
    MessageComplete,
    QuitRequested,
    RcptTo,
    StartTlsRequested,
    TooManyErrors,
    TransactionReset,
)
from postillon.protocol.extensions import ehlo_keywords
from postillon.protocol.sasl import (
    Login,
    Mechanism,
    Plain,
)
from postillon.protocol.settings import ServerSettings

__all__ = ["NEED_DATA", "MechanismFactory", "ServerConnection", "ServerSettings", "State"]

MechanismFactory = Callable[[], Mechanism]
_AuthDecision = AuthPassword | AuthScramLookup | AuthProof
# PLAIN and LOGIN need nothing from outside; SCRAM-SHA-256 needs hashing and a
# nonce source (sasl.ScramPrimitives), so the adapter supplies its factory.
BUILTIN_MECHANISMS: Mapping[str, MechanismFactory] = {"PLAIN": Plain, "LOGIN": Login}

_LOG_LIMIT = 200  # octets of a rejected line kept for the log
# C0 controls and DEL made visible in logged lines.
_VISIBLE = {c: f"\\x{c:02x}" for c in (*range(32), 127)}


def _printable(text: str) -> str:
    if len(text) > _LOG_LIMIT:
        text = text[:_LOG_LIMIT] + "..."
    return text.translate(_VISIBLE)


def _printable_raw(raw: bytes) -> str:
    return _printable(raw[: _LOG_LIMIT + 1].decode("utf-8", "backslashreplace"))


def _loggable(verb: str, line: str) -> str:
    """The command line for the log, with AUTH credentials masked."""
    if verb == "AUTH":
        words = line.split(" ")
        line = " ".join(words[:2]) + (" ***" if len(words) > 2 else "")
    return _printable(line)


class ServerConnection(AuthExchange, MessageContent):
    """The server side of one SMTP or LMTP connection, without I/O.

    Public attributes: ``settings``, ``closing`` (a 221/421 is queued or the
    peer closed: flush ``data_to_send()`` and close), ``tls_active``. Read-only:
    ``state`` (a ``State``), ``errors`` (4xx/5xx replies so far), ``hello``
    (the accepted ``Hello`` event, or None), ``authenticated`` (a 235 was
    sent), ``auth_offered``.

    ``mechanisms`` maps SASL mechanism names to factories of
    ``sasl.Mechanism``; every name in ``settings.auth_mechanisms`` needs one.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        mechanisms: Mapping[str, MechanismFactory] = BUILTIN_MECHANISMS,
    ) -> None:
        missing = [m for m in settings.auth_mechanisms if m not in mechanisms]
        if missing:
            raise ValueError(f"no implementation given for SASL mechanism(s) {missing}")
        self.settings = settings
        self._mechanisms = mechanisms
        self._authenticated = False
        self._auth: Mechanism | None = None  # the SASL exchange in progress
        self._auth_name = ""
        self._auth_final = b""  # SCRAM server-final-message, sent on auth_accept()
        self._auth_user = ("", "")  # (username, authzid) of the verdict being given
        self.closing = False
        self.tls_active = settings.tls_active
        self._state = State.CONNECTED
        self._in = bytearray()
        self._out = bytearray()
        self._events: deque[Event] = deque()
        self._pending: Decision | None = None
        self._replies_due = 0  # answers still expected to MessageComplete (LMTP: > 1)
        self._pending_bdat: BdatCommand | None = None  # the BDAT behind DataRequested
        self._eof = False
        self._eof_reported = False
        self._errors = 0
        self._hello: Hello | None = None
        self._txn: Transaction | None = None
        self._transactions = 0  # accepted MAIL commands (RFC 9422 MAILMAX)
        self._body: DataReader | None = None
        self._chunk: ChunkReader | None = None
        self._overlong: bytes | None = None  # start of a line being discarded

    # --- read-only views -----------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def hello(self) -> Hello | None:
        return self._hello

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def auth_offered(self) -> bool:
        """AUTH is advertised and accepted: mechanisms configured, and TLS
        active unless this listener allows plaintext AUTH (RFC 4954 §4)."""
        s = self.settings
        return bool(s.auth_mechanisms) and (self.tls_active or s.auth_plaintext)

    # --- the adapter's API ---------------------------------------------------

    def greet(self, reply: Reply) -> None:
        """Queue the greeting: 220, or 421/554 to refuse the connection (then ``closing``)."""
        if self._state is not State.CONNECTED:
            raise RuntimeError("greet() may be called once, first")
        self._send(reply)
        if reply.code == 220:
            self._state = transition(self._state, Trigger.GREET)
        else:
            self._close()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise RuntimeError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
        elif not self.closing and self._state is not State.STARTTLS:
            # After a 220 to STARTTLS, plaintext is dropped (CVE-2011-0411).
            self._in += data

    def next_event(self) -> Event | type[NEED_DATA]:
        if self._state is State.CONNECTED:
            raise RuntimeError("call greet() before next_event()")
        if self._pending is not None:
            raise RuntimeError(f"{type(self._pending).__name__} is waiting for an answer")
        while not self._events:
            if self.closing or not self._step():
                break
        if self._events:
            event = self._events.popleft()
            if isinstance(event, Decision):
                self._pending = event
            return event
        if self._eof and not self._eof_reported:
            self._eof_reported = True
            self._close()
            return ConnectionClosed()
        return NEED_DATA

    def reply(self, reply: Reply) -> None:
        """Answer the pending decision event."""
        event = self._pending
        if event is None:
            raise RuntimeError("reply() without a pending decision")
        positive = reply.code < 400
        if isinstance(event, _AuthDecision):
            if positive:
                raise RuntimeError("answer an AUTH decision with auth_accept() or an error")
            self._send(reply)
            if not self.closing:
                self._auth_end()
        elif isinstance(event, DataRequested) and self._pending_bdat is not None:
            self._answer_bdat(self._pending_bdat, reply)
        else:
            if isinstance(event, DataRequested) and positive and reply.code != 354:
                raise RuntimeError("answer DataRequested for DATA with 354 or an error")
            if isinstance(event, StartTlsRequested) and positive and reply.code != 220:
                raise RuntimeError("answer StartTlsRequested with 220 or an error")
            self._send(reply)
            if not self.closing:
                if isinstance(event, MessageComplete):
                    self._replies_due -= 1
                    if self._replies_due > 0:
                        return  # LMTP: more per-recipient answers to come
                    self._txn = None
                    self._state = transition(self._state, Trigger.MESSAGE_DONE)
                elif positive:
                    self._accepted(event)
        self._pending = None
        self._check_error_limit()

    def accept_hello(self, text: str = "") -> None:
        """Answer ``Hello`` with 250: one line for HELO, the extension list for EHLO/LHLO."""
        event = self._pending
        if not isinstance(event, Hello):
            raise RuntimeError("accept_hello() answers a pending Hello only")
        head = f"{self.settings.hostname} {text}" if text else self.settings.hostname
        if event.verb == "HELO":
            reply = Reply.of(250, None, head)
        else:
            keywords = ehlo_keywords(self.settings, tls_active=self.tls_active)
            if not self.auth_offered:  # never before TLS (RFC 4954 §4)
                keywords = [k for k in keywords if not k.startswith("AUTH ")]
            reply = Reply(250, None, (head, *keywords))
        self._send(reply)
        self._accepted(event)
        self._pending = None
        self._check_error_limit()

    def shutdown(self, reply: Reply) -> None:
        """Queue a reply outside the dialogue and close: 421 4.4.2 on a timeout,
        421 4.3.2 when the server stops (RFC 5321 §3.8). Any pending decision is
        dropped; call ``data_to_send()`` and close the socket."""
        if self.closing:
            return
        self._pending = None
        self._pending_bdat = None
        self._events.clear()
        self._send(reply)
        self._close()

    def data_to_send(self) -> bytes:
        """Drain every queued reply byte, in order."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The TLS handshake after STARTTLS is done: back to the initial state (RFC 3207 §4.2)."""
        if self._state is not State.STARTTLS:
            raise RuntimeError("tls_established() only after a 220 to STARTTLS")
        self.tls_active = True
        self._in.clear()
        self._hello = None
        self._authenticated = False
        self._txn = None
        self._state = transition(self._state, Trigger.TLS_ESTABLISHED)

    # --- decisions -------------------------------------------------------------

    def _accepted(self, event: Decision) -> None:
        """The adapter said yes to ``event``: move on."""
        if isinstance(event, Hello):
            self._hello = event
            self._state = transition(self._state, Trigger.HELLO_ACCEPTED)
        elif isinstance(event, MailFrom):
            self._txn = Transaction(event.sender, event.params)
            self._transactions += 1
            self._state = transition(self._state, Trigger.MAIL_ACCEPTED)
        elif isinstance(event, RcptTo):
            assert self._txn is not None
            self._txn.accepted += 1
            self._state = transition(self._state, Trigger.RCPT_ACCEPTED)
        elif isinstance(event, DataRequested):
            self._body = DataReader(self.settings.max_message_size)
            self._state = transition(self._state, Trigger.DATA_ACCEPTED)
        elif isinstance(event, StartTlsRequested):
            self._in.clear()  # nothing pipelined after STARTTLS survives (CVE-2011-0411)
            self._state = transition(self._state, Trigger.STARTTLS_ACCEPTED)

    # --- the input loop --------------------------------------------------------

    def _step(self) -> bool:
        """Process some input; False when nothing more can happen without more data."""
        if self._state is State.STARTTLS:
            self._in.clear()
            return False
        if self._chunk is not None:
            return self._step_chunk()
        if self._body is not None:
            return self._step_body()
        if self._state not in READS_LINES or not self._in:
            return False
        if self._overlong is not None:
            return self._step_overlong()
        limit = self.settings.max_command_line
        raw = read_line(self._in, limit)
        if raw is None:
            if len(self._in) < limit:
                return False
            # RFC 5321 §4.5.3.1.4: too long; drop it up to its CRLF, answer once.
            self._overlong = bytes(self._in[:_LOG_LIMIT])
            return True
        if self._state is State.AUTH:
            self._auth_line(raw)
        else:
            self._handle_line(raw)
        self._check_error_limit()
        return True

    def _step_overlong(self) -> bool:
        if not discard_line(self._in):
            return False
        start = self._overlong or b""
        self._overlong = None
        if self._state is State.AUTH:  # an overlong SASL response ends the exchange
            self._auth_abort(R.LINE_TOO_LONG)
        else:
            self._reject(R.LINE_TOO_LONG, _printable_raw(start) + "...")
        self._check_error_limit()
        return True

    # --- commands ----------------------------------------------------------------

    def _handle_line(self, raw: bytes) -> None:
        """Where a command line enters: ProtocolError becomes a reply here."""
        if b"\x00" in raw:
            self._reject(R.NUL_NOT_ALLOWED, _printable_raw(raw))
            return
        if b"\r" in raw or b"\n" in raw:
            self._reject(R.BARE_LINE_ENDING, _printable_raw(raw))
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._reject(R.INVALID_UTF8, _printable_raw(raw))
            return
        verb, args = split_command(line)
        handler = _HANDLERS.get(verb)
        try:
            if handler is None:
                raise ProtocolError(R.SYNTAX_ERROR)
            handler(self, verb, args)
        except ProtocolError as exc:
            self._reject(exc.reply, _loggable(verb, line))

    def _check(self, command: Command) -> None:
        try:
            check(command, self._state)
        except ProtocolError as exc:
            if self.settings.lmtp:
                if exc.reply is R.NEED_HELLO:
                    raise ProtocolError(R.NEED_LHLO) from None
                if exc.reply is R.NO_VALID_RECIPIENTS:  # RFC 2033 §4.2
                    raise ProtocolError(R.NEED_RCPT) from None
            raise

    def _cmd_hello(self, verb: str, args: str) -> None:
        lmtp = self.settings.lmtp
        if (verb == "LHLO") != lmtp:
            raise ProtocolError(R.USE_LHLO if lmtp else R.SYNTAX_ERROR)
        self._check(Command.HELLO)
        name = parse_hello(args)
        # RFC 5321 §4.1.4: a new hello resets the state as RSET does.
        self._reset(announce=self._txn is not None)
        self._events.append(Hello(verb, name))

    def _cmd_mail(self, verb: str, args: str) -> None:
        self._check(Command.MAIL)
        if self.settings.require_auth and not self._authenticated:
            raise ProtocolError(R.AUTH_REQUIRED)  # RFC 6409 §4.3, RFC 4954 §6
        limit = self.settings.max_transactions
        if limit and self._transactions >= limit:
            raise ProtocolError(R.TOO_MANY_TRANSACTIONS)  # RFC 9422 MAILMAX
        sender, params = parse_mail(args, self.settings, tls_active=self.tls_active)
        self._events.append(MailFrom(sender, params))

    def _cmd_rcpt(self, verb: str, args: str) -> None:
        self._check(Command.RCPT)
        txn = self._txn
        assert txn is not None
        recipient, params = parse_rcpt(args, self.settings, smtputf8=txn.params.smtputf8)
        limit = self.settings.max_recipients
        if limit and txn.accepted >= limit:
            raise ProtocolError(R.TOO_MANY_RECIPIENTS)
        self._events.append(RcptTo(recipient, params))

    def _cmd_data(self, verb: str, args: str) -> None:
        self._check(Command.DATA)
        parse_no_args(args)
        self._events.append(DataRequested())

    def _cmd_rset(self, verb: str, args: str) -> None:
        parse_no_args(args)
        self._reset(announce=True)
        self._send(R.OK)

    def _cmd_noop(self, verb: str, args: str) -> None:
        self._send(R.OK)

    def _cmd_quit(self, verb: str, args: str) -> None:
        parse_no_args(args)
        self._send(R.SERVICE_CLOSING)
        self._events.append(QuitRequested())

    def _cmd_vrfy(self, verb: str, args: str) -> None:
        if not args:
            raise ProtocolError(R.PARAM_SYNTAX)
        self._send(R.VRFY_CANNOT)

    def _cmd_expn(self, verb: str, args: str) -> None:
        raise ProtocolError(R.EXPN_DISABLED)

    def _cmd_help(self, verb: str, args: str) -> None:
        self._send(R.HELP)

    def _cmd_starttls(self, verb: str, args: str) -> None:
        if not self.settings.starttls:
            raise ProtocolError(R.NOT_IMPLEMENTED)
        if self.tls_active:
            raise ProtocolError(R.TLS_ALREADY_ACTIVE)
        self._check(Command.STARTTLS)
        parse_no_args(args)
        self._events.append(StartTlsRequested())

    # --- helpers ---------------------------------------------------------------

    def _reset(self, *, announce: bool) -> None:
        self._txn = None
        self._state = transition(self._state, Trigger.RESET)
        if announce:
            self._events.append(TransactionReset())

    def _reject(self, reply: Reply, line: str) -> None:
        self._send(reply)
        self._events.append(CommandRejected(reply, line))

    def _send(self, reply: Reply) -> None:
        self._out += reply.to_bytes()
        if reply.code >= 400:
            self._errors += 1
        if reply.code in (221, 421):
            self._close()

    def _close(self) -> None:
        self.closing = True
        self._state = State.CLOSED
        self._in.clear()
        self._body = None
        self._chunk = None
        self._overlong = None
        self._auth = None

    def _check_error_limit(self) -> None:
        """After a complete answer: on reaching max_errors, 421 and close."""
        limit = self.settings.max_errors
        if not limit or self.closing or self._errors < limit:
            return
        if self._pending is not None or any(isinstance(e, Decision) for e in self._events):
            return  # not in the middle of an answer; checked again once it is given
        self._send(R.TOO_MANY_ERRORS)
        self._events.append(TooManyErrors())


_Handler = Callable[[ServerConnection, str, str], None]

_HANDLERS: dict[str, _Handler] = {
    "EHLO": ServerConnection._cmd_hello,
    "HELO": ServerConnection._cmd_hello,
    "LHLO": ServerConnection._cmd_hello,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "BDAT": ServerConnection._cmd_bdat,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "VRFY": ServerConnection._cmd_vrfy,
    "EXPN": ServerConnection._cmd_expn,
    "HELP": ServerConnection._cmd_help,
    "STARTTLS": ServerConnection._cmd_starttls,
    "AUTH": ServerConnection._cmd_auth,
}
