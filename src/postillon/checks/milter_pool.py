"""Idle milter connections kept between SMTP sessions (one pool per milter).

A new TCP (or unix socket) connection and its SMFIC_OPTNEG round trip for every SMTP
session is most of what a milter costs a short session. libmilter (protocol version
6, Sendmail 8.14) lets the MTA end a session with SMFIC_QUIT_NC instead of
SMFIC_QUIT: the milter calls its close callback, keeps the negotiated options, and
takes the next SMFIC_CONNECT on the same connection (engine.c: the state after
QUIT_NC allows only CONNECT, not a new OPTNEG). So a session that ends cleanly puts
its connection here, and the next session takes it.

An idle connection waits in its "end of message" state; QUIT_NC goes out only when
it is taken, in one write with the new SMFIC_CONNECT, and a connection that idled
past ``IDLE_TIMEOUT`` gets a plain SMFIC_QUIT (libmilter ignores QUIT after QUIT_NC,
so deferring QUIT_NC is what lets the milter see a clean end either way). Only
connections whose last end of message was answered "continue" qualify
(``MilterClient.can_quit_new_connection`` says why). A connection the milter closed
while idle is noticed here and dropped; one that fails on its first use anyway is
replaced by a fresh connection by the driver (``MilterConnection``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from postillon.checks.milter_driver import MilterConnection

# A few idle connections per milter: enough for sessions that end and begin
# together, few enough that a libmilter filter (a thread per connection) is not
# held busy for nothing.
POOL_SIZE = 8
# Idle connections older than this are closed (SMFIC_QUIT): well under libmilter's
# own idle limit (its default timeout is 7210 s) and rspamd's.
IDLE_TIMEOUT = 30.0


class MilterPool:
    """Idle, negotiated connections to one milter, most recent first out."""

    def __init__(self, size: int = POOL_SIZE, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.size = size
        self.idle_timeout = idle_timeout
        self._idle: list[tuple[MilterConnection, asyncio.TimerHandle]] = []
        self.reused = 0  # connections taken from the pool (for tests and logs)

    def __len__(self) -> int:
        return len(self._idle)

    def put(self, conn: MilterConnection) -> bool:
        """Keep ``conn`` for a later session; False when it does not qualify or the
        pool is full (the caller then closes it)."""
        if len(self._idle) >= self.size or not conn.can_be_reused:
            return False
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.idle_timeout, self._expire, conn)
        self._idle.append((conn, handle))
        return True

    def take(self) -> MilterConnection | None:
        """The most recently used idle connection still open, or None."""
        while self._idle:
            conn, handle = self._idle.pop()
            handle.cancel()
            if conn.still_open_while_idle():
                self.reused += 1
                return conn
            conn.close_idle()
        return None

    def _expire(self, conn: MilterConnection) -> None:
        for index, (idle, _handle) in enumerate(self._idle):
            if idle is conn:
                del self._idle[index]
                break
        conn.close_idle()

    def close_all(self) -> None:
        while self._idle:
            conn, handle = self._idle.pop()
            handle.cancel()
            with contextlib.suppress(Exception):
                conn.close_idle()


__all__ = ["IDLE_TIMEOUT", "POOL_SIZE", "MilterPool"]
