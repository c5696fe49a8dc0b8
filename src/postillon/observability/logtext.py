"""What a log line may contain: the one filter every record passes.

A remote server's reply, a client's HELO name or address, an exception's
message: text from outside reaches log lines. In a line-based log a CR or LF
in such a value would forge whole lines (``QUEUEID: delivered: ...``) and an
ESC would drive the terminal of whoever reads the log. ``SafeFormatter``
therefore writes every C0 control, DEL, C1 control and Unicode line or
paragraph separator of a message as a visible escape (``\\n``, ``\\x1b``,
``\\u2028``), and removes the password of any URL quoted in it
(``core.credentials.redact``). Tracebacks keep their line breaks, but every
line of one starts with a tab, so none can pass for a record.

JSON lines (``[log] format = "json"``) get the same treatment: ``json.dumps``
already escapes C0 controls, and ``json_line`` escapes the rest as JSON does,
so a JSON record is never altered by the formatter afterwards.
"""

from __future__ import annotations

import logging
import re

from postillon.core.credentials import redact

# C0, DEL, C1 (U+0085 NEL is a line break to some readers), and U+2028/U+2029,
# which Python's str.splitlines() and some viewers treat as line breaks.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    if c in _SHORT:
        return _SHORT[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a visible escape."""
    if _UNSAFE.search(text) is None:  # the common case: nothing to do
        return text
    return _UNSAFE.sub(_escape, text)


def json_line(text: str) -> str:
    """A ``json.dumps`` result with the controls it leaves raw (DEL, C1,
    U+2028/9) escaped as JSON escapes: still the same JSON value."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class SafeFormatter(logging.Formatter):
    """``logging.Formatter`` whose records can never span lines or carry secrets."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(redact(super().formatMessage(record)))

    _stamp: tuple[int, str | None, str] = (-1, None, "")  # second, datefmt, its text

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As logging's, formatted once per second when ``datefmt`` has no
        sub-second part (every line of a busy second shares the text)."""
        if datefmt is None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached_second, cached_fmt, text = self._stamp
        if second != cached_second or datefmt != cached_fmt:
            text = super().formatTime(record, datefmt)
            self._stamp = (second, datefmt, text)
        return text

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("\t" + escape_controls(redact(line)) for line in text.split("\n"))
