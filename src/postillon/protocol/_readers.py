"""Framing of the bytes the peer sends: command lines, the DATA body, BDAT chunks.

Every reader consumes from the connection's receive buffer (a ``bytearray``)
and never holds more than what is in it: a body streams through in the chunks
the peer sends. The body readers search whole chunks with ``bytes.find`` and
``bytes.count`` (no per-line Python loops), carrying at most four octets
(a possible partial ``CRLF.CR``) from one chunk to the next.

Line discipline (RFC 5321 §2.3.8, §4.1.1.4): a line ends with CRLF and with
nothing else. A bare CR or LF never ends a command or the message; a message
containing one is refused after its real end marker (SMTP smuggling,
CVE-2023-51764 and relatives).
"""

from __future__ import annotations

from postillon.core.reply import Reply
from postillon.protocol import replies as R

CRLF = b"\r\n"
END_MARKER = b"\r\n.\r\n"
_CR = 0x0D
_LF = 0x0A


def read_line(buf: bytearray, limit: int) -> bytes | None:
    """Take one CRLF-terminated line (without its CRLF) from ``buf``.

    Returns None when no CRLF lies within the first ``limit`` octets: then more
    data is needed, or (``len(buf) >= limit``) the line is too long and the
    caller switches to ``discard_line``. Nothing is consumed in either case.
    """
    i = buf.find(CRLF, 0, limit)
    if i < 0:
        return None
    line = bytes(buf[:i])
    del buf[: i + 2]
    return line


def discard_line(buf: bytearray) -> bool:
    """Drop octets up to and including the next CRLF; True once it was found.

    A trailing CR is kept, as it may be the first half of the CRLF.
    """
    i = buf.find(CRLF)
    if i >= 0:
        del buf[: i + 2]
        return True
    if buf.endswith(b"\r"):
        del buf[:-1]
    else:
        buf.clear()
    return False


def _held_back(s: bytes) -> int:
    """Length of the longest suffix of ``s`` that may begin the end marker or a CRLF."""
    if s.endswith(b"\r"):
        return 4 if s.endswith(b"\r\n.\r") else 1
    if s.endswith(b"\r\n."):
        return 3
    if s.endswith(CRLF):
        return 2
    return 0


def has_bare_line_ending(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """True if ``data[start:end]`` holds a CR or LF that is not part of a CRLF.

    The slice must not end with a CR whose LF is still to come.
    """
    if end is None:
        end = len(data)
    crlf = data.count(CRLF, start, end)
    return data.count(b"\r", start, end) != crlf or data.count(b"\n", start, end) != crlf


class _ContentFaults:
    """What is wrong with a message's content so far.

    Every fault is recorded, not only the first, and the reply follows a fixed
    priority (bare CR/LF, then NUL, then size): so the refusal does not depend
    on how the peer's packets happened to split the message.
    """

    __slots__ = ("_bare", "_nul", "_too_big")

    def __init__(self) -> None:
        self._bare = False
        self._nul = False
        self._too_big = False

    @property
    def failure(self) -> Reply | None:
        if self._bare:
            return R.BODY_BARE_LINE_ENDING
        if self._nul:
            return R.BODY_NUL
        if self._too_big:
            return R.MESSAGE_TOO_BIG
        return None

    def _check(self, data: bytes, start: int, end: int) -> bool:
        """Record the faults in ``data[start:end]``; True while the content is still good."""
        if not self._bare and has_bare_line_ending(data, start, end):
            self._bare = True
        if not self._nul and data.find(b"\x00", start, end) >= 0:
            self._nul = True
        return not (self._bare or self._nul or self._too_big)


class DataReader(_ContentFaults):
    """The DATA body after 354: until the first CRLF "." CRLF (RFC 5321 §4.1.1.4).

    The CRLF before the dot may be the one ending the last content line, and
    the body starts as if a CRLF preceded it (so ``".\\r\\n"`` at once is an
    empty body). Content is dot-unstuffed (§4.5.2). After a fault (size, bare
    CR/LF, NUL) nothing more is returned but the end marker is still looked for.
    """

    __slots__ = ("_at_line_start", "_max_size", "size")

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self._at_line_start = True  # a virtual CRLF precedes the buffer
        self._max_size = max_size
        self.size = 0

    def read(self, buf: bytearray) -> tuple[bytes, bool]:
        """Consume what can be consumed; return (content, finished)."""
        if not buf:
            return b"", False
        prefix = self._at_line_start
        s = CRLF + buf if prefix else bytes(buf)
        end = s.find(END_MARKER)
        if end >= 0:
            cut = end + 2  # keep the CRLF that ends the last line
            consumed = end + 5
        else:
            cut = consumed = len(s) - _held_back(s)
        if prefix:
            if cut == 0:
                return b"", False
            consumed -= 2
            self._at_line_start = False
        del buf[:consumed]
        done = end >= 0
        if not self._check(s, 0, cut):
            return b"", done
        content = s[:cut].replace(b"\r\n.", CRLF)  # dot-unstuffing
        if prefix:
            content = content[2:]
        if self._max_size and self.size + len(content) > self._max_size:
            self._too_big = True
            return b"", done
        self.size += len(content)
        return content, done


class BdatBody(_ContentFaults):
    """Content checks across the BDAT chunks of one message (RFC 3030).

    No dot-unstuffing; a CRLF may straddle two chunks. The size limit is checked
    by the caller when a chunk is announced.
    """

    __slots__ = ("_last_cr", "size")

    def __init__(self) -> None:
        super().__init__()
        self._last_cr = False
        self.size = 0

    def feed(self, seg: bytes) -> bytes:
        """Check one segment; return it, or b"" once the message is refused."""
        if not seg:
            return b""
        self.size += len(seg)
        start = 0
        if self._last_cr:
            if seg[0] == _LF:
                start = 1
            else:
                self._bare = True
        end = len(seg)
        self._last_cr = seg[-1] == _CR
        if self._last_cr:
            end -= 1
        return seg if self._check(seg, start, end) else b""

    def finish(self) -> None:
        """The LAST chunk ended: a CR still waiting for its LF is bare."""
        if self._last_cr:
            self._bare = True


class ChunkReader:
    """Exactly ``size`` octets after a BDAT command.

    ``body`` None means discard them; ``refusal`` is then the reply to give
    once they are consumed (None when the command's reply is already queued).
    """

    __slots__ = ("body", "last", "refusal", "remaining", "size")

    def __init__(
        self, size: int, last: bool, body: BdatBody | None, refusal: Reply | None = None
    ) -> None:
        self.size = size
        self.last = last
        self.remaining = size
        self.body = body
        self.refusal = refusal

    def read(self, buf: bytearray) -> tuple[bytes, bool]:
        """Consume up to ``remaining`` octets; return (content to pass on, finished)."""
        take = min(self.remaining, len(buf))
        if take == 0:
            return b"", self.remaining == 0
        if take == len(buf):
            seg = bytes(buf)
            buf.clear()
        else:
            seg = bytes(buf[:take])
            del buf[:take]
        self.remaining -= take
        data = self.body.feed(seg) if self.body is not None else b""
        return data, self.remaining == 0
