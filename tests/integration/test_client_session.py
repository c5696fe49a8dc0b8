"""SmtpClientSession against small asyncio servers written here, for the edge cases.

    SmtpClientSession ──SMTP/LMTP over TCP 127.0.0.1 (STARTTLS or implicit TLS with a
                        trustme certificate)──▶ ScriptServer (unstuffs DATA, reads BDAT,
                                                records commands and messages)

The server is scripted per test (``Script``): extensions, refusals, a 421 or a
dropped connection at a given command, silence (for timeouts), LMTP replies.
It reads pipelined commands one line at a time, as a real server does.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest
import trustme
from cryptography import x509

from postillon.core.envelope import MailParams, RcptParams
from postillon.outbound.client_session import (
    ClientTimeouts,
    SessionError,
    SmtpClientSession,
    TlsChecker,
    TransactionResult,
)
from postillon.outbound.tls import check_requirement
from postillon.outbound.tls_policy import TlsMode, TlsRequirement
from support.ports import accepts, wait_until_async

pytestmark = pytest.mark.integration

FAST = ClientTimeouts(connect=5, greeting=5, command=5, data_block=5, data_end=5)
BASE = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 20000000")


@dataclass
class Script:
    greeting: bytes = b"220 mx.test ESMTP test\r\n"
    keywords: tuple[str, ...] = BASE
    tls_keywords: tuple[str, ...] | None = None  # after STARTTLS (default: keywords)
    starttls: ssl.SSLContext | None = None  # offer STARTTLS with this context
    starttls_reply: bytes = b"220 2.0.0 Ready to start TLS\r\n"
    lmtp: bool = False
    rcpt_replies: dict[str, bytes] = field(default_factory=dict)
    final_replies: dict[str, bytes] = field(default_factory=dict)  # LMTP, per recipient
    data_reply: bytes = b"250 2.0.0 Ok: queued\r\n"
    reply_421_at: str = ""  # verb
    close_at: str = ""  # verb, or "BODY": drop the connection there
    silent_at: str = ""  # verb: never answer it
    early_reply: bytes = b""  # sent after the first body line of DATA; then the server closes
    close_after_message: bytes | None = None  # sent after the end-of-data reply; then close
    auth: tuple[str, str] = ("joe", "secret")


@dataclass
class Message:
    mail: str
    rcpts: list[str]
    content: bytes
    via: str


class ScriptServer:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.commands: list[str] = []
        self.messages: list[Message] = []
        self.tls_used = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writer_for_early: asyncio.StreamWriter | None = None

    async def start(self, ssl_ctx: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> int:
        self.server = await asyncio.start_server(self.handle, host, 0, ssl=ssl_ctx, limit=1 << 20)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = self.script

        async def say(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        self.writer_for_early = writer
        await say(s.greeting)
        keywords = s.keywords + (("STARTTLS",) if s.starttls else ())
        mail = ""
        rcpts: list[str] = []
        chunks = bytearray()
        while True:
            line = (await reader.readuntil(b"\r\n"))[:-2].decode("utf-8", "replace")
            self.commands.append(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == s.silent_at:
                await asyncio.sleep(3600)
            if verb == s.close_at:
                return
            if verb == s.reply_421_at:
                await say(b"421 4.3.2 Shutting down\r\n")
                return
            if verb in ("EHLO", "LHLO"):
                lines = ["mx.test", *keywords]
                text = "".join(f"250-{k}\r\n" for k in lines[:-1]) + f"250 {lines[-1]}\r\n"
                await say(text.encode())
            elif verb == "HELO":
                await say(b"250 mx.test\r\n")
            elif verb == "STARTTLS":
                await say(s.starttls_reply)
                if s.starttls_reply.startswith(b"220"):
                    assert s.starttls is not None
                    await writer.start_tls(s.starttls)
                    self.tls_used = True
                    keywords = s.tls_keywords if s.tls_keywords is not None else s.keywords
            elif verb == "AUTH":
                await say(await self._auth(arg, reader, say))
            elif verb == "MAIL":
                mail, rcpts = line, []
                chunks.clear()
                await say(b"250 2.1.0 Ok\r\n")
            elif verb == "RCPT":
                addr = arg[arg.index("<") + 1 : arg.index(">")]
                reply = s.rcpt_replies.get(addr, b"250 2.1.5 Ok\r\n")
                if reply.startswith(b"2"):
                    rcpts.append(addr)
                await say(reply)
            elif verb == "DATA":
                if not rcpts:
                    await say(b"554 5.5.1 No valid recipients\r\n")
                    continue
                await say(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                content = await self._read_data(reader)
                if content is None:
                    return
                await self._deliver(say, Message(mail, rcpts, content, "DATA"))
            elif verb == "BDAT":
                size, *last = arg.split()
                chunks += await reader.readexactly(int(size))
                if s.close_at == "BODY":
                    return
                if last:
                    await self._deliver(say, Message(mail, rcpts, bytes(chunks), "BDAT"))
                    chunks.clear()
                else:
                    await say(f"250 2.0.0 {size} octets received\r\n".encode())
            elif verb in ("RSET", "NOOP"):
                await say(b"250 2.0.0 Ok\r\n")
            elif verb == "QUIT":
                await say(b"221 2.0.0 Bye\r\n")
                return
            else:
                await say(b"502 5.5.1 Not implemented\r\n")

    async def _read_data(self, reader: asyncio.StreamReader) -> bytes | None:
        """Read to CRLF.CRLF and dot-unstuff (RFC 5321 §4.5.2)."""
        out = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            if self.script.close_at == "BODY":
                return None
            if self.script.early_reply:
                assert self.writer_for_early is not None
                self.writer_for_early.write(self.script.early_reply)
                await self.writer_for_early.drain()
                return None
            if line == b".\r\n":
                return bytes(out)
            out += line[1:] if line.startswith(b".") else line

    async def _deliver(self, say: Callable[[bytes], Awaitable[None]], msg: Message) -> None:
        self.messages.append(msg)
        if self.script.lmtp:
            for rcpt in msg.rcpts:
                await say(self.script.final_replies.get(rcpt, b"250 2.0.0 Delivered\r\n"))
        else:
            await say(self.script.data_reply)
        if self.script.close_after_message is not None:
            await say(self.script.close_after_message)
            raise ConnectionError("closing after the message")

    async def _auth(
        self, arg: str, reader: asyncio.StreamReader, say: Callable[[bytes], Awaitable[None]]
    ) -> bytes:
        import base64

        mech, _, initial = arg.partition(" ")
        user, password = self.script.auth
        if mech.upper() == "PLAIN":
            got = base64.b64decode(initial).split(b"\0")
            ok = got[1:] == [user.encode(), password.encode()]
        elif mech.upper() == "LOGIN":
            await say(b"334 VXNlcm5hbWU6\r\n")
            u = base64.b64decode(await reader.readuntil(b"\r\n"))
            await say(b"334 UGFzc3dvcmQ6\r\n")
            p = base64.b64decode(await reader.readuntil(b"\r\n"))
            ok = (u, p) == (user.encode(), password.encode())
        else:
            return b"504 5.5.4 Unrecognized authentication mechanism\r\n"
        return (
            b"235 2.7.0 Authentication successful\r\n"
            if ok
            else (b"535 5.7.8 Authentication credentials invalid\r\n")
        )


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., Awaitable[ScriptServer]]]:
    servers: list[ScriptServer] = []

    async def make(
        ssl_ctx: ssl.SSLContext | None = None, host: str = "127.0.0.1", **script: object
    ) -> ScriptServer:
        server = ScriptServer(Script(**script))  # type: ignore[arg-type]
        await server.start(ssl_ctx, host)
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test").configure_cert(ctx)
    return ctx


async def connect(server: ScriptServer, **kw: object) -> SmtpClientSession:
    kw.setdefault("timeouts", FAST)
    return await SmtpClientSession.connect("127.0.0.1", server.port, helo_name="client.test", **kw)  # type: ignore[arg-type]


async def pieces(data: bytes, sizes: Iterator[int] | None = None) -> AsyncIterator[bytes]:
    """``data`` in pieces of varying sizes (so boundaries fall everywhere)."""
    rng = random.Random(len(data))
    i = 0
    while i < len(data):
        n = next(sizes) if sizes is not None else rng.choice((1, 2, 3, 100, 4096, 70_000))
        yield data[i : i + n]
        i += n


def make_message(size: int, seed: int = 1) -> bytes:
    """CRLF lines full of dot-stuffing traps, 8-bit octets, some long lines."""
    rng = random.Random(seed)
    heads = [b"", b".", b"..", b"...", b". ", b".x", b"x", b"\xc3\xa9", b"From "]
    tails = [
        bytes(rng.choice(b"abc .\xe9") for _ in range(n))
        for n in (0, 1, 2, 40, 76, 77, 990, 5000)
        for _ in range(4)
    ]
    out = bytearray(b"From: a@s.test\r\nTo: x@d.test\r\nSubject: test\r\n\r\n")
    while len(out) < size:
        out += rng.choice(heads) + rng.choice(tails) + b"\r\n"
    return bytes(out)


async def send_one(
    session: SmtpClientSession, message: bytes, *rcpts: str, **kw: object
) -> TransactionResult:
    return await session.send(
        "a@s.test",
        MailParams(),
        [(r, RcptParams()) for r in rcpts or ("x@d.test",)],
        pieces(message),
        len(message),
        **kw,
    )  # type: ignore[arg-type]


# --- byte-exact delivery ---------------------------------------------------------------


@pytest.mark.parametrize("size", [4096, 3 * 1024 * 1024])
@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
async def test_message_arrives_byte_exact(
    make_server: Callable[..., Awaitable[ScriptServer]], size: int, chunking: bool
) -> None:
    keywords = (*BASE, "CHUNKING") if chunking else BASE
    server = await make_server(keywords=keywords)
    session = await connect(server)
    message = make_message(size)
    result = await send_one(session, message, "x@d.test", "y@d.test")
    assert [r.code for r in result.per_recipient] == [250, 250]
    await session.quit()
    (msg,) = server.messages
    assert msg.via == ("BDAT" if chunking else "DATA")
    assert msg.rcpts == ["x@d.test", "y@d.test"]
    assert len(msg.content) == len(message)
    assert msg.content == message


async def test_bdat_without_pipelining(make_server: Callable[..., Awaitable[ScriptServer]]) -> None:
    server = await make_server(keywords=("CHUNKING", "8BITMIME"))
    session = await connect(server)
    message = make_message(300_000, seed=2)
    result = await send_one(session, message)
    assert result.per_recipient[0].code == 250
    await session.quit()
    assert server.messages[0].content == message
    assert sum(c.startswith("BDAT") for c in server.commands) > 2


async def test_body_without_final_crlf_gets_one(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server()
    session = await connect(server)
    await send_one(session, b"Subject: x\r\n\r\nno final line end")
    await session.quit()
    assert server.messages[0].content == b"Subject: x\r\n\r\nno final line end\r\n"


# --- sessions refused or broken ------------------------------------------------------------


async def test_4xx_greeting_is_temporary(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server(greeting=b"421 4.3.2 Too busy\r\n")
    with pytest.raises(SessionError) as info:
        await connect(server)
    assert not info.value.permanent
    assert info.value.reply is not None and info.value.reply.code == 421


async def test_554_greeting_is_permanent_and_quits(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server(greeting=b"554 5.7.1 No SMTP service here\r\n")
    with pytest.raises(SessionError) as info:
        await connect(server)
    assert info.value.permanent and info.value.reply is not None
    await wait_until_async(lambda: server.commands, what="the server has read the QUIT")
    assert server.commands == ["QUIT"]


async def test_connection_refused_is_temporary() -> None:
    server = ScriptServer(Script())
    port = await server.start()
    await server.stop()
    await wait_until_async(lambda: not accepts("127.0.0.1", port), what="the listener closed")
    with pytest.raises(SessionError) as info:
        await SmtpClientSession.connect("127.0.0.1", port, helo_name="c.test", timeouts=FAST)
    assert not info.value.permanent and "failed" in info.value.detail


async def test_421_mid_transaction(make_server: Callable[..., Awaitable[ScriptServer]]) -> None:
    server = await make_server(
        reply_421_at="DATA", rcpt_replies={"bad@d.test": b"550 5.1.1 Unknown user\r\n"}
    )
    session = await connect(server)
    result = await send_one(session, b"x\r\n", "x@d.test", "bad@d.test", "y@d.test")
    assert [(r.code, r.status) for r in result.per_recipient] == [
        (421, "4.3.2"),
        (550, "5.1.1"),
        (421, "4.3.2"),
    ]
    assert not session.usable
    with pytest.raises(SessionError):
        await send_one(session, b"x\r\n")
    await session.quit()


async def test_connection_lost_in_the_body(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server(
        close_at="BODY", rcpt_replies={"bad@d.test": b"550 5.1.1 Unknown user\r\n"}
    )
    session = await connect(server)
    with pytest.raises(SessionError) as info:
        await send_one(session, make_message(200_000), "x@d.test", "bad@d.test")
    err = info.value
    assert not err.permanent
    assert err.partial is not None
    assert [r.code for r in err.partial.per_recipient] == [451, 550]
    assert not session.usable
    await session.quit()


async def test_timeout_waiting_for_a_reply(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server(silent_at="RCPT")
    session = await connect(server, timeouts=ClientTimeouts(command=0.3))
    started = time.monotonic()
    with pytest.raises(SessionError) as info:
        await send_one(session, b"x\r\n")
    assert time.monotonic() - started < 3
    assert "timeout" in info.value.detail and not info.value.permanent
    assert info.value.partial is not None
    assert info.value.partial.per_recipient[0].code == 451
    await session.quit()


async def test_greeting_timeout(make_server: Callable[..., Awaitable[ScriptServer]]) -> None:
    server = await make_server(greeting=b"")
    with pytest.raises(SessionError) as info:
        await connect(server, timeouts=ClientTimeouts(greeting=0.3))
    assert "timeout" in info.value.detail


async def test_rcpt_rejections_and_pipelined_data(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server(
        rcpt_replies={"x@d.test": b"550 5.1.1 Unknown\r\n", "y@d.test": b"452 4.2.2 Full\r\n"}
    )
    session = await connect(server)
    result = await send_one(session, b"x\r\n", "x@d.test", "y@d.test")
    assert [r.code for r in result.per_recipient] == [550, 452]
    assert session.messages_sent == 0 and session.usable
    result = await send_one(session, b"x\r\n", "z@d.test")  # the same connection goes on
    assert result.per_recipient[0].code == 250
    await session.quit()
    # MAIL, both RCPTs and DATA in one pipeline; DATA refused (no recipient), then RSET.
    assert server.commands[1:6] == [
        "MAIL FROM:<a@s.test> SIZE=3",
        "RCPT TO:<x@d.test>",
        "RCPT TO:<y@d.test>",
        "DATA",
        "RSET",
    ]
    assert [m.rcpts for m in server.messages] == [["z@d.test"]]


async def test_no_pipelining(make_server: Callable[..., Awaitable[ScriptServer]]) -> None:
    server = await make_server(keywords=("8BITMIME",))
    session = await connect(server)
    result = await send_one(session, b"hi\r\n", "x@d.test", "y@d.test")
    assert [r.code for r in result.per_recipient] == [250, 250]
    await session.quit()
    assert server.commands == [
        "EHLO client.test",
        "MAIL FROM:<a@s.test>",
        "RCPT TO:<x@d.test>",
        "RCPT TO:<y@d.test>",
        "DATA",
        "QUIT",
    ]


async def test_smtputf8_needed_but_not_offered(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server()
    session = await connect(server)
    result = await send_one(session, b"x\r\n", "x@d.test", "y@d.test", needs_smtputf8=True)
    assert [(r.code, r.status) for r in result.per_recipient] == [(550, "5.6.7")] * 2
    assert "SMTPUTF8 not supported by remote server" in result.per_recipient[0].text
    assert result.mail_reply is None and session.usable
    await session.quit()
    assert server.commands == ["EHLO client.test", "QUIT"]


async def test_smtputf8_offered(make_server: Callable[..., Awaitable[ScriptServer]]) -> None:
    server = await make_server(keywords=(*BASE, "SMTPUTF8"))
    session = await connect(server)
    result = await send_one(session, "Subject: ü\r\n".encode(), "jösé@d.test")
    assert result.per_recipient[0].code == 250
    await session.quit()
    assert server.commands[1] == "MAIL FROM:<a@s.test> SMTPUTF8 SIZE=13"
    assert server.messages[0].rcpts == ["jösé@d.test"]


# --- LMTP ------------------------------------------------------------------------------------


async def test_lmtp_per_recipient_replies(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server(
        lmtp=True,
        keywords=("PIPELINING", "ENHANCEDSTATUSCODES"),
        rcpt_replies={"no@d.test": b"550 5.1.1 No such user\r\n"},
        final_replies={"full@d.test": b"452 4.2.2 Mailbox full\r\n"},
    )
    session = await connect(server, lmtp=True)
    result = await send_one(session, b"hi\r\n", "a@d.test", "no@d.test", "full@d.test", "b@d.test")
    assert [(r.code, r.status) for r in result.per_recipient] == [
        (250, "2.0.0"),
        (550, "5.1.1"),
        (452, "4.2.2"),
        (250, "2.0.0"),
    ]
    await session.quit()
    assert server.commands[0] == "LHLO client.test"


async def test_lmtp_bdat(make_server: Callable[..., Awaitable[ScriptServer]]) -> None:
    server = await make_server(
        lmtp=True,
        keywords=("PIPELINING", "CHUNKING"),
        final_replies={"full@d.test": b"452 4.2.2 Mailbox full\r\n"},
    )
    session = await connect(server, lmtp=True)
    message = make_message(500_000, seed=3)
    result = await send_one(session, message, "a@d.test", "full@d.test")
    assert [r.code for r in result.per_recipient] == [250, 452]
    await session.quit()
    assert server.messages[0].content == message and server.messages[0].via == "BDAT"


# --- TLS and AUTH ---------------------------------------------------------------------------


async def test_opportunistic_starttls_unverified(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
) -> None:
    server = await make_server(starttls=server_tls)
    session = await connect(server)
    assert session.tls.startswith("TLSv1.")
    assert not session.tls_verified  # trustme's CA is not trusted by the default context
    message = make_message(100_000)
    result = await send_one(session, message)
    assert result.per_recipient[0].code == 250
    await session.quit()
    assert server.tls_used
    assert server.commands[:3] == ["EHLO client.test", "STARTTLS", "EHLO client.test"]
    assert server.messages[0].content == message


async def test_starttls_verified_with_verifying_context(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
    ca: trustme.CA,
) -> None:
    server = await make_server(starttls=server_tls)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    session = await connect(server, tls_context=ctx, server_hostname="mx.test", starttls="required")
    assert session.tls and session.tls_verified
    await session.quit()


async def test_starttls_verified_after_the_fact(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
    ca: trustme.CA,
) -> None:
    """A non-verifying context (opportunistic) still records a good certificate."""
    server = await make_server(starttls=server_tls)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ca.configure_trust(ctx)
    session = await connect(server, tls_context=ctx, server_hostname="mx.test")
    assert session.tls_verified
    await session.quit()
    server2 = await make_server(starttls=server_tls)
    session = await connect(server2, tls_context=ctx, server_hostname="other.test")
    assert session.tls and not session.tls_verified  # name mismatch
    await session.quit()


async def test_starttls_verification_failure_with_verifying_context(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
) -> None:
    server = await make_server(starttls=server_tls)
    with pytest.raises(SessionError) as info:
        await connect(server, tls_context=ssl.create_default_context(), server_hostname="mx.test")
    assert not info.value.permanent and "TLS handshake" in info.value.detail


async def test_starttls_refused_opportunistic_goes_on_plain(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
) -> None:
    server = await make_server(
        starttls=server_tls, starttls_reply=b"454 4.7.0 TLS not available\r\n"
    )
    session = await connect(server)
    assert session.tls == ""
    assert (await send_one(session, b"x\r\n")).per_recipient[0].code == 250
    await session.quit()


async def test_starttls_refused_required_fails(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
) -> None:
    server = await make_server(
        starttls=server_tls, starttls_reply=b"454 4.7.0 TLS not available\r\n"
    )
    with pytest.raises(SessionError) as info:
        await connect(server, starttls="required")
    assert not info.value.permanent and info.value.reply is not None


async def test_starttls_handshake_failure_is_temporary(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
) -> None:
    server = await make_server(starttls=server_tls)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("aNULL")  # nothing the server can agree to
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(SessionError) as info:
        await connect(server, tls_context=ctx)
    assert not info.value.permanent and "TLS handshake" in info.value.detail


async def test_starttls_none_does_not_use_it(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
) -> None:
    server = await make_server(starttls=server_tls)
    session = await connect(server, starttls="none")
    assert session.tls == "" and "STARTTLS" in session.extensions
    await session.quit()


async def test_implicit_tls(
    make_server: Callable[..., Awaitable[ScriptServer]], server_tls: ssl.SSLContext, ca: trustme.CA
) -> None:
    server = await make_server(ssl_ctx=server_tls)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    session = await connect(server, implicit_tls=True, tls_context=ctx, server_hostname="mx.test")
    assert session.tls.startswith("TLSv1.") and session.tls_verified
    assert (await send_one(session, b"x\r\n")).per_recipient[0].code == 250
    await session.quit()


def trusting(ca: trustme.CA, name: str = "mx.test", mode: TlsMode = "verify") -> TlsChecker:
    """A policy check that trusts ``ca`` for ``name`` (what the transport builds)."""
    anchors = [x509.load_pem_x509_certificate(ca.cert_pem.bytes())]
    requirement = TlsRequirement(mode, match=(name,))
    return lambda chain: check_requirement(
        requirement,
        chain,
        host="127.0.0.1",
        anchors=anchors,
        now=datetime.datetime.now(datetime.UTC),
    )


@pytest.mark.parametrize("mechanisms", ["PLAIN LOGIN", "LOGIN"])
async def test_auth_after_starttls(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
    ca: trustme.CA,
    mechanisms: str,
) -> None:
    server = await make_server(starttls=server_tls, tls_keywords=(*BASE, f"AUTH {mechanisms}"))
    session = await connect(server, tls_check=trusting(ca))
    assert "AUTH" in session.extensions
    await session.authenticate("joe", "secret")
    assert (await send_one(session, b"x\r\n")).per_recipient[0].code == 250
    await session.quit()
    assert any(c.startswith(f"AUTH {mechanisms.split()[0]}") for c in server.commands)


async def test_auth_failure_raises_with_reply(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
    ca: trustme.CA,
) -> None:
    server = await make_server(starttls=server_tls, tls_keywords=(*BASE, "AUTH PLAIN"))
    session = await connect(server, tls_check=trusting(ca))
    with pytest.raises(SessionError) as info:
        await session.authenticate("joe", "wrong")
    assert info.value.reply is not None and info.value.reply.code == 535
    assert not info.value.permanent and session.usable
    await session.quit()


async def test_auth_refused_over_unverified_tls(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
) -> None:
    """Encrypted is not enough: the session itself never sends a password to a
    server whose certificate was not verified (the transport's last guard)."""
    server = await make_server(starttls=server_tls, tls_keywords=(*BASE, "AUTH PLAIN"))
    session = await connect(server)  # opportunistic: trustme's CA is not trusted
    assert session.tls and session.tls_result == "unverified"
    with pytest.raises(SessionError) as info:
        await session.authenticate("joe", "secret")
    assert "did not prove its identity" in info.value.detail and info.value.status == "4.7.5"
    await session.quit()
    assert not any(c.startswith("AUTH") for c in server.commands)


async def test_policy_check_refusal_quits_before_anything_else(
    make_server: Callable[..., Awaitable[ScriptServer]],
    server_tls: ssl.SSLContext,
    ca: trustme.CA,
) -> None:
    """A certificate for another name: QUIT right after the handshake, with the reason."""
    server = await make_server(starttls=server_tls)
    with pytest.raises(SessionError) as info:
        await connect(server, tls_check=trusting(ca, name="smtp.example.net"))
    assert info.value.detail.startswith("certificate for smtp.example.net not verified: ")
    assert info.value.status == "4.7.5" and info.value.tls_result == "not-verified"
    assert server.commands[-1] == "STARTTLS"  # nothing after it: no EHLO, AUTH or MAIL
    other = trustme.CA()  # right name, untrusted CA
    with pytest.raises(SessionError) as info:
        await connect(server, tls_check=trusting(other))
    assert "not verified" in info.value.detail


async def test_policy_check_on_implicit_tls(
    make_server: Callable[..., Awaitable[ScriptServer]], server_tls: ssl.SSLContext, ca: trustme.CA
) -> None:
    server = await make_server(ssl_ctx=server_tls)
    session = await connect(server, implicit_tls=True, tls_check=trusting(ca))
    assert session.tls_result == "verified" and session.tls_verified
    await session.quit()
    with pytest.raises(SessionError) as info:
        await connect(server, implicit_tls=True, tls_check=trusting(trustme.CA()))
    assert info.value.tls_result == "not-verified"
    assert not any(c.startswith("EHLO") for c in server.commands[-1:])


async def test_auth_refused_without_tls(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server(keywords=(*BASE, "AUTH PLAIN"))
    session = await connect(server)
    with pytest.raises(SessionError) as info:
        await session.authenticate("joe", "secret")
    assert "not encrypted" in info.value.detail
    await session.quit()
    assert not any(c.startswith("AUTH") for c in server.commands)


# --- addresses and options ----------------------------------------------------------------


async def test_local_address_and_ipv6(make_server: Callable[..., Awaitable[ScriptServer]]) -> None:
    server = await make_server()
    session = await connect(server, local_address="127.0.0.1")
    await session.quit()
    try:
        server6 = await make_server(host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    session = await SmtpClientSession.connect(
        "::1", server6.port, helo_name="client.test", timeouts=FAST
    )
    assert session.peer == f"::1[::1]:{server6.port}"
    await session.quit()


async def test_quit_never_raises_after_the_server_vanished(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server(close_at="NOOP")
    session = await connect(server)
    await server.stop()
    await session.quit()
    await session.quit()
    assert not session.usable


async def test_early_reply_during_data_is_the_result(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    """The server refuses in the middle of a big body and closes: its reply is kept."""
    server = await make_server(early_reply=b"552 5.3.4 Message too big\r\n")
    session = await connect(server)
    result = await send_one(session, make_message(8 * 1024 * 1024))
    assert (result.per_recipient[0].code, result.per_recipient[0].status) == (552, "5.3.4")
    assert not session.usable
    await session.quit()


async def test_body_iterator_failure_closes_the_session(
    make_server: Callable[..., Awaitable[ScriptServer]],
) -> None:
    server = await make_server()
    session = await connect(server)

    async def broken() -> AsyncIterator[bytes]:
        yield b"Subject: x\r\n" * 10_000
        raise OSError("spool file vanished")

    with pytest.raises(OSError, match="spool file vanished"):
        await session.send("a@s.test", MailParams(), [("x@d.test", RcptParams())], broken(), 10)
    assert not session.usable
    await session.quit()
    assert server.messages == []


@pytest.mark.parametrize("goodbye", [b"421 4.4.2 Idle timeout\r\n", b""], ids=["421", "eof"])
async def test_idle_session_closed_by_server_is_not_usable(
    make_server: Callable[..., Awaitable[ScriptServer]],
    goodbye: bytes,
) -> None:
    server = await make_server(close_after_message=goodbye)
    session = await connect(server)
    assert (await send_one(session, b"x\r\n")).per_recipient[0].code == 250
    await wait_until_async(lambda: not session.usable, what="the session sees the close")
    await session.quit()
