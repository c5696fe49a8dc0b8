"""SmtpClientSession against Postfix's smtp-sink, a real (if minimal) SMTP/LMTP server.

    SmtpClientSession ──SMTP or LMTP (TCP 127.0.0.1, or a unix socket)──▶ smtp-sink ──▶ dump files

smtp-sink (Debian package postfix; ``scripts/install-system-deps.sh``) answers
every command, offers PIPELINING, 8BITMIME, DSN and ENHANCEDSTATUSCODES, and can
be told to refuse (-f 5xx, -r 4xx), to drop the connection (-q) or to send 421
(-Q) after a given command. With -d it writes each transaction to a file: the
MAIL and RCPT arguments, then the content dot-unstuffed, lines ending in LF.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import pytest

from postillon.core.envelope import DsnRet, MailParams, RcptParams
from postillon.outbound.client_session import ClientTimeouts, SessionError, SmtpClientSession

if TYPE_CHECKING:
    from sink_fixtures import Sink

pytestmark = pytest.mark.integration

FAST = ClientTimeouts(connect=5, greeting=5, command=5, data_block=5, data_end=5)


async def pieces(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


MESSAGE = (
    b"From: a@s.test\r\nTo: x@d.test\r\nSubject: sink\r\n\r\n"
    b".leading dot\r\n.\r\n..\r\nplain line\r\n"
)


def expect_dump_content(text: str, message: bytes) -> None:
    content = message.replace(b"\r\n", b"\n").decode()
    assert content in text, text


async def connect(sink: Sink, **kw: object) -> SmtpClientSession:
    return await SmtpClientSession.connect(
        "127.0.0.1", sink.port, helo_name="client.test", timeouts=FAST, **kw
    )  # type: ignore[arg-type]


async def test_send_to_smtp_sink_with_dsn_and_8bitmime(sink: Callable[..., Sink]) -> None:
    server = sink()
    session = await connect(server)
    assert session.peer == f"127.0.0.1[127.0.0.1]:{server.port}"
    assert session.tls == "" and "PIPELINING" in session.extensions
    message = MESSAGE + "8-bit: héllo\r\n".encode()
    rcpt = RcptParams(notify=frozenset({"FAILURE", "DELAY"}), orcpt="rfc822;x@d.test")
    result = await session.send(
        "a@s.test",
        MailParams(ret=DsnRet.HDRS, envid="e1"),
        [("x@d.test", rcpt), ("y@d.test", RcptParams())],
        pieces(message, 7),
        len(message),
        eight_bit=True,
    )
    assert [r.code for r in result.per_recipient] == [250, 250]
    assert result.mail_reply is not None and result.mail_reply.code == 250
    assert session.usable and session.messages_sent == 1
    await session.quit()
    (text,) = server.dumps(1)
    assert "X-Mail-Args: <a@s.test> BODY=8BITMIME RET=HDRS ENVID=e1" in text
    assert "X-Rcpt-Args: <x@d.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;x@d.test" in text
    assert "X-Rcpt-Args: <y@d.test>\n" in text
    expect_dump_content(text, message)


async def test_several_transactions_on_one_connection(sink: Callable[..., Sink]) -> None:
    server = sink()
    session = await connect(server)
    for i in range(3):
        body = MESSAGE + f"message {i}\r\n".encode()
        result = await session.send(
            "", MailParams(), [(f"r{i}@d.test", RcptParams())], pieces(body), len(body)
        )
        assert result.per_recipient[0].code == 250
    assert (session.messages_sent, session.usable) == (3, True)
    await session.reset()
    await session.quit()
    assert not session.usable
    texts = server.dumps(3)
    assert len(texts) == 3
    assert all("X-Mail-Args: <>" in t for t in texts)


async def test_no_pipelining_and_no_8bitmime(sink: Callable[..., Sink]) -> None:
    server = sink("-p", "-8")
    session = await connect(server)
    assert "PIPELINING" not in session.extensions
    result = await session.send(
        "a@s.test",
        MailParams(),
        [("x@d.test", RcptParams()), ("y@d.test", RcptParams())],
        pieces(MESSAGE),
        len(MESSAGE),
        eight_bit=True,
    )
    assert [r.code for r in result.per_recipient] == [250, 250]
    await session.quit()
    (text,) = server.dumps(1)
    assert "X-Mail-Args: <a@s.test>\n" in text  # no BODY= without 8BITMIME


async def test_recipients_refused_no_data_session_still_usable(
    sink: Callable[..., Sink],
) -> None:
    server = sink("-r", "RCPT")
    session = await connect(server)
    result = await session.send(
        "a@s.test",
        MailParams(),
        [("x@d.test", RcptParams()), ("y@d.test", RcptParams())],
        pieces(MESSAGE),
        len(MESSAGE),
    )
    assert [(r.code, r.status) for r in result.per_recipient] == [(450, "4.3.0")] * 2
    assert session.messages_sent == 0 and session.usable
    result = await session.send(
        "a@s.test", MailParams(), [("z@d.test", RcptParams())], pieces(MESSAGE), len(MESSAGE)
    )
    assert result.per_recipient[0].code == 450
    await session.quit()


async def test_end_of_data_refused(sink: Callable[..., Sink]) -> None:
    server = sink("-f", ".")
    session = await connect(server)
    result = await session.send(
        "a@s.test", MailParams(), [("x@d.test", RcptParams())], pieces(MESSAGE), len(MESSAGE)
    )
    assert (result.per_recipient[0].code, result.per_recipient[0].status) == (500, "5.3.0")
    await session.quit()


async def test_421_at_rcpt(sink: Callable[..., Sink]) -> None:
    server = sink("-Q", "RCPT")
    session = await connect(server)
    result = await session.send(
        "a@s.test",
        MailParams(),
        [("x@d.test", RcptParams()), ("y@d.test", RcptParams())],
        pieces(MESSAGE),
        len(MESSAGE),
    )
    assert [r.code for r in result.per_recipient] == [421, 421]
    assert not session.usable
    await session.quit()  # never raises


async def test_connection_dropped_at_data(sink: Callable[..., Sink]) -> None:
    server = sink("-q", "DATA")
    session = await connect(server)
    with pytest.raises(SessionError) as info:
        await session.send(
            "a@s.test", MailParams(), [("x@d.test", RcptParams())], pieces(MESSAGE), len(MESSAGE)
        )
    assert not info.value.permanent
    assert info.value.partial is not None
    assert [r.code for r in info.value.partial.per_recipient] == [451]
    assert not session.usable
    await session.quit()


async def test_refused_greeting_is_permanent(sink: Callable[..., Sink]) -> None:
    server = sink("-f", "CONNECT")
    with pytest.raises(SessionError) as info:
        await connect(server)
    assert info.value.permanent
    assert info.value.reply is not None and info.value.reply.code == 500


async def test_ehlo_refused_helo_fallback(sink: Callable[..., Sink]) -> None:
    server = sink("-e")
    session = await connect(server)
    assert len(session.extensions) == 0
    result = await session.send(
        "a@s.test", MailParams(), [("x@d.test", RcptParams())], pieces(MESSAGE), len(MESSAGE)
    )
    assert result.per_recipient[0].code == 250
    await session.quit()
    (text,) = server.dumps(1)
    assert "X-Client-Proto: SMTP" in text


async def test_required_tls_without_starttls(sink: Callable[..., Sink]) -> None:
    server = sink()
    with pytest.raises(SessionError) as info:
        await connect(server, starttls="required")
    assert not info.value.permanent
    assert "TLS required" in info.value.detail


async def test_lmtp_over_unix_socket(sink: Callable[..., Sink]) -> None:
    server = sink("-L", unix=True)
    assert server.unix is not None
    session = await SmtpClientSession.connect(
        "localhost",
        0,
        helo_name="client.test",
        lmtp=True,
        unix_path=server.unix,
        starttls="none",
        timeouts=FAST,
    )
    assert session.peer == f"unix:{server.unix}"
    result = await session.send(
        "a@s.test",
        MailParams(),
        [("x@d.test", RcptParams()), ("y@d.test", RcptParams())],
        pieces(MESSAGE),
        len(MESSAGE),
    )
    assert [r.code for r in result.per_recipient] == [250, 250]
    await session.quit()
    (text,) = server.dumps(1)
    assert "X-Client-Proto: LMTP" in text
    expect_dump_content(text, MESSAGE)


async def test_lmtp_end_of_data_refused_per_recipient(sink: Callable[..., Sink]) -> None:
    server = sink("-L", "-r", ".")
    session = await connect(server, lmtp=True)
    result = await session.send(
        "a@s.test",
        MailParams(),
        [("x@d.test", RcptParams()), ("y@d.test", RcptParams())],
        pieces(MESSAGE),
        len(MESSAGE),
    )
    assert [r.code for r in result.per_recipient] == [450, 450]
    assert session.usable
    await session.quit()
