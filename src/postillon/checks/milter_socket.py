"""The socket under one milter connection: an ``asyncio.Protocol`` that hands the
milter's bytes straight to the sans-IO client (``protocol.milter.MilterClient``).

The driver (``milter_driver.py``) used asyncio streams, which cost a StreamReader, a
StreamWriter and their protocol per connection, and per answer a ``read()`` coroutine,
a ``drain()``, an ``asyncio.timeout`` context (a Timeout object, a timer and a
``current_task`` lookup). A milter answers few things (with rspamd's negotiation one
verdict per message), so that bookkeeping was a fair share of what a milter costs the
event loop. Here ``data_received`` feeds the client's buffer, and a waiting driver
holds one future at a time, woken when bytes arrive, the connection ends or its
deadline (one ``loop.call_at`` per answer, moved by SMFIR_PROGRESS) passes.

Nothing here knows the protocol: framing, events and errors stay in the client.
"""

from __future__ import annotations

import asyncio
from typing import cast

from postillon.protocol.milter import MilterClient


class MilterSocket(asyncio.Protocol):
    """One milter connection's transport, its received bytes and who waits for them."""

    def __init__(self, client: MilterClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.at_eof = False  # the milter closed (or the connection was lost)
        self.error: OSError | None = None  # why the connection was lost, if it broke
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._paused = False  # the transport's buffer is over its high-water mark

    # -- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.client.receive_data(data)
        self._wake()

    def eof_received(self) -> bool:
        self._end()
        return False  # close our side too: a milter that closed is done

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            self.error = exc
        self._end()
        self._paused = False

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    # -- for the driver -------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.at_eof and not self.transport.is_closing()

    @property
    def write_paused(self) -> bool:
        return self._paused

    def write(self, data: bytes) -> None:
        """Queue ``data`` on the socket; an error if the connection is already gone
        (a transport drops writes after the end silently)."""
        if self.error is not None:
            raise self.error
        if self.transport is None or self.at_eof or self.transport.is_closing():
            raise ConnectionResetError("the milter closed the connection")
        if data:
            self.transport.write(data)

    def arm(self, when: float) -> None:
        """Time out the waiting from loop time ``when`` on (again, if armed already)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timed_out = False
        self._timer = self._loop.call_at(when, self._time_out)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timed_out = False

    async def wait(self) -> None:
        """Until bytes arrive, the connection ends or the writer may go on; raises
        ``TimeoutError`` once the armed deadline has passed."""
        if self._timed_out:
            raise TimeoutError
        if self.at_eof:
            return
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    async def drain(self) -> None:
        """Wait while the transport's buffer is full (a large body, a slow milter)."""
        while self._paused and not self.at_eof:
            await self.wait()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.disarm()
        if self.transport is not None:
            self.transport.close()

    # -- internals ------------------------------------------------------------------
    def _end(self) -> None:
        if not self.at_eof:
            self.at_eof = True
            self.client.receive_data(b"")
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _time_out(self) -> None:
        self._timer = None
        self._timed_out = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError())


__all__ = ["MilterSocket"]
