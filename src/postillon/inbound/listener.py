"""Listeners: bind sockets, admit connections, start sessions.

Implicit TLS (``submissions``, RFC 8314) is admitted before its handshake.
With ``ssl=`` on the server, asyncio runs the handshake before the session
callback, so a flood of handshakes (a private-key operation each, and up to
30 s of a held socket for a silent client) escaped the connection limits.
So an implicit-TLS listener is a plain server whose protocol (``_TlsAccept``)
takes the accepted socket over before anything is read from it (the
ClientHello stays in the kernel), and the listener admits the client, then
runs the handshake itself (``loop.connect_accepted_socket``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import weakref
from typing import cast

from postillon.config.model import ListenConfig, split_host_port
from postillon.core.reply import Reply
from postillon.inbound.limits import ConnectionLimiter
from postillon.inbound.session import Session, SessionDeps
from postillon.inbound.tls import ServerCertificate

log = logging.getLogger("postillon.inbound")

# Deep accept queue: bursts of new connections (one message per session) must
# not overflow it; every dropped SYN costs a client a one-second retransmit.
BACKLOG = 1024
TLS_HANDSHAKE_TIMEOUT = 30.0  # seconds an admitted implicit-TLS client has to finish it
STREAM_LIMIT = 2**16  # asyncio's default StreamReader buffer limit, as start_server uses


class _TlsAccept(asyncio.Protocol):
    """Hands each accepted socket of an implicit-TLS listener to ``Listener._tls_client``.

    ``connection_made`` runs before the event loop reads from the socket (asyncio
    and uvloop alike; uvloop starts reading right after it, and ignores a
    ``pause_reading`` there), so a duplicate of the descriptor is taken and the
    transport dropped: the socket stays open, its unread bytes in the kernel.
    """

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        raw = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        try:
            sock = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError:
            transport.abort()
            return
        transport.abort()
        task = asyncio.ensure_future(self.listener._tls_client(sock, peer))
        self.listener.sessions.add(task)


class Listener:
    def __init__(
        self,
        config: ListenConfig,
        limiter: ConnectionLimiter,
        implicit_tls: ssl.SSLContext | None = None,
    ) -> None:
        self.config = config
        # Set by the composition root after privileges are dropped and the
        # queue is open; the socket does not serve before that.
        self.deps: SessionDeps | None = None
        self.limiter = limiter
        self.implicit_tls = implicit_tls
        self.server: asyncio.Server | None = None
        self.sessions: weakref.WeakSet[asyncio.Task[None]] = weakref.WeakSet()
        self.active: set[Session] = set()
        self.stopping = False

    async def bind(self) -> None:
        """Bind (possibly a privileged port) without serving yet."""
        address = self.config.address
        loop = asyncio.get_running_loop()
        if address.startswith("unix:"):
            if self.implicit_tls is not None:
                self.server = await loop.create_unix_server(
                    lambda: _TlsAccept(self), address[5:], backlog=BACKLOG, start_serving=False
                )
            else:
                self.server = await asyncio.start_unix_server(
                    self._on_client, address[5:], backlog=BACKLOG, start_serving=False
                )
        else:
            host, port = split_host_port(address)
            if self.implicit_tls is not None:
                self.server = await loop.create_server(
                    lambda: _TlsAccept(self),
                    host,
                    port,
                    backlog=BACKLOG,
                    reuse_address=True,
                    start_serving=False,
                )
            else:
                self.server = await asyncio.start_server(
                    self._on_client,
                    host,
                    port,
                    backlog=BACKLOG,
                    reuse_address=True,
                    start_serving=False,
                )
        log.info("listening on %s (%s)", address, self.config.kind)

    async def start(self, deps: SessionDeps) -> None:
        self.deps = deps
        assert self.server is not None
        await self.server.start_serving()

    def reconfigure(self, deps: SessionDeps, certificate: ServerCertificate | None) -> None:
        """New settings from a reload: sessions that start from now on get ``deps``
        (running ones keep theirs). An implicit-TLS socket keeps its context object,
        so the new certificate is loaded into it and new handshakes present it."""
        if self.implicit_tls is not None and certificate is not None:
            certificate.load_into(self.implicit_tls)
        self.deps = deps

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        sock = self.server.sockets[0]
        name = sock.getsockname()
        return int(name[1]) if isinstance(name, tuple) else 0

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A plaintext connection (port 25, 587, LMTP): admit it, then run its session."""
        task = asyncio.current_task()
        if task is not None:
            self.sessions.add(task)
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "local"
        refusal = self._admit(ip)
        if refusal is not None:
            assert self.deps is not None
            with contextlib.suppress(Exception):
                writer.write(
                    Reply.of(
                        421, "4.7.0", f"{self.deps.settings.hostname} {refusal}, try later"
                    ).to_bytes()
                )
                await asyncio.wait_for(writer.drain(), 5)
            writer.close()
            return
        await self._session(reader, writer, ip)

    async def _tls_client(self, sock: socket.socket, peer: object) -> None:
        """An implicit-TLS connection: admit it, then the handshake, then its session."""
        ip = peer[0] if isinstance(peer, tuple) else "local"
        if self._admit(ip) is not None:
            # A 421 would cost the handshake the limit is there to spare:
            # the client of an implicit-TLS port sees the connection close.
            sock.close()
            return
        assert self.implicit_tls is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                sock,
                ssl=self.implicit_tls,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake with %s failed: %s", ip, exc)
            sock.close()
            self.limiter.release(ip)
            return
        except BaseException:
            sock.close()
            self.limiter.release(ip)
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._session(reader, writer, ip)

    def _admit(self, ip: str) -> str | None:
        """Count one connection at accept: None if admitted (release it later),
        else the refusal, already counted and logged."""
        deps = self.deps
        assert deps is not None
        metrics = deps.metrics
        if metrics is not None:
            metrics.connections.inc()
        refusal = self.limiter.try_acquire(ip)
        if refusal is not None:
            if metrics is not None:
                metrics.rejected("connection_limit")
            deps.maillog.event("rejected", client=ip, reason=f"421 4.7.0 {refusal}")
        return refusal

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str
    ) -> None:
        """Run the session of an admitted connection, and give its slot back."""
        deps = self.deps
        assert deps is not None
        metrics = deps.metrics
        session = Session(deps, reader, writer)
        self.active.add(session)
        if metrics is not None:
            metrics.active.inc()
            if self.implicit_tls is not None:
                ssl_obj = writer.get_extra_info("ssl_object")
                metrics.tls(ssl_obj.version() if ssl_obj is not None else "")
        if self.stopping:
            session.request_shutdown()
        try:
            await session.run()
        except Exception:
            log.exception("session from %s failed", ip)
        finally:
            if metrics is not None:
                metrics.active.dec()
            self.active.discard(session)
            self.limiter.release(ip)

    def stop_accepting(self) -> None:
        """Close the listening socket; idle sessions get 421 4.3.2 at once,
        sessions in a transaction may finish it first."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for session in list(self.active):
            session.request_shutdown()

    async def wait_sessions(self, grace: float) -> None:
        tasks = [t for t in self.sessions if not t.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
