"""Happy Eyeballs (RFC 8305) for outbound connections: one host's addresses
raced with a short stagger instead of tried one full connect timeout each.

The addresses of one MX host are interleaved by family (RFC 8305 §4: first
the preferred family, then alternately the other), and connection attempts
start one ``delay`` apart (the "Connection Attempt Delay", §5; default 250 ms,
``[outbound] happy_eyeballs_delay``). An attempt that fails makes the next one
start at once; the first attempt that connects wins and the others are
cancelled. So an address that black-holes SYNs (an IPv6 route that goes
nowhere, a firewall that drops) costs one ``delay``, not a connect timeout.
Each attempt still has its own ``timeout`` (``[outbound] connect_timeout``).

Only TCP is raced; the SMTP session (greeting, EHLO, TLS) runs on the winner.
The sockets are plain non-blocking ones, bound first to the source address the
caller chose for that address (``source_for``; see ``egress``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from postillon.outbound.egress import family_of

__all__ = ["DEFAULT_DELAY", "Attempt", "RaceResult", "interleave", "race"]

# RFC 8305 §5: "A simple implementation can have a fixed delay ... 250 ms".
DEFAULT_DELAY = 0.25


def interleave(addresses: Sequence[str], prefer_ipv6: bool = True) -> list[str]:
    """RFC 8305 §4: alternate the families, starting with the preferred one,
    keeping the order within each family."""
    v6 = [a for a in addresses if family_of(a) == 6]
    v4 = [a for a in addresses if family_of(a) == 4]
    first, second = (v6, v4) if prefer_ipv6 else (v4, v6)
    if not first:
        first, second = second, first
    out: list[str] = []
    for i in range(max(len(first), len(second))):
        out.extend(x[i] for x in (first, second) if i < len(x))
    return out


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one address fared: ``error`` is empty for the winner, "cancelled"
    for an attempt stopped because another won."""

    address: str
    source: str | None
    error: str = ""


@dataclass(slots=True)
class RaceResult:
    """The connected socket and its address (None when every attempt failed),
    and every attempt made, in start order."""

    sock: socket.socket | None = None
    address: str = ""
    source: str | None = None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def failed(self) -> list[Attempt]:
        return [a for a in self.attempts if a.error not in ("", "cancelled", "not tried")]


async def _connect(address: str, port: int, source: str | None, timeout: float) -> socket.socket:
    family = socket.AF_INET6 if family_of(address) == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timeout after {timeout:g}s"
    if isinstance(exc, OSError) and exc.errno:  # "Connection refused", not asyncio's wording
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


async def race(
    addresses: Sequence[str],
    port: int,
    *,
    delay: float = DEFAULT_DELAY,
    timeout: float = 30.0,
    source_for: Callable[[str], str | None] = lambda _address: None,
) -> RaceResult:
    """Connect to the first of ``addresses`` that answers (in the order given:
    interleave first), starting attempts ``delay`` apart (RFC 8305 §5)."""
    result = RaceResult()
    running: dict[asyncio.Task[socket.socket], tuple[str, str | None]] = {}
    waiting = list(addresses)

    def start_next() -> None:
        address = waiting.pop(0)
        source = source_for(address)
        task = asyncio.ensure_future(_connect(address, port, source, timeout))
        running[task] = (address, source)

    try:
        while waiting or running:
            if waiting and not running:
                start_next()  # nothing in flight: no reason to wait
            done, _ = await asyncio.wait(
                running, timeout=delay if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:  # the stagger passed without an answer: start the next one
                start_next()
                continue
            for task in done:
                address, source = running.pop(task)
                exc = task.exception()
                if exc is None and result.sock is None:
                    result.sock, result.address, result.source = task.result(), address, source
                    result.attempts.append(Attempt(address, source))
                elif exc is None:
                    task.result().close()  # a second winner in the same instant
                    result.attempts.append(Attempt(address, source, "cancelled"))
                else:
                    result.attempts.append(Attempt(address, source, _reason(exc, timeout)))
            if result.sock is not None:
                break
    finally:
        for task, (address, source) in running.items():
            task.cancel()
            result.attempts.append(Attempt(address, source, "cancelled"))
        for task in running:
            with contextlib.suppress(BaseException):
                (await task).close()  # connected just as it was cancelled
    result.attempts.extend(Attempt(a, None, "not tried") for a in waiting)
    return result
