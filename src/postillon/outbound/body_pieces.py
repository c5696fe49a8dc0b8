"""Body pieces as they go out: small pieces joined into larger writes."""

from __future__ import annotations

from collections.abc import AsyncIterator

__all__ = ["coalesce"]


async def coalesce(body: AsyncIterator[bytes], minimum: int) -> AsyncIterator[bytes]:
    """Join small pieces to at least ``minimum`` octets (the last one may be smaller)."""
    buf = bytearray()
    async for piece in body:
        if not buf and len(piece) >= minimum:
            yield piece
            continue
        buf += piece
        if len(buf) >= minimum:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)
