"""Listeners: bind sockets, admit connections, start sessions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref

from postillon.config.model import ListenConfig, split_host_port
from postillon.core.reply import Reply
from postillon.inbound.limits import ConnectionLimiter
from postillon.inbound.session import Session, SessionDeps
from postillon.inbound.tls import ServerCertificate

log = logging.getLogger("postillon.inbound")

# Deep accept queue: bursts of new connections (one message per session) must
# not overflow it; every dropped SYN costs a client a one-second retransmit.
BACKLOG = 1024


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
        if address.startswith("unix:"):
            self.server = await asyncio.start_unix_server(
                self._on_client,
                address[5:],
                backlog=BACKLOG,
                ssl=self.implicit_tls,
                start_serving=False,
            )
        else:
            host, port = split_host_port(address)
            self.server = await asyncio.start_server(
                self._on_client,
                host,
                port,
                backlog=BACKLOG,
                reuse_address=True,
                ssl=self.implicit_tls,
                ssl_handshake_timeout=30 if self.implicit_tls else None,
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
        deps = self.deps
        assert deps is not None
        task = asyncio.current_task()
        if task is not None:
            self.sessions.add(task)
        peer = writer.get_extra_info("peername")
        ip = peer[0] if isinstance(peer, tuple) else "local"
        metrics = deps.metrics
        if metrics is not None:
            metrics.connections.inc()
        refusal = self.limiter.try_acquire(ip)
        if refusal is not None:
            if metrics is not None:
                metrics.rejected("connection_limit")
            deps.maillog.event("rejected", client=ip, reason=f"421 4.7.0 {refusal}")
            with contextlib.suppress(Exception):
                writer.write(
                    Reply.of(
                        421, "4.7.0", f"{deps.settings.hostname} {refusal}, try later"
                    ).to_bytes()
                )
                await asyncio.wait_for(writer.drain(), 5)
            writer.close()
            return
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
