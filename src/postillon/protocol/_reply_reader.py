"""Framing of the bytes a server sends: reply lines into ``Reply`` values (client side).

The server core's readers (``_readers.py``) frame what a client sends; this is
their counterpart for ``ClientConnection``. Multi-line replies (RFC 5321
§4.2.1) are collected line by line; the enhanced status code (RFC 2034/3463)
is split off into ``Reply.status``. Lines may end in CRLF or a bare LF: be
liberal in what a *server* says (there is no smuggling risk in replies).

A malformed line, a code that changes within a reply, an overlong line or too
many lines raise :class:`ClientProtocolError` (the client core's one error
type); ``ClientConnection.next_event`` turns it into a ``ProtocolViolation``.
"""

from __future__ import annotations

import re

from postillon.core.reply import Reply
from postillon.protocol.errors import ClientProtocolError

__all__ = ["MAX_REPLY_LINE", "MAX_REPLY_LINES", "ReplyReader"]

# RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; real servers send longer
# ones (long EHLO AUTH lists, policy texts), so 4096 including the line end.
MAX_REPLY_LINE = 4096
# Lines per reply: a long EHLO list has ~20, a verbose policy reply a few dozen.
# More is a broken or hostile server holding us in a loop.
MAX_REPLY_LINES = 200

_CODE = re.compile(rb"[2-5][0-5][0-9]\Z")  # RFC 5321 §4.2.1: second digit 0-5
_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: +|\Z)")


class ReplyReader:
    """Takes complete replies from a receive buffer; keeps the lines of one in progress."""

    __slots__ = ("_code", "_lines")

    def __init__(self) -> None:
        self._lines: list[str] = []  # the lines of the reply being read
        self._code = 0

    @property
    def partial(self) -> bool:
        """Some lines of a reply were read, not its last one."""
        return bool(self._lines)

    def reset(self) -> None:
        """Forget a reply in progress (the connection closed, or STARTTLS began)."""
        self._lines = []

    def read(self, buf: bytearray) -> Reply | None:
        """One complete reply from ``buf``, or None if more bytes are needed."""
        while True:
            i = buf.find(b"\n", 0, MAX_REPLY_LINE)
            if i < 0:
                if len(buf) >= MAX_REPLY_LINE:
                    raise ClientProtocolError(f"reply line longer than {MAX_REPLY_LINE} octets")
                return None
            line = bytes(buf[:i])
            del buf[: i + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            code, is_last, text = _parse_line(line)
            if self._lines and code != self._code:
                raise ClientProtocolError(f"reply code changed within a reply: {_show(line)}")
            self._code = code
            self._lines.append(text)
            if is_last:
                texts, self._lines = self._lines, []
                return _make_reply(code, texts)
            if len(self._lines) >= MAX_REPLY_LINES:
                raise ClientProtocolError(f"reply longer than {MAX_REPLY_LINES} lines")


def _parse_line(line: bytes) -> tuple[int, bool, str]:
    """(code, is_last, text) of one reply line (RFC 5321 §4.2: Reply-line)."""
    if not _CODE.match(line[:3]):
        raise ClientProtocolError(f"malformed reply line {_show(line)}")
    sep = line[3:4]
    if sep not in (b"", b" ", b"-"):
        raise ClientProtocolError(f"malformed reply line {_show(line)}")
    text = line[4:].decode("utf-8", "replace")
    if "\r" in text or "\x00" in text:
        text = text.replace("\r", "?").replace("\x00", "?")
    return int(line[:3]), sep != b"-", text


def _show(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")


def _make_reply(code: int, texts: list[str]) -> Reply:
    """Split the enhanced status code (RFC 2034) off the lines that carry it."""
    status: str | None = None
    m = _STATUS.match(texts[0])
    if m is not None and m.group(1) == str(code)[0]:
        status = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    if status is None:
        return Reply(code, None, tuple(texts))
    lines = []
    for text in texts:
        m = _STATUS.match(text)
        if m is not None and f"{m.group(1)}.{m.group(2)}.{m.group(3)}" == status:
            text = text[m.end() :]
        lines.append(text)
    return Reply(code, status, tuple(lines))
