"""A small receiving SMTP server with STARTTLS, for outbound TLS tests (DANE, MTA-STS).

It listens on one address (e.g. 127.0.0.2:25), presents the certificate chain it is given,
and records what each connection did: whether TLS was up when MAIL came, the envelope and
the body. Only what postillon's client needs (EHLO, STARTTLS, MAIL, RCPT, DATA, RSET,
NOOP, QUIT); no PIPELINING or CHUNKING is advertised, so the client sends one command at a
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

__all__ = ["Received", "StartTlsReceiver"]


@dataclass
class Received:
    tls: bool
    sender: str
    recipients: list[str]
    body: bytes


@dataclass
class StartTlsReceiver:
    host: str
    port: int
    name: str
    context: ssl.SSLContext | None  # None: STARTTLS not offered
    messages: list[Received] = field(default_factory=list)
    handshakes: int = 0  # completed TLS handshakes
    connections: int = 0
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> StartTlsReceiver:
        self._server = await asyncio.start_server(self._session, self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        tls = False
        sender, rcpts = "", []

        async def say(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            await writer.drain()

        try:
            await say(f"220 {self.name} ESMTP test receiver")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    offer = self.context is not None and not tls
                    await say(f"250-{self.name}" if offer else f"250 {self.name}")
                    if offer:
                        await say("250 STARTTLS")
                elif verb == b"STAR" and self.context is not None and not tls:
                    await say("220 2.0.0 Ready to start TLS")
                    await writer.start_tls(self.context)
                    self.handshakes += 1
                    tls = True
                elif verb == b"MAIL":
                    sender, rcpts = line[10:].strip().decode(), []
                    await say("250 2.1.0 Ok")
                elif verb == b"RCPT":
                    rcpts.append(line[8:].strip().decode())
                    await say("250 2.1.5 Ok")
                elif verb == b"DATA":
                    await say("354 End data with <CR><LF>.<CR><LF>")
                    body = b""
                    while (chunk := await reader.readline()) not in (b".\r\n", b""):
                        body += chunk
                    self.messages.append(Received(tls, sender, rcpts, body))
                    await say("250 2.0.0 Ok: queued")
                elif verb == b"QUIT":
                    await say("221 2.0.0 Bye")
                    break
                else:
                    await say("250 2.0.0 Ok")
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
