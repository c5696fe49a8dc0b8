"""Idle SMTP connections kept for reuse, and concurrency limits per destination."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from postillon.outbound.client_session import SmtpClientSession
from postillon.outbound.tls_policy import TlsRequirement
from postillon.outbound.transaction_limits import at_mail_max

# (address or unix path, port, LMTP?, what its TLS had to prove, source address)
PoolKey = tuple[str, int, bool, TlsRequirement, str | None]


class ConnectionPool:
    """Idle sessions by key (address, port, TLS mode); closed after ``idle_seconds``."""

    def __init__(self, idle_seconds: float, max_messages: int) -> None:
        self.idle_seconds = idle_seconds
        self.max_messages = max_messages
        self._idle: dict[PoolKey, list[tuple[float, SmtpClientSession]]] = defaultdict(list)
        self._reaper: asyncio.Task[None] | None = None

    def take(self, key: PoolKey) -> SmtpClientSession | None:
        now = time.monotonic()
        stack = self._idle.get(key)
        while stack:
            since, session = stack.pop()
            if session.usable and now - since < self.idle_seconds:
                return session
            session.close()
        return None

    async def put(
        self, key: PoolKey, session: SmtpClientSession, *, max_messages: int | None = None
    ) -> None:
        """Keep ``session`` for reuse, unless it has sent ``max_messages`` (a
        [[shaping]] rule's ``messages_per_connection``; default the pool's)."""
        if (
            self.idle_seconds <= 0
            or not session.usable
            or session.messages_sent >= (max_messages or self.max_messages)
            or at_mail_max(session)  # RFC 9422 MAILMAX: the server wants a new connection
        ):
            await session.quit()
            return
        self._idle[key].append((time.monotonic(), session))
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap())

    async def _reap(self) -> None:
        while any(self._idle.values()):
            await asyncio.sleep(min(1.0, self.idle_seconds))
            now = time.monotonic()
            for key, stack in list(self._idle.items()):
                keep = []
                for since, session in stack:
                    if now - since >= self.idle_seconds or not session.usable:
                        await session.quit()
                    else:
                        keep.append((since, session))
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]

    async def close(self) -> None:
        for stack in self._idle.values():
            for _, session in stack:
                await session.quit()
        self._idle.clear()
        if self._reaper is not None:
            self._reaper.cancel()


class Limits:
    """A global cap on outbound connections and a cap per destination."""

    def __init__(self, total: int, per_destination: int) -> None:
        self._total = asyncio.Semaphore(total)
        self._per_destination = per_destination
        self._by_dest: dict[str, asyncio.Semaphore] = {}

    def destination(self, key: str) -> asyncio.Semaphore:
        sem = self._by_dest.get(key)
        if sem is None:
            sem = self._by_dest[key] = asyncio.Semaphore(self._per_destination)
        return sem

    @property
    def total(self) -> asyncio.Semaphore:
        return self._total
