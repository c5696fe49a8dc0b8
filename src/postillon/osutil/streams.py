"""Writing to an asyncio stream without the drain machinery when it is not needed.

``StreamWriter.write`` hands the bytes to the transport, which sends at once what
the kernel takes. Only when something is left in the transport's buffer (or the
connection is closing) is there anything for ``drain()`` to wait for; the SMTP
replies and commands of a session almost never leave anything, and skipping the
drain (and the timeout armed around it) saves a timer per write on the hot path.
"""

from __future__ import annotations

import asyncio

__all__ = ["write_nowait", "write_out"]


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
