"""ClientConnection dialogues: table-driven, each fed whole, byte by byte, in two
halves, and with trailing bytes (the start of a reply that never completes).

A dialogue is a list of steps: ``bytes`` is what the server sends, a callable is
what the adapter does. The runner collects every write the client makes (taken
whenever the core needs more data, as the driver flushes) and every event, in a
compact form ("RcptReply 1 550 5.1.1").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postillon.core.envelope import BodyType, DsnRet, MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.protocol.client import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    NEED_DATA,
    ClientConnection,
    ClientState,
)
from postillon.protocol.client_events import (
    AuthReply,
    BodyRequested,
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

Step = bytes | Callable[[ClientConnection], Any]

GREETING = b"220 mx.test ESMTP\r\n"
EHLO_PIPE = b"250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
EHLO_PLAIN = b"250-mx.test\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
EHLO_FULL = (
    b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n250-DSN\r\n"
    b"250-SMTPUTF8\r\n250-CHUNKING\r\n250 ENHANCEDSTATUSCODES\r\n"
)
EHLO_CHUNKING = b"250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
EHLO_CHUNKING_NOPIPE = b"250-mx.test\r\n250 CHUNKING\r\n"

# Named replies (aiosmtpd statuscodes habit).
OK_MAIL = b"250 2.1.0 Ok\r\n"
OK_RCPT = b"250 2.1.5 Ok\r\n"
NO_USER = b"550 5.1.1 No such user\r\n"
GO = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED = b"250 2.0.0 Ok: queued as 1234\r\n"
OK = b"250 2.0.0 Ok\r\n"
NO_RCPTS = b"554 5.5.1 No valid recipients\r\n"
BAD_SEQ = b"503 5.5.1 Bad sequence of commands\r\n"
BYE = b"421 4.3.2 Shutting down\r\n"


def hello(c: ClientConnection) -> None:
    c.hello()


def tx(
    *rcpts: str,
    sender: str = "a@s.test",
    params: MailParams | None = None,
    rparams: RcptParams | None = None,
    **kw: Any,
) -> Callable[[ClientConnection], None]:
    def call(c: ClientConnection) -> None:
        c.start_transaction(
            sender, params or MailParams(), [(r, rparams or RcptParams()) for r in rcpts], **kw
        )

    return call


def body(data: bytes, last: bool = True) -> Callable[[ClientConnection], None]:
    def call(c: ClientConnection) -> None:
        c.send_body(data, last=last)

    return call


def show_reply(r: Reply | None) -> str:
    if r is None:
        return "-"
    return f"{r.code} {r.status}" if r.status else str(r.code)


def show(ev: ClientEvent) -> str:
    match ev:
        case Greeting(reply=r):
            return f"Greeting {show_reply(r)}"
        case HelloAccepted(verb=v):
            return f"HelloAccepted {v}"
        case HelloRejected(reply=r):
            return f"HelloRejected {show_reply(r)}"
        case StartTlsReply(reply=r):
            return f"StartTlsReply {show_reply(r)}"
        case AuthReply(reply=r):
            return f"AuthReply {show_reply(r)}"
        case MailReply(reply=r):
            return f"MailReply {show_reply(r)}"
        case RcptReply(index=i, reply=r):
            return f"RcptReply {i} {show_reply(r)}"
        case BodyRequested(reply=r):
            return f"BodyRequested {show_reply(r)}"
        case TransactionDone(mail_reply=m, per_recipient=p, interrupted=why):
            rs = ", ".join(show_reply(r) for r in p)
            return f"Done mail={show_reply(m)} [{rs}]" + (" interrupted" if why else "")
        case CommandReply(verb=v, reply=r):
            return f"{v} {show_reply(r)}"
        case ServiceClosing(reply=r):
            return f"ServiceClosing {show_reply(r)}"
        case ConnectionClosed():
            return "ConnectionClosed"
        case ProtocolViolation():
            return "ProtocolViolation"
    return type(ev).__name__


MODES = ("whole", "bytes", "halves", "trailing")


def run(
    steps: list[Step], mode: str = "whole", **settings: Any
) -> tuple[list[bytes], list[str], ClientConnection]:
    conn = ClientConnection("client.test", **settings)
    writes: list[bytes] = []
    events: list[str] = []

    def drain() -> None:
        while (ev := conn.next_event()) is not NEED_DATA:
            assert isinstance(ev, ClientEvent)
            events.append(show(ev))
        out = conn.data_to_send()
        if out:
            writes.append(out)

    server_steps = [i for i, s in enumerate(steps) if isinstance(s, bytes) and s]
    for i, step in enumerate(steps):
        if callable(step) or step == b"":  # an adapter call, or EOF
            conn.receive_data(step) if isinstance(step, bytes) else step(conn)
            drain()
            continue
        if mode == "trailing" and server_steps and i == server_steps[-1]:
            step += b"25"  # the start of a reply that is never finished
        if mode == "bytes":
            pieces = [step[j : j + 1] for j in range(len(step))]
        elif mode == "halves":
            pieces = [step[: len(step) // 2], step[len(step) // 2 :]]
        else:
            pieces = [step]
        for piece in pieces:
            conn.receive_data(piece)
            drain()
    return writes, events, conn


def transcript(steps: list[Step], **settings: Any) -> tuple[bytes, list[str], ClientConnection]:
    """Run in every mode; all must agree. Returns (all client bytes, events, conn of 'whole')."""
    results = [run(steps, mode, **settings) for mode in MODES]
    writes, events, conn = results[0]
    for mode, (w, e, _) in zip(MODES, results, strict=True):
        assert b"".join(w) == b"".join(writes), mode
        assert e == events, mode
    return b"".join(writes), events, conn


def lines(data: bytes) -> list[str]:
    return data.decode().split("\r\n")[:-1]


# --- dialogues ---------------------------------------------------------------------------

DIALOGUES: list[tuple[str, list[Step], list[str], list[str], dict[str, Any]]] = [
    (
        "greeting-multiline-then-ehlo",
        [b"220-mx.test ESMTP\r\n220-second line\r\n220 third\r\n", hello, EHLO_PIPE],
        ["EHLO client.test"],
        ["Greeting 220", "HelloAccepted EHLO"],
        {},
    ),
    (
        "greeting-lf-only-line-endings-accepted",
        [b"220-mx.test\n220 ok\n", hello, b"250 mx.test\n"],
        ["EHLO client.test"],
        ["Greeting 220", "HelloAccepted EHLO"],
        {},
    ),
    (
        "greeting-554-refused-then-quit",
        [b"554 5.7.1 go away\r\n", lambda c: c.quit(), b"221 2.0.0 Bye\r\n"],
        ["QUIT"],
        ["Greeting 554 5.7.1", "QUIT 221 2.0.0"],
        {},
    ),
    (
        "greeting-421-closes",
        [b"421 4.3.2 busy\r\n"],
        [],
        ["Greeting 421 4.3.2"],
        {},
    ),
    (
        "ehlo-502-falls-back-to-helo",
        [GREETING, hello, b"502 5.5.1 no EHLO\r\n", b"250 mx.test\r\n"],
        ["EHLO client.test", "HELO client.test"],
        ["Greeting 220", "HelloAccepted HELO"],
        {},
    ),
    (
        "ehlo-500-falls-back-helo-refused",
        [GREETING, hello, b"500 what\r\n", b"550 5.7.1 not you\r\n"],
        ["EHLO client.test", "HELO client.test"],
        ["Greeting 220", "HelloRejected 550 5.7.1"],
        {},
    ),
    (
        "ehlo-4xx-no-fallback",
        [GREETING, hello, b"451 4.3.0 try later\r\n"],
        ["EHLO client.test"],
        ["Greeting 220", "HelloRejected 451 4.3.0"],
        {},
    ),
    (
        "ehlo-421-closes",
        [GREETING, hello, BYE],
        ["EHLO client.test"],
        ["Greeting 220", "HelloRejected 421 4.3.2"],
        {},
    ),
    (
        "lhlo-in-lmtp-no-helo-fallback",
        [GREETING, hello, b"500 5.5.1 no\r\n"],
        ["LHLO client.test"],
        ["Greeting 220", "HelloRejected 500 5.5.1"],
        {"lmtp": True},
    ),
    (
        "pipelined-some-recipients-rejected",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test", "y@d.test", "z@d.test"),
            OK_MAIL + OK_RCPT + NO_USER + OK_RCPT + GO,
            body(b"Subject: hi\r\n\r\nbody\r\n"),
            QUEUED,
        ],
        [
            "EHLO client.test",
            "MAIL FROM:<a@s.test>",
            "RCPT TO:<x@d.test>",
            "RCPT TO:<y@d.test>",
            "RCPT TO:<z@d.test>",
            "DATA",
            "Subject: hi",
            "",
            "body",
            ".",
        ],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 250 2.1.5",
            "RcptReply 1 550 5.1.1",
            "RcptReply 2 250 2.1.5",
            "BodyRequested 354",
            "Done mail=250 2.1.0 [250 2.0.0, 550 5.1.1, 250 2.0.0]",
        ],
        {},
    ),
    (
        "pipelined-all-rejected-data-554-then-rset",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test", "y@d.test"),
            OK_MAIL + NO_USER + b"450 4.2.0 greylisted\r\n" + NO_RCPTS,
            OK,
        ],
        [
            "EHLO client.test",
            "MAIL FROM:<a@s.test>",
            "RCPT TO:<x@d.test>",
            "RCPT TO:<y@d.test>",
            "DATA",
            "RSET",
        ],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 550 5.1.1",
            "RcptReply 1 450 4.2.0",
            "Done mail=250 2.1.0 [550 5.1.1, 450 4.2.0]",
        ],
        {},
    ),
    (
        "pipelined-all-rejected-data-503-then-rset",
        [GREETING, hello, EHLO_PIPE, tx("x@d.test"), OK_MAIL + NO_USER + BAD_SEQ, OK],
        ["EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "DATA", "RSET"],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 550 5.1.1",
            "Done mail=250 2.1.0 [550 5.1.1]",
        ],
        {},
    ),
    (
        "pipelined-all-rejected-but-354-sends-empty-message",  # RFC 2920 §3.1
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test"),
            OK_MAIL + NO_USER + GO,
            b"554 5.5.1 no recipients\r\n",
        ],
        ["EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "DATA", "."],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 550 5.1.1",
            "Done mail=250 2.1.0 [550 5.1.1]",
        ],
        {},
    ),
    (
        "pipelined-mail-rejected-recipients-get-mail-reply",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test", "y@d.test"),
            b"553 5.7.1 sender refused\r\n" + BAD_SEQ + BAD_SEQ + BAD_SEQ,
        ],
        [
            "EHLO client.test",
            "MAIL FROM:<a@s.test>",
            "RCPT TO:<x@d.test>",
            "RCPT TO:<y@d.test>",
            "DATA",
        ],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 553 5.7.1",
            "RcptReply 0 503 5.5.1",
            "RcptReply 1 503 5.5.1",
            "Done mail=553 5.7.1 [553 5.7.1, 553 5.7.1]",
        ],
        {},
    ),
    (
        "pipelined-data-refused-after-accepted-recipient",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test"),
            OK_MAIL + OK_RCPT + b"554 5.7.1 no thanks\r\n",
            OK,
        ],
        ["EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "DATA", "RSET"],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 250 2.1.5",
            "Done mail=250 2.1.0 [554 5.7.1]",
        ],
        {},
    ),
    (
        "no-pipelining-one-command-at-a-time",
        [
            GREETING,
            hello,
            EHLO_PLAIN,
            tx("x@d.test", "y@d.test"),
            OK_MAIL,
            NO_USER,
            OK_RCPT,
            GO,
            body(b"hi\r\n"),
            QUEUED,
        ],
        [
            "EHLO client.test",
            "MAIL FROM:<a@s.test>",
            "RCPT TO:<x@d.test>",
            "RCPT TO:<y@d.test>",
            "DATA",
            "hi",
            ".",
        ],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 550 5.1.1",
            "RcptReply 1 250 2.1.5",
            "BodyRequested 354",
            "Done mail=250 2.1.0 [550 5.1.1, 250 2.0.0]",
        ],
        {},
    ),
    (
        "no-pipelining-mail-refused-nothing-more-sent",
        [GREETING, hello, EHLO_PLAIN, tx("x@d.test", "y@d.test"), b"451 4.3.0 later\r\n"],
        ["EHLO client.test", "MAIL FROM:<a@s.test>"],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 451 4.3.0",
            "Done mail=451 4.3.0 [451 4.3.0, 451 4.3.0]",
        ],
        {},
    ),
    (
        "no-pipelining-all-rejected-rset-no-data",
        [GREETING, hello, EHLO_PLAIN, tx("x@d.test"), OK_MAIL, NO_USER, OK],
        ["EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "RSET"],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 550 5.1.1",
            "Done mail=250 2.1.0 [550 5.1.1]",
        ],
        {},
    ),
    (
        "pipelining-offered-but-disabled",
        [GREETING, hello, EHLO_PIPE, tx("x@d.test"), OK_MAIL, OK_RCPT, GO, body(b""), QUEUED],
        ["EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "DATA", "."],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 250 2.1.5",
            "BodyRequested 354",
            "Done mail=250 2.1.0 [250 2.0.0]",
        ],
        {"use_pipelining": False},
    ),
    (
        "final-reply-temporary",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test"),
            OK_MAIL + OK_RCPT + GO,
            body(b"x\r\n"),
            b"451 4.3.0 disk full\r\n",
        ],
        ["EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "DATA", "x", "."],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 250 2.1.5",
            "BodyRequested 354",
            "Done mail=250 2.1.0 [451 4.3.0]",
        ],
        {},
    ),
    (
        "421-at-rcpt-ends-everything",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test", "y@d.test", "z@d.test"),
            OK_MAIL + NO_USER + OK_RCPT + BYE,
        ],
        [
            "EHLO client.test",
            "MAIL FROM:<a@s.test>",
            "RCPT TO:<x@d.test>",
            "RCPT TO:<y@d.test>",
            "RCPT TO:<z@d.test>",
            "DATA",
        ],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 550 5.1.1",
            "RcptReply 1 250 2.1.5",
            "Done mail=250 2.1.0 [550 5.1.1, 421 4.3.2, 421 4.3.2]",
        ],
        {},
    ),
    (
        "421-after-data",
        [GREETING, hello, EHLO_PIPE, tx("x@d.test"), OK_MAIL + OK_RCPT + GO, body(b"x\r\n"), BYE],
        ["EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "DATA", "x", "."],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 250 2.1.5",
            "BodyRequested 354",
            "Done mail=250 2.1.0 [421 4.3.2]",
        ],
        {},
    ),
    (
        "unsolicited-421-when-idle",
        [GREETING, hello, EHLO_PIPE, BYE],
        ["EHLO client.test"],
        ["Greeting 220", "HelloAccepted EHLO", "ServiceClosing 421 4.3.2"],
        {},
    ),
    (
        "unsolicited-reply-is-a-protocol-violation",
        [GREETING, hello, EHLO_PIPE, OK],
        ["EHLO client.test"],
        ["Greeting 220", "HelloAccepted EHLO", "ProtocolViolation"],
        {},
    ),
    (
        "early-reply-during-data-body",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test"),
            OK_MAIL + OK_RCPT + GO,
            body(b"x" * 10, last=False),
            b"552 5.3.4 too big\r\n",
        ],
        ["EHLO client.test", "MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "DATA"],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 250 2.1.5",
            "BodyRequested 354",
            "Done mail=250 2.1.0 [552 5.3.4]",
        ],
        {},
    ),
    (
        "eof-mid-transaction",
        [GREETING, hello, EHLO_PIPE, tx("x@d.test", "y@d.test"), OK_MAIL + NO_USER, b""],
        [
            "EHLO client.test",
            "MAIL FROM:<a@s.test>",
            "RCPT TO:<x@d.test>",
            "RCPT TO:<y@d.test>",
            "DATA",
        ],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 550 5.1.1",
            "Done mail=250 2.1.0 [550 5.1.1, 451 4.4.2] interrupted",
            "ConnectionClosed",
        ],
        {},
    ),
    (
        "rset-noop-quit",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            lambda c: c.rset(),
            OK,
            lambda c: c.noop(),
            OK,
            lambda c: c.quit(),
            b"221 2.0.0 Bye\r\n",
        ],
        ["EHLO client.test", "RSET", "NOOP", "QUIT"],
        [
            "Greeting 220",
            "HelloAccepted EHLO",
            "RSET 250 2.0.0",
            "NOOP 250 2.0.0",
            "QUIT 221 2.0.0",
        ],
        {},
    ),
    (
        "lmtp-per-recipient-replies",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test", "y@d.test", "z@d.test"),
            OK_MAIL + OK_RCPT + NO_USER + OK_RCPT + GO,
            body(b"hi\r\n"),
            b"250 2.0.0 <x@d.test> delivered\r\n",
            b"452 4.2.2 <z@d.test> mailbox full\r\n",
        ],
        [
            "LHLO client.test",
            "MAIL FROM:<a@s.test>",
            "RCPT TO:<x@d.test>",
            "RCPT TO:<y@d.test>",
            "RCPT TO:<z@d.test>",
            "DATA",
            "hi",
            ".",
        ],
        [
            "Greeting 220",
            "HelloAccepted LHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 250 2.1.5",
            "RcptReply 1 550 5.1.1",
            "RcptReply 2 250 2.1.5",
            "BodyRequested 354",
            "Done mail=250 2.1.0 [250 2.0.0, 550 5.1.1, 452 4.2.2]",
        ],
        {"lmtp": True},
    ),
    (
        "lmtp-421-among-per-recipient-replies",
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test", "y@d.test"),
            OK_MAIL + OK_RCPT + OK_RCPT + GO,
            body(b"hi\r\n"),
            b"250 2.0.0 ok\r\n" + BYE,
        ],
        [
            "LHLO client.test",
            "MAIL FROM:<a@s.test>",
            "RCPT TO:<x@d.test>",
            "RCPT TO:<y@d.test>",
            "DATA",
            "hi",
            ".",
        ],
        [
            "Greeting 220",
            "HelloAccepted LHLO",
            "MailReply 250 2.1.0",
            "RcptReply 0 250 2.1.5",
            "RcptReply 1 250 2.1.5",
            "BodyRequested 354",
            "Done mail=250 2.1.0 [250 2.0.0, 421 4.3.2]",
        ],
        {"lmtp": True},
    ),
    (
        "starttls-drops-injected-plaintext",
        [
            GREETING,
            hello,
            b"250-mx.test\r\n250-STARTTLS\r\n250 PIPELINING\r\n",
            lambda c: c.starttls(),
            b"220 2.0.0 Ready\r\n250-INJECTED\r\n",
            b"250 more injection\r\n",
            lambda c: c.tls_established(),
            hello,
            b"250-mx.test\r\n250 AUTH PLAIN\r\n",
        ],
        ["EHLO client.test", "STARTTLS", "EHLO client.test"],
        ["Greeting 220", "HelloAccepted EHLO", "StartTlsReply 220 2.0.0", "HelloAccepted EHLO"],
        {},
    ),
    (
        "starttls-refused-stays-ready",
        [
            GREETING,
            hello,
            b"250-mx.test\r\n250 STARTTLS\r\n",
            lambda c: c.starttls(),
            b"454 4.7.0 TLS not available\r\n",
            lambda c: c.noop(),
            OK,
        ],
        ["EHLO client.test", "STARTTLS", "NOOP"],
        ["Greeting 220", "HelloAccepted EHLO", "StartTlsReply 454 4.7.0", "NOOP 250 2.0.0"],
        {},
    ),
    (
        "auth-plain-initial-response",
        [
            GREETING,
            hello,
            b"250-mx.test\r\n250 AUTH PLAIN LOGIN\r\n",
            lambda c: c.auth("PLAIN", "joe", "secret"),
            b"235 2.7.0 Authenticated\r\n",
        ],
        ["EHLO client.test", "AUTH PLAIN AGpvZQBzZWNyZXQ="],
        ["Greeting 220", "HelloAccepted EHLO", "AuthReply 235 2.7.0"],
        {},
    ),
    (
        "auth-login-challenges",
        [
            GREETING,
            hello,
            b"250-mx.test\r\n250 AUTH LOGIN\r\n",
            lambda c: c.auth("LOGIN", "joe", "secret"),
            b"334 VXNlcm5hbWU6\r\n",
            b"334 UGFzc3dvcmQ6\r\n",
            b"235 2.7.0 Authenticated\r\n",
        ],
        ["EHLO client.test", "AUTH LOGIN", "am9l", "c2VjcmV0"],
        ["Greeting 220", "HelloAccepted EHLO", "AuthReply 235 2.7.0"],
        {},
    ),
    (
        "auth-login-extra-challenge-cancelled",
        [
            GREETING,
            hello,
            b"250-mx.test\r\n250 AUTH LOGIN\r\n",
            lambda c: c.auth("LOGIN", "joe", "secret"),
            b"334 VXNlcm5hbWU6\r\n",
            b"334 UGFzc3dvcmQ6\r\n",
            b"334 what\r\n",
            b"501 5.7.0 cancelled\r\n",
        ],
        ["EHLO client.test", "AUTH LOGIN", "am9l", "c2VjcmV0", "*"],
        ["Greeting 220", "HelloAccepted EHLO", "AuthReply 501 5.7.0"],
        {},
    ),
    (
        "auth-failed",
        [
            GREETING,
            hello,
            b"250-mx.test\r\n250 AUTH PLAIN\r\n",
            lambda c: c.auth("PLAIN", "joe", "bad"),
            b"535 5.7.8 Authentication failed\r\n",
        ],
        ["EHLO client.test", "AUTH PLAIN AGpvZQBiYWQ="],
        ["Greeting 220", "HelloAccepted EHLO", "AuthReply 535 5.7.8"],
        {},
    ),
]


@pytest.mark.parametrize(
    ("steps", "expect_lines", "expect_events", "settings"),
    [pytest.param(*case[1:], id=case[0]) for case in DIALOGUES],
)
def test_dialogue(
    steps: list[Step], expect_lines: list[str], expect_events: list[str], settings: dict[str, Any]
) -> None:
    out, events, _ = transcript(steps, **settings)
    assert lines(out) == expect_lines
    assert events == expect_events


# --- pipelining: writes, not just bytes ------------------------------------------------


def test_pipelined_envelope_goes_in_one_write() -> None:
    writes, _, _ = run([GREETING, hello, EHLO_PIPE, tx("x@d.test", "y@d.test")])
    assert writes[-1] == (
        b"MAIL FROM:<a@s.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\nDATA\r\n"
    )


def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    writes, _, _ = run([GREETING, hello, EHLO_PLAIN, tx("x@d.test", "y@d.test"), OK_MAIL, OK_RCPT])
    assert writes[1:] == [
        b"MAIL FROM:<a@s.test>\r\n",
        b"RCPT TO:<x@d.test>\r\n",
        b"RCPT TO:<y@d.test>\r\n",
    ]


# --- reply parsing -------------------------------------------------------------------------

REPLIES: list[tuple[bytes, int, str | None, tuple[str, ...]]] = [
    (b"220 mx.test ESMTP\r\n", 220, None, ("mx.test ESMTP",)),
    (b"220\r\n", 220, None, ("",)),
    (b"220-\r\n220 x\r\n", 220, None, ("", "x")),
    (b"250 2.1.0 Sender ok\r\n", 250, "2.1.0", ("Sender ok",)),
    (b"250 2.1.0\r\n", 250, "2.1.0", ("",)),
    (b"550 2.1.0 class mismatch\r\n", 550, None, ("2.1.0 class mismatch",)),
    (b"550-5.1.1 first\r\n550 5.1.1 second\r\n", 550, "5.1.1", ("first", "second")),
    (b"550-5.1.1 first\r\n550 second\r\n", 550, "5.1.1", ("first", "second")),
    (b"451 4.7.1   spaces\r\n", 451, "4.7.1", ("spaces",)),
    (b"250 2.0.00 not a status\r\n", 250, "2.0.00", ("not a status",)),
    (b"250 12.0.0 not a status\r\n", 250, None, ("12.0.0 not a status",)),
    (b"554 5.7.1 \xff\xfe bad utf8\r\n", 554, "5.7.1", ("\ufffd\ufffd bad utf8",)),
    (b"554 bare\rcr\r\n", 554, None, ("bare?cr",)),
]


@pytest.mark.parametrize(("raw", "code", "status", "texts"), REPLIES)
def test_reply_parsing(raw: bytes, code: int, status: str | None, texts: tuple[str, ...]) -> None:
    conn = ClientConnection("client.test")
    conn.receive_data(raw)
    ev = conn.next_event()
    assert isinstance(ev, Greeting)
    assert (ev.reply.code, ev.reply.status, ev.reply.lines) == (code, status, texts)
    _, events, _ = transcript([raw])  # the same whole, byte by byte, in halves, trailing
    assert events == [show(ev)]


MALFORMED: list[tuple[str, bytes]] = [
    ("short", b"22\r\n"),
    ("letters", b"abc hello\r\n"),
    ("no-separator", b"220x\r\n"),
    ("tab-separator", b"220\tx\r\n"),
    ("code-600", b"600 x\r\n"),
    ("code-1xx", b"199 x\r\n"),
    ("code-260", b"260 x\r\n"),  # second digit > 5 is not a reply code
    ("empty-line", b"\r\n"),
    ("code-changes", b"220-a\r\n250 b\r\n"),
    ("line-too-long", b"220 " + b"x" * MAX_REPLY_LINE + b"\r\n"),
    ("too-many-lines", b"220-x\r\n" * MAX_REPLY_LINES + b"220 x\r\n"),
]


@pytest.mark.parametrize("raw", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_reply_is_a_protocol_violation(raw: bytes) -> None:
    _, events, conn = transcript([raw])
    assert events == ["ProtocolViolation"]
    assert conn.closing


def test_long_reply_within_limits_is_fine() -> None:
    raw = b"220-" + b"x" * (MAX_REPLY_LINE - 10) + b"\r\n" + b"220-x\r\n" * (MAX_REPLY_LINES - 2)
    _, events, _ = transcript([raw + b"220 end\r\n"])
    assert events == ["Greeting 220"]


def test_protocol_violation_mid_transaction_interrupts_it() -> None:
    _, events, conn = transcript(
        [GREETING, hello, EHLO_PIPE, tx("x@d.test"), OK_MAIL + b"hello there\r\n"]
    )
    assert events[-2:] == ["Done mail=250 2.1.0 [451 4.5.0] interrupted", "ProtocolViolation"]
    assert conn.closing


def test_second_digit_must_be_0_to_5() -> None:
    conn = ClientConnection("c.test")
    conn.receive_data(b"270 x\r\n")
    assert isinstance(conn.next_event(), ProtocolViolation)


# --- EHLO parsing ------------------------------------------------------------------------


def test_ehlo_keywords_upper_cased_with_values() -> None:
    ext = Extensions.parse_ehlo(
        (
            "mx.test greets you",
            "pipelining",
            "Size 35882577",
            "8BITMIME",
            "AUTH PLAIN login",
            "AUTH=CRAM-MD5 XOAUTH2",
            "STARTTLS",
            "X-EXPS  GSSAPI   NTLM",
            "!bad keyword",
            "",
        )
    )
    assert dict(ext) == {
        "PIPELINING": "",
        "SIZE": "35882577",
        "8BITMIME": "",
        "AUTH": "PLAIN login",
        "AUTH=": "CRAM-MD5 XOAUTH2",
        "STARTTLS": "",
        "X-EXPS": "GSSAPI NTLM",
    }
    assert "pipelining" in ext and ext["size"] == "35882577"
    assert ext.size == 35882577
    assert ext.auth_mechanisms == {"PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"}


@pytest.mark.parametrize(
    ("lines_", "size"),
    [
        ((), None),
        (("SIZE",), 0),
        (("SIZE 0",), 0),
        (("SIZE abc",), 0),
        (("SIZE 1000",), 1000),
    ],
)
def test_ehlo_size(lines_: tuple[str, ...], size: int | None) -> None:
    assert Extensions.parse_ehlo(("mx", *lines_)).size == size


def test_helo_session_has_no_extensions() -> None:
    _, _, conn = transcript([GREETING, hello, b"502 no\r\n", b"250 mx.test\r\n"])
    assert not conn.esmtp and len(conn.extensions) == 0 and conn.state is ClientState.READY


# --- MAIL and RCPT parameters --------------------------------------------------------------


def envelope(
    ehlo: bytes,
    *rcpts: tuple[str, RcptParams],
    sender: str = "a@s.test",
    params: MailParams | None = None,
    **kw: Any,
) -> list[str]:
    conn = ClientConnection("client.test")
    conn.receive_data(GREETING + b"")
    conn.next_event()
    conn.hello()
    conn.receive_data(ehlo)
    conn.next_event()
    conn.data_to_send()
    conn.start_transaction(sender, params or MailParams(), list(rcpts), **kw)
    return lines(conn.data_to_send())


DSN_RCPT = RcptParams(
    notify=frozenset({"DELAY", "FAILURE", "SUCCESS"}), orcpt="rfc822;Jo=e+x@d.test"
)
DSN_MAIL = MailParams(ret=DsnRet.HDRS, envid="id 42=")


def test_all_parameters_when_offered() -> None:
    got = envelope(
        EHLO_FULL,
        ("x@d.test", DSN_RCPT),
        ("y@d.test", RcptParams()),
        params=DSN_MAIL,
        size=1234,
        eight_bit=True,
    )
    assert got == [
        "MAIL FROM:<a@s.test> SIZE=1234 BODY=8BITMIME RET=HDRS ENVID=id+2042+3D",
        "RCPT TO:<x@d.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;Jo+3De+2Bx@d.test",
        "RCPT TO:<y@d.test>",
    ]  # CHUNKING offered: no DATA in the pipeline


def test_no_parameters_when_not_offered() -> None:
    got = envelope(
        EHLO_PIPE.replace(b"250-8BITMIME\r\n", b""),
        ("x@d.test", DSN_RCPT),
        params=DSN_MAIL,
        size=1234,
        eight_bit=True,
    )
    assert got == ["MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>", "DATA"]


def test_null_sender_and_notify_never() -> None:
    got = envelope(EHLO_FULL, ("x@d.test", RcptParams(notify=frozenset({"NEVER"}))), sender="")
    assert got == ["MAIL FROM:<>", "RCPT TO:<x@d.test> NOTIFY=NEVER"]


def test_body_8bitmime_from_params_and_binarymime() -> None:
    assert envelope(
        EHLO_FULL, ("x@d.test", RcptParams()), params=MailParams(body=BodyType.EIGHT_BIT_MIME)
    )[0].endswith("BODY=8BITMIME")
    ehlo = EHLO_FULL.replace(b"250-CHUNKING", b"250-CHUNKING\r\n250-BINARYMIME")
    assert envelope(ehlo, ("x@d.test", RcptParams()), params=MailParams(body=BodyType.BINARY_MIME))[
        0
    ].endswith("BODY=BINARYMIME")
    # BINARYMIME not offered: declared as 8BITMIME, sent as it is.
    assert envelope(
        EHLO_FULL, ("x@d.test", RcptParams()), params=MailParams(body=BodyType.BINARY_MIME)
    )[0].endswith("BODY=8BITMIME")


def test_smtputf8_when_needed_and_offered() -> None:
    got = envelope(EHLO_FULL, ("jösé@d.test", RcptParams()))
    assert got[0] == "MAIL FROM:<a@s.test> SMTPUTF8"
    got = envelope(EHLO_FULL, ("x@d.test", RcptParams()), needs_smtputf8=True)
    assert got[0] == "MAIL FROM:<a@s.test> SMTPUTF8"


@pytest.mark.parametrize("kw", [{"needs_smtputf8": True}, {}])
def test_smtputf8_needed_but_not_offered_refused_locally(kw: dict[str, Any]) -> None:
    rcpt = "x@d.test" if kw else "jösé@d.test"
    steps: list[Step] = [GREETING, hello, EHLO_PIPE, tx(rcpt, "y@d.test", **kw)]
    out, events, conn = transcript(steps)
    assert lines(out) == ["EHLO client.test"]  # nothing sent
    assert events[-1] == "Done mail=- [550 5.6.7, 550 5.6.7]"
    assert conn.state is ClientState.READY


def test_smtputf8_flag_alone_is_no_need() -> None:
    """An all-ASCII envelope with the SMTPUTF8 flag goes to a server without
    SMTPUTF8 (nothing to downgrade); the flag is said where it is offered."""
    got = envelope(EHLO_PIPE, ("x@d.test", RcptParams()), smtputf8=True)
    assert got[:2] == ["MAIL FROM:<a@s.test>", "RCPT TO:<x@d.test>"]
    got = envelope(EHLO_FULL, ("x@d.test", RcptParams()), smtputf8=True)
    assert got[0] == "MAIL FROM:<a@s.test> SMTPUTF8"


def test_u_label_domains_go_as_a_labels_without_smtputf8() -> None:
    """IDNA 2008 (faß.de is xn--fa-hia.de, not fass.de), sender and recipients alike;
    with SMTPUTF8 offered the U-labels go as they are."""
    got = envelope(EHLO_PIPE, ("user@faß.de", RcptParams()), sender="ann@bücher.test")
    assert got[:2] == ["MAIL FROM:<ann@xn--bcher-kva.test>", "RCPT TO:<user@xn--fa-hia.de>"]
    got = envelope(EHLO_FULL, ("user@faß.de", RcptParams()))
    assert got[:2] == ["MAIL FROM:<a@s.test> SMTPUTF8", "RCPT TO:<user@faß.de>"]


def test_requiretls_sent_when_offered() -> None:
    """RFC 8689 §4.2.1: a REQUIRETLS message says so on MAIL to a server offering it."""
    ehlo = EHLO_FULL.replace(b"250-CHUNKING", b"250-CHUNKING\r\n250-REQUIRETLS")
    got = envelope(ehlo, ("x@d.test", RcptParams()), params=MailParams(requiretls=True))
    assert got[0] == "MAIL FROM:<a@s.test> REQUIRETLS"
    # Without the flag the keyword is never sent, offered or not.
    assert envelope(ehlo, ("x@d.test", RcptParams()))[0] == "MAIL FROM:<a@s.test>"


def test_requiretls_not_offered_refused_locally() -> None:
    """No silent downgrade: nothing is sent, every recipient gets 550 5.7.30."""
    conn = ClientConnection("client.test")
    conn.receive_data(GREETING)
    conn.next_event()
    conn.hello()
    conn.receive_data(EHLO_FULL)
    conn.next_event()
    conn.data_to_send()
    params = MailParams(requiretls=True)
    conn.start_transaction("a@s.test", params, [("x@d.test", RcptParams())] * 2)
    assert conn.data_to_send() == b""
    done = conn.next_event()
    assert isinstance(done, TransactionDone)
    assert [(r.code, r.status) for r in done.per_recipient] == [(550, "5.7.30")] * 2
    assert conn.state is ClientState.READY


def test_size_over_the_servers_limit_refused_locally() -> None:
    out, events, _ = transcript([GREETING, hello, EHLO_FULL, tx("x@d.test", size=10001)])
    assert lines(out) == ["EHLO client.test"]
    assert events[-1] == "Done mail=- [552 5.3.4]"


def test_smtputf8_refusal_text() -> None:
    conn = ClientConnection("c.test")
    conn.receive_data(GREETING)
    conn.next_event()
    conn.hello()
    conn.receive_data(EHLO_PIPE)
    conn.next_event()
    conn.start_transaction(
        "a@s.test", MailParams(), [("x@d.test", RcptParams())], needs_smtputf8=True
    )
    done = conn.next_event()
    assert isinstance(done, TransactionDone)
    assert "SMTPUTF8 not supported by remote server" in done.per_recipient[0].text


# --- BDAT ----------------------------------------------------------------------------------


def test_bdat_pipelined_chunks() -> None:
    out, events, _ = transcript(
        [
            GREETING,
            hello,
            EHLO_CHUNKING,
            tx("x@d.test", "y@d.test"),
            OK_MAIL + OK_RCPT + NO_USER,
            body(b"abc\r\n.", last=False),
            body(b"", last=False),
            body(b"de\r\n", last=True),
            b"250 2.0.0 5 octets\r\n" + QUEUED,
        ]
    )
    assert out == (
        GREETING[:0] + b"EHLO client.test\r\nMAIL FROM:<a@s.test>\r\n"
        b"RCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\n"
        b"BDAT 6\r\nabc\r\n.BDAT 4 LAST\r\nde\r\n"
    )
    assert events[2:] == [
        "MailReply 250 2.1.0",
        "RcptReply 0 250 2.1.5",
        "RcptReply 1 550 5.1.1",
        "BodyRequested -",
        "ChunkReply",
        "Done mail=250 2.1.0 [250 2.0.0, 550 5.1.1]",
    ]


def test_bdat_without_pipelining_waits_for_each_chunk_reply() -> None:
    conn = ClientConnection("c.test")
    for step in (GREETING, EHLO_CHUNKING_NOPIPE):
        if step is EHLO_CHUNKING_NOPIPE:
            conn.hello()
        conn.receive_data(step)
        conn.next_event()
    conn.start_transaction("a@s.test", MailParams(), [("x@d.test", RcptParams())])
    conn.receive_data(OK_MAIL)
    assert isinstance(conn.next_event(), MailReply)
    conn.receive_data(OK_RCPT)
    assert isinstance(conn.next_event(), RcptReply)
    assert isinstance(conn.next_event(), BodyRequested)
    assert conn.can_send_body
    conn.send_body(b"abc")
    assert (conn.can_send_body, conn.body_wanted) == (False, True)
    with pytest.raises(RuntimeError):
        conn.send_body(b"def")
    conn.receive_data(b"250 2.0.0 3 octets\r\n")
    assert conn.next_event() is not NEED_DATA
    assert conn.can_send_body
    conn.send_body(b"", last=True)
    conn.data_to_send()
    assert conn.data_to_send() == b""


def test_bdat_refused_chunk_ends_body_and_resets() -> None:
    out, events, conn = transcript(
        [
            GREETING,
            hello,
            EHLO_CHUNKING,
            tx("x@d.test"),
            OK_MAIL + OK_RCPT,
            body(b"abc", last=False),
            body(b"def", last=False),
            b"552 5.3.4 too big\r\n" + BAD_SEQ,
            OK,
        ]
    )
    assert out.endswith(b"BDAT 3\r\nabcBDAT 3\r\ndefRSET\r\n")
    assert b"LAST" not in out
    assert events[-1] == "Done mail=250 2.1.0 [552 5.3.4]"
    assert conn.state is ClientState.READY


def test_bdat_refused_chunk_with_last_already_pipelined() -> None:
    out, events, _ = transcript(
        [
            GREETING,
            hello,
            EHLO_CHUNKING,
            tx("x@d.test"),
            OK_MAIL + OK_RCPT,
            body(b"abc", last=False),
            body(b"def", last=True),
            b"552 5.3.4 too big\r\n" + BAD_SEQ,
            OK,
        ]
    )
    assert out.endswith(b"BDAT 3\r\nabcBDAT 3 LAST\r\ndefRSET\r\n")
    assert events[-1] == "Done mail=250 2.1.0 [552 5.3.4]"


def test_body_wanted_false_after_refused_chunk() -> None:
    _, _, conn = run(
        [
            GREETING,
            hello,
            EHLO_CHUNKING,
            tx("x@d.test"),
            OK_MAIL + OK_RCPT,
            body(b"abc", last=False),
            b"554 5.6.0 bad\r\n",
        ]
    )
    assert not conn.body_wanted and not conn.can_send_body
    with pytest.raises(RuntimeError):
        conn.send_body(b"more")


def test_lmtp_bdat_last_waits_for_chunk_replies() -> None:
    writes, events, _ = run(
        [
            GREETING,
            hello,
            EHLO_CHUNKING,
            tx("x@d.test", "y@d.test"),
            OK_MAIL + OK_RCPT + OK_RCPT,
            body(b"abc", last=False),
            body(b"de", last=True),
            b"250 2.0.0 3 octets\r\n",
            OK + b"452 4.2.2 full\r\n",
        ],
        lmtp=True,
    )
    assert writes[-2:] == [b"BDAT 3\r\nabc", b"BDAT 2 LAST\r\nde"]
    assert events[-1] == "Done mail=250 2.1.0 [250 2.0.0, 452 4.2.2]"


def test_lmtp_bdat_refused_chunk_last_never_sent() -> None:
    out, events, _ = transcript(
        [
            GREETING,
            hello,
            EHLO_CHUNKING,
            tx("x@d.test", "y@d.test"),
            OK_MAIL + OK_RCPT + OK_RCPT,
            body(b"abc", last=False),
            body(b"de", last=True),
            b"452 4.3.1 disk full\r\n",
            OK,
        ],
        lmtp=True,
    )
    assert b"LAST" not in out and out.endswith(b"RSET\r\n")
    assert events[-1] == "Done mail=250 2.1.0 [452 4.3.1, 452 4.3.1]"


def test_chunking_offered_but_disabled_uses_data() -> None:
    out, _, _ = transcript([GREETING, hello, EHLO_CHUNKING, tx("x@d.test")], use_chunking=False)
    assert lines(out)[-1] == "DATA"


# --- the adapter's API contract -----------------------------------------------------------


def test_commands_out_of_state_raise_runtime_error() -> None:
    conn = ClientConnection("c.test")
    with pytest.raises(RuntimeError):
        conn.hello()  # before the greeting
    conn.receive_data(GREETING)
    conn.next_event()
    calls: list[Callable[[], object]] = [
        lambda: conn.starttls(),
        lambda: conn.send_body(b"x"),
        lambda: conn.start_transaction("a@b", MailParams(), [("c@d", RcptParams())]),
        lambda: conn.tls_established(),
        lambda: conn.rset(),
    ]
    for call in calls:
        with pytest.raises(RuntimeError):
            call()


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError):
        ClientConnection("bad name")
    _, _, conn = run([GREETING, hello, EHLO_PIPE])
    with pytest.raises(ValueError):
        conn.start_transaction("a@s.test\r\nRSET", MailParams(), [("x@d.test", RcptParams())])
    with pytest.raises(ValueError):
        conn.start_transaction("a@s.test", MailParams(), [])
    with pytest.raises(ValueError):
        conn.auth("CRAM-MD5", "u", "p")
    assert conn.state is ClientState.READY
    assert conn.data_to_send() == b""


def test_receive_after_eof_is_a_programming_error() -> None:
    conn = ClientConnection("c.test")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.next_event() is NEED_DATA
    with pytest.raises(RuntimeError):
        conn.receive_data(b"220 x\r\n")


def test_after_close_only_need_data() -> None:
    _, _, conn = run([BYE])
    assert conn.closing
    conn.receive_data(b"250 ignored\r\n")
    assert conn.next_event() is NEED_DATA


def test_extensions_reset_by_tls_established() -> None:
    _, _, conn = run(
        [
            GREETING,
            hello,
            b"250-mx.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n",
            lambda c: c.starttls(),
            b"220 go\r\n",
        ]
    )
    assert conn.state == ClientState.TLS
    conn.tls_established()
    assert (len(conn.extensions), conn.state) == (0, ClientState.GREETED)


def test_new_transaction_after_done() -> None:
    _, events, conn = transcript(
        [
            GREETING,
            hello,
            EHLO_PIPE,
            tx("x@d.test"),
            OK_MAIL + OK_RCPT + GO,
            body(b"1\r\n"),
            QUEUED,
            tx("y@d.test"),
            OK_MAIL + OK_RCPT + GO,
            body(b"2\r\n"),
            QUEUED,
        ]
    )
    assert events.count("Done mail=250 2.1.0 [250 2.0.0]") == 2
    assert conn.state is ClientState.READY


def test_tx_rset_refused_leaves_session_refused() -> None:
    _, events, conn = transcript(
        [GREETING, hello, EHLO_PIPE, tx("x@d.test"), OK_MAIL + NO_USER + NO_RCPTS, b"500 what\r\n"]
    )
    assert events[-1] == "Done mail=250 2.1.0 [550 5.1.1]"
    assert conn.state is ClientState.REFUSED


def test_421_to_tx_rset_reports_service_closing() -> None:
    _, events, conn = transcript(
        [GREETING, hello, EHLO_PIPE, tx("x@d.test"), OK_MAIL + NO_USER + NO_RCPTS, BYE]
    )
    assert events[-2:] == ["Done mail=250 2.1.0 [550 5.1.1]", "ServiceClosing 421 4.3.2"]
    assert conn.closing


@pytest.mark.parametrize("code", [b"500", b"502", b"504", b"550", b"554"])
def test_helo_fallback_on_any_5xx_to_ehlo(code: bytes) -> None:
    out, events, _ = transcript([GREETING, hello, code + b" no\r\n", b"250 mx.test\r\n"])
    assert lines(out) == ["EHLO client.test", "HELO client.test"]
    assert events[-1] == "HelloAccepted HELO"


# --- no server input makes the core raise ------------------------------------------------

SERVER_LINES = [
    b"220 mx\r\n",
    b"250 2.0.0 ok\r\n",
    b"250-mx\r\n",
    b"250-PIPELINING\r\n",
    b"250-CHUNKING\r\n",
    b"250-SMTPUTF8\r\n",
    b"250-SIZE 10\r\n",
    b"250 DSN\r\n",
    b"354 go\r\n",
    b"334 VXNlcm5hbWU6\r\n",
    b"421 4.3.2 bye\r\n",
    b"450 4.0.0 later\r\n",
    b"550 5.1.1 no\r\n",
    b"503 5.5.1 seq\r\n",
    b"221 bye\r\n",
    b"235 ok\r\n",
    b"garbage\r\n",
    b"250",
    b"\r\n",
    b"\n",
    b"",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(SERVER_LINES), max_size=30),
    st.booleans(),
    st.booleans(),
    st.integers(1, 7),
)
def test_any_server_input_gives_events_never_exceptions(
    replies: list[bytes],
    lmtp: bool,
    body_first: bool,
    cut: int,
) -> None:
    """A simple adapter reacts to every event; only NEED_DATA or events come back."""
    conn = ClientConnection("c.test", lmtp=lmtp)
    data = b"".join(replies)
    actions = 0  # a refusal without I/O (SMTPUTF8) must not make the adapter loop forever
    for i in range(0, len(data) + 1, cut):
        conn.receive_data(data[i : i + cut] if i < len(data) else b"")
        steps = 0
        while (ev := conn.next_event()) is not NEED_DATA:
            steps += 1
            assert steps < 1000, f"event loop does not settle: {ev!r} in {conn.state}"
            assert isinstance(ev, ClientEvent)
            state = conn.state
            if state is ClientState.GREETED:
                conn.hello()
            elif state is ClientState.READY and actions < 3:
                actions += 1
                if body_first:
                    conn.start_transaction(
                        "a@b.test",
                        MailParams(),
                        [("c@d.test", RcptParams()), ("é@d.test", RcptParams())],
                        size=100,
                    )
                else:
                    conn.auth("LOGIN", "u", "p")
            elif state is ClientState.TLS:
                conn.tls_established()
            if conn.can_send_body:
                conn.send_body(b".x\r\n")
            if conn.can_send_body:
                conn.send_body(b"end", last=True)
            conn.data_to_send()
        if conn.closing:
            break
