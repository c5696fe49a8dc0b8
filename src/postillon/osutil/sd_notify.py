"""systemd's notify protocol (sd_notify(3)), for ``Type=notify`` units.

    systemd ──$NOTIFY_SOCKET, $WATCHDOG_USEC──▶ postillon serve
    postillon ──"READY=1" / "RELOADING=1" / "STOPPING=1" / "WATCHDOG=1"──▶ systemd

The protocol is one datagram per message on the unix socket named by ``$NOTIFY_SOCKET``
(a path, or ``@name`` in the abstract namespace), each ``KEY=value`` on its own line.
The socket is connected once, before the server drops root: a connected datagram socket
keeps working whatever user the process becomes, and systemd accepts the messages from
the main process (``NotifyAccess=main``).

Nothing here may stop the server: outside systemd (no ``$NOTIFY_SOCKET``) every call is a
no-op, and a failed send is logged once and otherwise ignored (systemd then restarts the
service for its own reasons, e.g. the watchdog, which is what the watchdog is for).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("postillon")

__all__ = ["SystemdNotifier"]


class SystemdNotifier:
    """Sends notify messages to systemd; a no-op when not started by systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._sock: socket.socket | None = None
        self._failed = False
        # Half the interval systemd waits (sd_watchdog_enabled(3) advises pinging more
        # often than the timeout); None = no watchdog configured.
        self.watchdog_interval: float | None = (
            watchdog_usec / 2_000_000 if watchdog_usec and watchdog_usec > 0 else None
        )
        if not address:
            return
        if address.startswith("@"):  # the abstract namespace
            address = "\0" + address[1:]
        if not (address.startswith("/") or address.startswith("\0")):
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path: not notifying", address)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            log.warning("cannot connect to NOTIFY_SOCKET %r: %s", address, exc)
            return
        self._sock = sock

    @classmethod
    def from_environment(cls, environ: dict[str, str] | None = None) -> SystemdNotifier:
        """From ``$NOTIFY_SOCKET`` and ``$WATCHDOG_USEC`` (honoured only when
        ``$WATCHDOG_PID`` is unset or names this process, as sd_watchdog_enabled does).
        The variables are removed from this process's environment afterwards, so that
        no helper process started later believes it is the service."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        watchdog_usec: int | None = None
        pid = env.get("WATCHDOG_PID")
        if pid is None or pid == str(os.getpid()):
            try:
                watchdog_usec = int(env.get("WATCHDOG_USEC", ""))
            except ValueError:
                watchdog_usec = None
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.send("\n".join(fields).encode("utf-8", "replace"))
        except OSError as exc:
            if not self._failed:  # once: a gone systemd must not flood the log
                log.warning("systemd notify failed: %s", exc)
            self._failed = True

    def ready(self, status: str) -> None:
        """Listeners bound, queue loaded: ``systemctl start`` returns now."""
        self.send("READY=1", f"STATUS={_one_line(status)}", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) tell this reload
        # from an earlier one; older versions ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def reloaded(self, status: str) -> None:
        self.send("READY=1", f"STATUS={_one_line(status)}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: finishing sessions and deliveries")

    def status(self, text: str) -> None:
        self.send(f"STATUS={_one_line(text)}")

    async def watchdog(self) -> None:
        """Ping systemd's watchdog from the event loop, so that a loop that hangs
        stops the pings and systemd restarts the service. Runs until cancelled."""
        if self._sock is None or self.watchdog_interval is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
