"""Writing to an asyncio stream without the drain machinery when it is not needed.

``StreamWriter.write`` hands the bytes to the transport, which sends at once what
the kernel takes. Only when something is left in the transport's buffer (or the
connection is closing) is there anything for ``drain()`` to wait for; the SMTP
replies and commands of a session almost never leave anything, and skipping the
drain (and the timeout armed around it) saves a timer per write on the hot path.
"""

from __future__ import annotations

import asyncio

__all__ = ["ReadDeadline", "write_nowait", "write_out"]


def write_nowait(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Write ``data``; True if the kernel took all of it, so no drain is needed.
    False: call ``drain()`` (it also raises a connection's error)."""
    writer.write(data)
    transport = writer.transport
    return not transport.get_write_buffer_size() and not transport.is_closing()


async def write_out(writer: asyncio.StreamWriter, data: bytes) -> None:
    """``write`` + ``drain``, the drain only when something is left to send."""
    if not write_nowait(writer, data):
        await writer.drain()


class ReadDeadline:
    """``reader.read()`` under a per-read timeout, with one lazily re-armed timer per
    connection instead of an ``asyncio.timeout()`` per read.

    Each ``asyncio.timeout()`` looks up the current task (a ``getpid`` system call
    on Python 3.11), schedules a timer and cancels it again; a session reads a few
    times per message. Here a read only stores its deadline: the one timer, when
    it fires, either finds the connection idle (nothing to do), or a later deadline
    (it re-arms itself there), or a read past its deadline, which then raises
    ``TimeoutError`` (set on the reader, as a ``StreamReader`` error: the
    connection is done with). ``close()`` when the connection ends.
    """

    __slots__ = ("_armed_at", "_deadline", "_loop", "_reader", "_size", "_timer", "reading")

    def __init__(self, reader: asyncio.StreamReader, size: int) -> None:
        self._reader = reader
        self._size = size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._deadline = 0.0
        self.reading = False  # a read is waiting now

    async def read(self, timeout: float) -> bytes:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = self._deadline = loop.time() + timeout
        if self._timer is None or self._armed_at > deadline:
            self._arm(loop, deadline)
        self.reading = True
        try:
            return await self._reader.read(self._size)
        finally:
            self.reading = False

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        self.close()
        self._armed_at = at
        self._timer = loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self.reading:
            return  # the next read arms it again
        loop = self._loop
        assert loop is not None
        if loop.time() < self._deadline:
            self._arm(loop, self._deadline)
        else:
            self._reader.set_exception(TimeoutError())
