"""Free ports, process groups and readiness polls, shared by every harness, test and bench.

Each harness here (Postfix, Dovecot, PostgreSQL, smtp-sink, the postillon server process)
needs the same few things, so they live once, in this module:

* :func:`free_port`: a port the kernel just handed out on loopback. Another process may
  still take it before the harness binds it; a harness that cares retries with a new one
  (``dovecot.py``'s ``_PortTaken``).
* :func:`group_members`, :func:`signal_each`, :func:`kill_group`, :func:`stop_process`: a
  harness starts its program in a process group of its own (``start_new_session=True``),
  and "stopped" means that group is empty (zombies count as gone: PID 1 reaps them).
* :func:`wait_until`, :func:`accepts`, :func:`wait_listening`: readiness polls. A test
  waits for the thing it needs (a port that accepts, a line in a log, a file, a counter),
  never for a fixed time: a fixed sleep is too short on a busy 2-core machine and wasted
  time everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

__all__ = [
    "accepts",
    "free_port",
    "group_members",
    "kill_group",
    "signal_each",
    "stop_process",
    "wait_listening",
    "wait_until",
    "wait_until_async",
]


def _below_ephemeral_range() -> tuple[int, int]:
    """Ports to hand out: below the kernel's ephemeral range (ip_local_port_range,
    32768-60999 by default). A port picked *inside* it can be taken as the source port
    of any outgoing connection between the pick and the server's bind (seen in CI: an
    admin listener's "address already in use"); below it only explicit binds compete."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    last = min(low - 1, 32000)
    return (10000, last) if last > 11000 else (1024, last)


_FIRST, _LAST = _below_ephemeral_range()
# One sequence per test process (its start spread by pid), so a run never hands out
# the same port twice while a server it was given has not bound it yet.
_next_port = _FIRST + (os.getpid() * 7919) % (_LAST - _FIRST)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (IPv6 if ``host`` has a colon),
    from below the ephemeral range and never the same twice in a row of calls."""
    global _next_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(_LAST - _FIRST):
        port = _next_port
        _next_port = _FIRST if _next_port >= _LAST else _next_port + 1
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:  # taken (or lingering): the next one
                continue
        return port
    raise RuntimeError(f"no free TCP port on {host} between {_FIRST} and {_LAST}")


def accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` is accepted now."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    Raises ``TimeoutError`` naming ``what`` after ``timeout`` seconds; the predicate is
    called once more at the deadline, so a slow machine never fails on the last poll.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            result = predicate()
            if result:
                return result
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str = "the condition",
    interval: float = 0.01,
) -> T:
    """:func:`wait_until` for a test inside the event loop: the loop runs between polls."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            result = predicate()
            if result:
                return result
            raise TimeoutError(f"{what}: not after {timeout} s")
        await asyncio.sleep(interval)


def wait_listening(
    host: str,
    port: int,
    timeout: float = 10.0,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until ``host:port`` accepts; fail at once if ``process`` exits meanwhile."""

    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening")
        return accepts(host, port)

    wait_until(ready, timeout, f"a listener on {host}:{port}")


def group_members(pgid: int) -> dict[int, str]:
    """Processes in process group ``pgid`` and their states (``Z`` is a zombie), from /proc."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid:
            found[int(entry)] = fields[0]
    return found


def signal_each(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each of ``pids``; one that has gone meanwhile is no error."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_group(pgid: int) -> None:
    """SIGKILL the whole process group ``pgid`` (gone already is no error)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30.0
) -> int | None:
    """Send ``sig`` and wait; SIGKILL if it is still running after ``timeout`` seconds.
    Returns the exit status (``None`` if there never was a process)."""
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)
