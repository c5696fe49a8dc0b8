"""ServerConnection: dialogues (table-driven, each run whole, byte by byte and with
trailing bytes) and the adapter-facing API contract."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from postillon.core.address import Address
from postillon.core.envelope import DsnRet
from postillon.core.reply import Reply
from postillon.protocol import replies as R
from postillon.protocol.events import (
    NEED_DATA,
    BodyData,
    CommandRejected,
    ConnectionClosed,
    DataRequested,
    Decision,
    Event,
    Hello,
    MailFrom,
    MessageAborted,
    MessageComplete,
    QuitRequested,
    RcptTo,
    StartTlsRequested,
    TooManyErrors,
    TransactionReset,
)
from postillon.protocol.server import ServerConnection, ServerSettings, State
from postillon.testing.transcript import MemoryPeer

GREETING = Reply.of(220, None, "mx.test ESMTP")
OK_MAIL = Reply.of(250, "2.1.0", "Ok")
OK_RCPT = Reply.of(250, "2.1.5", "Ok")
GO = Reply.of(354, None, "go ahead")
QUEUED = Reply.of(250, "2.0.0", "Ok: queued")
TRANSACTION = b"HELO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"


# --- dialogues with the scripted adapter ------------------------------------------------


def converse(
    data: bytes, chunk: int | None, settings: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """(server lines after the greeting, event names with BodyData runs merged)."""
    peer = MemoryPeer(ServerSettings("mx.test", **settings), chunk_size=chunk)
    peer.output.clear()
    peer.send(data)
    names: list[str] = []
    for event in peer.events:
        name = type(event).__name__
        if name == "MessageAborted" and names and names[-1] == "BodyData":
            names.pop()  # how much content preceded the fault depends on the packets
        if not (name == "BodyData" and names and names[-1] == "BodyData"):
            names.append(name)
    return bytes(peer.output).decode().split("\r\n")[:-1], names


def tr(data: bytes, lines: list[str], events: list[str], **settings: Any) -> None:
    """The same replies and events whole, byte by byte, and with a partial command after."""
    for chunk, extra in ((None, b""), (1, b""), (None, b"NOO"), (3, b"RSET")):
        got_lines, got_events = converse(data + extra, chunk, settings)
        assert got_lines == lines, (chunk, extra)
        assert got_events == events, (chunk, extra)


DIALOGUES: list[tuple[str, bytes, list[str], list[str], dict[str, Any]]] = [
    ("noop", b"NOOP\r\n", ["250 2.0.0 Ok"], [], {}),
    ("helo", b"HELO c.test\r\n", ["250 mx.test"], ["Hello"], {}),
    (
        "ehlo-minimal",
        b"EHLO c.test\r\n",
        ["250-mx.test", "250-PIPELINING", "250-SIZE", "250-8BITMIME", "250 ENHANCEDSTATUSCODES"],
        ["Hello"],
        {"max_message_size": 0, "smtputf8": False, "chunking": False, "dsn": False},
    ),
    (
        "ehlo-everything",
        b"EHLO c.test\r\n",
        [
            "250-mx.test",
            "250-PIPELINING",
            "250-SIZE 100",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250-SMTPUTF8",
            "250-CHUNKING",
            "250-DSN",
            "250-STARTTLS",
            "250 AUTH PLAIN LOGIN",
        ],
        ["Hello"],
        {
            "max_message_size": 100,
            "starttls": True,
            "auth_mechanisms": ("PLAIN", "LOGIN"),
            "auth_plaintext": True,  # AUTH is offered before TLS only when allowed
        },
    ),
    ("rset-first", b"RSET\r\n", ["250 2.0.0 Ok"], ["TransactionReset"], {}),
    (
        "mail-first",
        b"MAIL FROM:<a@b.test>\r\n",
        [R.NEED_HELLO.to_bytes().decode()[:-2]],
        ["CommandRejected"],
        {},
    ),
    (
        "transaction",
        TRANSACTION + b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n",
        [
            "250 mx.test",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued",
        ],
        ["Hello", "MailFrom", "RcptTo", "DataRequested", "BodyData", "MessageComplete"],
        {},
    ),
    (
        "empty-body",
        TRANSACTION + b"DATA\r\n.\r\n",
        [
            "250 mx.test",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued",
        ],
        ["Hello", "MailFrom", "RcptTo", "DataRequested", "MessageComplete"],
        {},
    ),
    (
        "smuggling",
        TRANSACTION + b"DATA\r\nhi\n.\nMAIL FROM:<x@y.test>\r\n.\r\nNOOP\r\n",
        [
            "250 mx.test",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            R.BODY_BARE_LINE_ENDING.to_bytes().decode()[:-2],
            "250 2.0.0 Ok",
        ],
        ["Hello", "MailFrom", "RcptTo", "DataRequested", "MessageAborted"],
        {},
    ),
    (
        "bdat",
        TRANSACTION + b"BDAT 3\r\nab\rBDAT 1 LAST\r\n\n",
        [
            "250 mx.test",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.0.0 3 octets received",
            "250 2.0.0 Ok: queued",
        ],
        ["Hello", "MailFrom", "RcptTo", "DataRequested", "BodyData", "MessageComplete"],
        {},
    ),
    (
        "bdat-refused-consumes",
        b"HELO c.test\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n",
        ["250 mx.test", "503 5.5.1 Need MAIL command", "250 2.0.0 Ok"],
        ["Hello", "CommandRejected"],
        {},
    ),
    (
        "bdat-size",
        TRANSACTION + b"BDAT 11 LAST\r\n0123456789\nNOOP\r\n",
        [
            "250 mx.test",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "552 5.3.4 Message size exceeds fixed maximum message size",
            "250 2.0.0 Ok",
        ],
        ["Hello", "MailFrom", "RcptTo", "MessageAborted"],
        {"max_message_size": 10},
    ),
    (
        "overlong",
        b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n",
        ["500 5.5.2 Line too long (RFC 5321 4.5.3.1)", "250 2.0.0 Ok"],
        ["CommandRejected"],
        {"max_command_line": 512},
    ),
    (
        "exactly-at-limit",
        b"NOOP " + b"x" * 505 + b"\r\n",
        ["250 2.0.0 Ok"],
        [],
        {"max_command_line": 512},
    ),
    (
        "bare-lf-command",
        b"NOOP\nQUIT\r\nNOOP\r\n",
        [
            "500 5.5.2 Bare CR or LF not allowed; lines end with CRLF (RFC 5321 2.3.8)",
            "250 2.0.0 Ok",
        ],
        ["CommandRejected"],
        {},
    ),
    (
        "nul-command",
        b"NO\x00OP\r\n",
        ["500 5.5.2 NUL character not allowed"],
        ["CommandRejected"],
        {},
    ),
    (
        "quit-then-more",
        b"QUIT\r\nNOOP\r\n",
        ["221 2.0.0 Bye"],
        ["QuitRequested"],
        {},
    ),
    (
        "too-many-errors",
        b"A\r\nB\r\nNOOP\r\n",
        [
            "500 5.5.2 Syntax error, command unrecognized",
            "500 5.5.2 Syntax error, command unrecognized",
            "421 4.7.0 Too many errors, closing connection",
        ],
        ["CommandRejected", "CommandRejected", "TooManyErrors"],
        {"max_errors": 2},
    ),
    (
        "no-error-limit",
        b"A\r\n" * 30 + b"NOOP\r\n",
        ["500 5.5.2 Syntax error, command unrecognized"] * 30 + ["250 2.0.0 Ok"],
        ["CommandRejected"] * 30,
        {"max_errors": 0},
    ),
    (
        "too-many-recipients",
        TRANSACTION + b"RCPT TO:<c@example.com>\r\n",
        ["250 mx.test", "250 2.1.0 Ok", "250 2.1.5 Ok", "452 4.5.3 Too many recipients"],
        ["Hello", "MailFrom", "RcptTo", "CommandRejected"],
        {"max_recipients": 1},
    ),
    (
        "lmtp",
        b"LHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<full@example.com>\r\n"
        b"RCPT TO:<b@example.com>\r\nDATA\r\nx\r\n.\r\n",
        [
            "250-mx.test",
            "250-PIPELINING",
            "250-SIZE 52428800",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250-SMTPUTF8",
            "250-CHUNKING",
            "250 DSN",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>",
            "452 4.2.2 Mailbox full",
            "250 2.0.0 Ok: delivered",
        ],
        ["Hello", "MailFrom", "RcptTo", "RcptTo", "DataRequested", "BodyData", "MessageComplete"],
        {"lmtp": True},
    ),
]


@pytest.mark.parametrize(
    ("data", "lines", "events", "settings"),
    [d[1:] for d in DIALOGUES],
    ids=[d[0] for d in DIALOGUES],
)
def test_dialogue(
    data: bytes, lines: list[str], events: list[str], settings: dict[str, Any]
) -> None:
    tr(data, lines, events, **settings)


# --- the API contract, with a hand-driven adapter ------------------------------------------


def connect(**settings: Any) -> ServerConnection:
    conn = ServerConnection(ServerSettings("mx.test", **settings))
    conn.greet(GREETING)
    assert conn.data_to_send() == b"220 mx.test ESMTP\r\n"
    return conn


def events_until_need_data(conn: ServerConnection) -> list[Event]:
    out: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert isinstance(event, Event)
        assert not isinstance(event, Decision), event
        out.append(event)
    return out


def expect(conn: ServerConnection, cls: type[Event]) -> Any:
    event = conn.next_event()
    assert isinstance(event, cls), event
    return event


def open_transaction(conn: ServerConnection, recipients: int = 1) -> None:
    conn.receive_data(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    expect(conn, Hello)
    conn.accept_hello()
    expect(conn, MailFrom)
    conn.reply(OK_MAIL)
    for i in range(recipients):
        conn.receive_data(b"RCPT TO:<r%d@example.com>\r\n" % i)
        expect(conn, RcptTo)
        conn.reply(OK_RCPT)
    conn.data_to_send()


def test_need_data_is_a_sentinel() -> None:
    with pytest.raises(TypeError):
        NEED_DATA()
    conn = connect()
    assert conn.next_event() is NEED_DATA


def test_next_event_before_greet() -> None:
    conn = ServerConnection(ServerSettings("mx.test"))
    conn.receive_data(b"NOOP\r\n")  # buffered
    with pytest.raises(RuntimeError):
        conn.next_event()
    conn.greet(GREETING)
    with pytest.raises(RuntimeError):
        conn.greet(GREETING)
    assert conn.state is State.GREETED
    assert events_until_need_data(conn) == []
    assert conn.data_to_send() == b"220 mx.test ESMTP\r\n250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("code", [421, 554])
def test_refusing_greeting_closes(code: int) -> None:
    conn = ServerConnection(ServerSettings("mx.test"))
    conn.greet(Reply.of(code, f"{code // 100}.7.0", "go away"))
    assert conn.closing
    conn.receive_data(b"EHLO c.test\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == f"{code} {code // 100}.7.0 go away\r\n".encode()


def test_a_decision_must_be_answered_first() -> None:
    conn = connect()
    conn.receive_data(b"EHLO c.test\r\nNOOP\r\n")
    hello = expect(conn, Hello)
    assert hello == Hello("EHLO", "c.test")
    with pytest.raises(RuntimeError):
        conn.next_event()
    conn.accept_hello("at your service")
    assert conn.hello == hello
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().startswith(b"250-mx.test at your service\r\n250-PIPELINING\r\n")


def test_answers_without_a_decision_are_errors() -> None:
    conn = connect()
    with pytest.raises(RuntimeError):
        conn.reply(OK_MAIL)
    with pytest.raises(RuntimeError):
        conn.accept_hello()
    with pytest.raises(RuntimeError):
        conn.tls_established()
    conn.receive_data(b"HELO c.test\r\nMAIL FROM:<>\r\n")
    expect(conn, Hello)
    conn.accept_hello()
    expect(conn, MailFrom)
    with pytest.raises(RuntimeError):
        conn.accept_hello()
    conn.reply(OK_MAIL)


def test_hello_refused_by_adapter() -> None:
    conn = connect()
    conn.receive_data(b"EHLO c.test\r\nMAIL FROM:<>\r\n")
    expect(conn, Hello)
    conn.reply(Reply.of(550, "5.7.1", "not you"))
    assert conn.hello is None
    assert isinstance(expect(conn, CommandRejected), CommandRejected)
    assert conn.data_to_send() == b"550 5.7.1 not you\r\n503 5.5.1 Send EHLO or HELO first\r\n"
    assert conn.errors == 2


def test_data_must_be_answered_with_354_or_an_error() -> None:
    conn = connect()
    open_transaction(conn)
    conn.receive_data(b"DATA\r\n")
    expect(conn, DataRequested)
    with pytest.raises(RuntimeError):
        conn.reply(OK_MAIL)
    conn.reply(Reply.of(451, "4.3.0", "later"))
    assert conn.state is State.RCPT  # the transaction stays open
    conn.receive_data(b"DATA\r\n")
    expect(conn, DataRequested)
    conn.reply(GO)
    assert conn.state is State.DATA
    assert conn.data_to_send() == b"451 4.3.0 later\r\n354 go ahead\r\n"


def test_body_events_and_size() -> None:
    conn = connect()
    open_transaction(conn)
    conn.receive_data(b"DATA\r\n")
    expect(conn, DataRequested)
    conn.reply(GO)
    chunks = [b"Subject: x\r\n\r\n..dot\r\n", b"line\r", b"\n.", b"\r\n"]
    body = bytearray()
    complete = None
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            if isinstance(event, BodyData):
                body += event.data
            else:
                complete = event
                break
    assert bytes(body) == b"Subject: x\r\n\r\n.dot\r\nline\r\n"
    assert complete == MessageComplete(len(body), None)
    conn.reply(QUEUED)
    assert conn.state is State.READY


def test_mail_event_carries_parsed_params() -> None:
    conn = connect()
    conn.receive_data(
        b"EHLO c.test\r\nMAIL FROM:<a@example.org> RET=HDRS ENVID=x+2By SIZE=10 BODY=8BITMIME\r\n"
    )
    expect(conn, Hello)
    conn.accept_hello()
    mail = expect(conn, MailFrom)
    assert mail.sender == Address("a", "example.org")
    assert (mail.params.ret, mail.params.envid, mail.params.size) == (DsnRet.HDRS, "x+y", 10)
    conn.reply(OK_MAIL)
    conn.receive_data(
        b"RCPT TO:<b@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b@example.com\r\n"
    )
    rcpt = expect(conn, RcptTo)
    assert rcpt.params.notify == frozenset({"FAILURE", "DELAY"})
    assert rcpt.params.orcpt == "rfc822;b@example.com"


def test_rejected_recipient_does_not_count() -> None:
    conn = connect()
    open_transaction(conn, recipients=0)
    conn.receive_data(b"RCPT TO:<b@example.com>\r\nDATA\r\n")
    expect(conn, RcptTo)
    conn.reply(Reply.of(550, "5.1.1", "no such user"))
    assert isinstance(expect(conn, CommandRejected), CommandRejected)
    assert conn.data_to_send() == b"550 5.1.1 no such user\r\n554 5.5.1 No valid recipients\r\n"


def test_reply_421_closes() -> None:
    conn = connect()
    open_transaction(conn)
    conn.receive_data(b"DATA\r\nNOOP\r\n")
    expect(conn, DataRequested)
    conn.reply(Reply.of(421, "4.3.2", "shutting down"))
    assert conn.closing and conn.state is State.CLOSED
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"421 4.3.2 shutting down\r\n"


def test_eof() -> None:
    conn = connect()
    conn.receive_data(b"NOOP\r\nNOO")
    conn.receive_data(b"")
    conn.receive_data(b"")  # repeated EOF is harmless
    with pytest.raises(RuntimeError):
        conn.receive_data(b"more")
    assert conn.next_event() == ConnectionClosed()  # after the complete NOOP
    assert conn.closing
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"250 2.0.0 Ok\r\n"


def test_eof_during_data() -> None:
    conn = connect()
    open_transaction(conn)
    conn.receive_data(b"DATA\r\n")
    expect(conn, DataRequested)
    conn.reply(GO)
    conn.receive_data(b"partial")
    conn.receive_data(b"")
    assert events_until_need_data(conn) == [BodyData(b"partial"), ConnectionClosed()]


def test_quit() -> None:
    conn = connect()
    conn.receive_data(b"QUIT\r\n")
    assert conn.next_event() == QuitRequested()
    assert conn.closing
    assert conn.data_to_send() == b"221 2.0.0 Bye\r\n"


def test_lmtp_needs_one_answer_per_recipient() -> None:
    conn = connect(lmtp=True, max_errors=2)
    conn.receive_data(b"LHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    expect(conn, Hello)
    conn.accept_hello()
    expect(conn, MailFrom)
    conn.reply(OK_MAIL)
    for i in range(3):
        conn.receive_data(b"RCPT TO:<r%d@example.com>\r\n" % i)
        expect(conn, RcptTo)
        conn.reply(OK_RCPT)
    conn.receive_data(b"DATA\r\n.\r\nNOOP\r\n")
    expect(conn, DataRequested)
    conn.reply(GO)
    conn.data_to_send()
    complete = expect(conn, MessageComplete)
    assert complete == MessageComplete(0, 3)
    full = Reply.of(452, "4.2.2", "full")
    conn.reply(full)
    with pytest.raises(RuntimeError):
        conn.next_event()
    conn.reply(full)  # the error limit is reached, but the 421 waits for the last answer
    assert not conn.closing
    conn.reply(QUEUED)
    assert conn.closing
    assert conn.next_event() == TooManyErrors()
    assert conn.data_to_send() == (
        b"452 4.2.2 full\r\n452 4.2.2 full\r\n250 2.0.0 Ok: queued\r\n"
        b"421 4.7.0 Too many errors, closing connection\r\n"
    )


def test_starttls_accepted_discards_plaintext() -> None:
    conn = connect(starttls=True)
    conn.receive_data(b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
    expect(conn, Hello)
    conn.accept_hello()
    expect(conn, StartTlsRequested)
    with pytest.raises(RuntimeError):
        conn.reply(Reply.of(250, "2.0.0", "sure"))
    conn.reply(Reply.of(220, "2.0.0", "Ready to start TLS"))
    assert conn.state is State.STARTTLS
    conn.receive_data(b"RCPT TO:<x@example.com>\r\n")  # still plaintext: dropped
    assert conn.next_event() is NEED_DATA
    conn.tls_established()
    assert conn.tls_active and conn.hello is None and conn.state is State.GREETED
    conn.receive_data(b"EHLO c.test\r\n")
    expect(conn, Hello)
    conn.accept_hello()
    assert b"STARTTLS" not in conn.data_to_send().split(b"220 2.0.0 Ready to start TLS\r\n")[1]


def test_starttls_refused_keeps_pipelined_commands() -> None:
    conn = connect(starttls=True)
    conn.receive_data(b"EHLO c.test\r\nSTARTTLS\r\nNOOP\r\n")
    expect(conn, Hello)
    conn.accept_hello()
    expect(conn, StartTlsRequested)
    conn.reply(Reply.of(454, "4.7.0", "TLS not available"))
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send().endswith(b"454 4.7.0 TLS not available\r\n250 2.0.0 Ok\r\n")


def test_bdat_go_ahead_is_not_sent_and_354_is_accepted() -> None:
    conn = connect()
    open_transaction(conn)
    conn.receive_data(b"BDAT 2\r\nabBDAT 2\r\n\r\n")
    expect(conn, DataRequested)
    conn.reply(GO)  # an adapter written for DATA: still means go
    # the second chunk has no DataRequested of its own
    assert events_until_need_data(conn) == [BodyData(b"ab"), BodyData(b"\r\n")]
    assert conn.data_to_send() == b"250 2.0.0 2 octets received\r\n" * 2


def test_bdat_refused_by_adapter_ends_the_transaction() -> None:
    conn = connect()
    open_transaction(conn)
    conn.receive_data(b"BDAT 4\r\nQUITRCPT TO:<x@example.com>\r\n")
    expect(conn, DataRequested)
    conn.reply(Reply.of(452, "4.3.1", "no space"))
    assert conn.next_event() == TransactionReset()
    assert isinstance(expect(conn, CommandRejected), CommandRejected)
    assert conn.data_to_send() == b"452 4.3.1 no space\r\n503 5.5.1 Need MAIL command\r\n"


def test_auth_refusals_mask_credentials() -> None:
    conn = connect(auth_mechanisms=("PLAIN",), tls_active=True)
    conn.receive_data(b"EHLO c.test\r\nAUTH PLAIN AAAA\r\nAUTH CRAM-MD5\r\n")
    expect(conn, Hello)
    conn.accept_hello()
    first, second = events_until_need_data(conn)
    assert first == CommandRejected(R.AUTH_MALFORMED, "AUTH PLAIN ***")
    assert second == CommandRejected(R.AUTH_UNKNOWN_MECHANISM, "AUTH CRAM-MD5")
    assert b"250 AUTH PLAIN\r\n" in conn.data_to_send()


def test_auth_not_offered_is_masked_too() -> None:
    conn = connect()
    conn.receive_data(b"AUTH PLAIN secret\r\n")
    assert conn.next_event() == CommandRejected(R.NOT_IMPLEMENTED, "AUTH PLAIN ***")


def test_rejected_lines_are_logged_printably() -> None:
    conn = connect()
    conn.receive_data(b"NO\rOP\x01\r\n" + b"X" * 3000 + b"\r\n")
    first, second = events_until_need_data(conn)
    assert first == CommandRejected(R.BARE_LINE_ENDING, "NO\\x0dOP\\x01")
    assert isinstance(second, CommandRejected) and second.reply == R.LINE_TOO_LONG
    assert len(second.line) < 300


def test_state_and_events_are_values() -> None:
    conn = connect()
    assert conn.state == "GREETED"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Hello("EHLO", "a.test").name = "b"  # type: ignore[misc]
    assert "octets" in repr(BodyData(b"x" * 100))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hostname": ""},
        {"hostname": "a b"},
        {"hostname": "mx.test", "max_command_line": 511},
        {"hostname": "mx.test", "max_errors": -1},
        {"hostname": "mx.test", "auth_mechanisms": ("PLAIN LOGIN",)},
    ],
)
def test_settings_are_checked(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ServerSettings(**kwargs)


def test_shutdown_queues_a_reply_and_closes() -> None:
    conn = connect()
    open_transaction(conn)
    conn.receive_data(b"DATA\r\n")
    expect(conn, DataRequested)
    conn.shutdown(Reply.of(421, "4.4.2", "Timeout exceeded"))  # even with a decision pending
    assert conn.closing
    conn.shutdown(Reply.of(421, "4.3.2", "again"))  # only once
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"421 4.4.2 Timeout exceeded\r\n"


def test_bdat_over_the_limit_is_refused_after_its_octets() -> None:
    conn = connect(max_message_size=5)
    open_transaction(conn)
    conn.receive_data(b"BDAT 6 LAST\r\nabc")
    assert conn.next_event() is NEED_DATA  # nothing said before the chunk is consumed
    conn.receive_data(b"def")
    aborted = conn.next_event()
    assert aborted == MessageAborted(R.MESSAGE_TOO_BIG)
    assert conn.state is State.READY
    assert conn.data_to_send() == R.MESSAGE_TOO_BIG.to_bytes()
