"""Syslog output: message framing (RFC 5424 and RFC 3164) and a handler that
sends each record as one datagram to the local syslog socket.

The framing functions are pure (record in, bytes out) so the exact bytes can
be tested; ``SyslogHandler`` only adds the socket. Python's own
``logging.handlers.SysLogHandler`` sends ``<PRI>message`` without a
timestamp, host name or process id, which neither RFC describes; rsyslog
copes, strict receivers do not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

# RFC 5424 6.2.1, table 1 (the same numbers as RFC 3164 4.1.1).
FACILITIES = {
    "user": 1,
    "mail": 2,
    "daemon": 3,
    **{f"local{n}": 16 + n for n in range(8)},
}
# RFC 5424 6.2.1, table 2: logging levels → severities.
_SEVERITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),  # informational; notice (5) would be too loud for mail events
    (logging.DEBUG, 7),
)
APP_NAME = "postillon"
# RFC 5424 6.1: receivers must accept 480 octets and should accept 2048; a
# local socket takes much more, but mail-log lines are short anyway.
MAX_MESSAGE = 8192


def severity(levelno: int) -> int:
    for threshold, value in _SEVERITY:
        if levelno >= threshold:
            return value
    return 7


def priority(facility: str, levelno: int) -> int:
    return FACILITIES[facility] * 8 + severity(levelno)


def _printable_ascii(text: str, limit: int) -> str:
    """Header fields of RFC 5424 are PRINTUSASCII (33-126); replace the rest."""
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "_" for c in text)
    return cleaned[:limit] or "-"


def format_rfc5424(
    pri: int, timestamp: float, hostname: str, pid: int, message: str, app: str = APP_NAME
) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG`` (RFC 5424 6).

    The timestamp is UTC with milliseconds (6.2.3); MSG is UTF-8 with a BOM
    (6.4), so a receiver knows it may decode it.
    """
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp))
    millis = int((timestamp % 1) * 1000)
    header = (
        f"<{pri}>1 {stamp}.{millis:03d}Z {_printable_ascii(hostname, 255)} "
        f"{_printable_ascii(app, 48)} {pid} - -"
    )
    body = message.replace("\n", " ")
    return (header.encode("ascii") + b" \xef\xbb\xbf" + body.encode("utf-8"))[:MAX_MESSAGE]


def format_rfc3164(
    pri: int, timestamp: float, hostname: str, pid: int, message: str, app: str = APP_NAME
) -> bytes:
    """``<PRI>Mmm dd hh:mm:ss HOSTNAME TAG[PID]: MSG`` (RFC 3164 4.1).

    The timestamp is local time with the day space-padded (4.1.2), as every
    traditional syslogd writes it.
    """
    local = time.localtime(timestamp)
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    stamp = f"{months[local.tm_mon - 1]} {local.tm_mday:2d} {time.strftime('%H:%M:%S', local)}"
    host = _printable_ascii(hostname.split(".")[0], 255)
    body = message.replace("\n", " ")
    return f"<{pri}>{stamp} {host} {app}[{pid}]: {body}".encode()[:MAX_MESSAGE]


class SyslogHandler(logging.Handler):
    """Send records as datagrams to a unix socket (``/dev/log`` by default).

    A syslog daemon that restarts makes the next send fail; the handler then
    reconnects once and tries again, and otherwise drops the line (logging
    must never stop mail).
    """

    def __init__(
        self,
        address: Path,
        *,
        rfc: str = "rfc3164",
        facility: str = "mail",
        hostname: str | None = None,
    ) -> None:
        super().__init__()
        self.address = str(address)
        self.facility = facility
        self.hostname = hostname or socket.gethostname()
        self._format = format_rfc5424 if rfc == "rfc5424" else format_rfc3164
        self._sock_lock = threading.Lock()
        self._complained_at = float("-inf")
        # Connect now: a wrong socket path is a configuration error at start
        # (or a refused reload), not a silent loss of every log line.
        self._sock: socket.socket | None = None
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(self.address)
        except OSError:
            sock.close()
            raise
        return sock

    def frame(self, record: logging.LogRecord) -> bytes:
        return self._format(
            priority(self.facility, record.levelno),
            record.created,
            self.hostname,
            os.getpid(),
            self.format(record),
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = self.frame(record)
            with self._sock_lock:
                for attempt in (1, 2):
                    try:
                        if self._sock is None:
                            self._sock = self._connect()
                        self._sock.send(data)
                        return
                    except OSError:
                        if self._sock is not None:
                            self._sock.close()
                            self._sock = None
                        if attempt == 2:
                            raise
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """One short line on stderr at most once a minute, not a traceback per
        record, while the syslog daemon is away."""
        now = time.monotonic()
        if now - self._complained_at < 60:
            return
        self._complained_at = now
        with contextlib.suppress(Exception):
            sys.stderr.write(f"postillon: cannot write to the syslog socket {self.address}\n")

    def close(self) -> None:
        with self._sock_lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        super().close()
