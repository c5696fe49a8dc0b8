"""The DKIM body hash (``bh=``) of a body that arrives in pieces.

Relaxed body canonicalisation (RFC 6376 §3.4.4), done on the fly so a 50 MB body never has
to be in memory at once:

* runs of spaces and tabs inside a line become one space, and at the end of a line vanish;
* empty lines at the end of the body are dropped; a non-empty body ends with CRLF.

A body that does not end with CRLF (possible only with BDAT) is hashed as if the CRLF were
there before whitespace is stripped: that is what the next hop sees once DATA has added it.
Bare LF is not expected (the SMTP reader refuses it) and counts as an ordinary character.

The work is per whole chunk (two regular-expression passes), not per line in Python. Only a
line that has not ended yet and a count of empty lines seen at the end are held back, because
what follows decides what they become.
"""

from __future__ import annotations

import hashlib
import re

# Only runs that change: a tab, or a space followed by more WSP. Single spaces (most of
# any text) are left alone, which makes the common case several times cheaper.
_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")
_SPACE_EOL = re.compile(rb" \r\n")
_LFCR_RUN = re.compile(rb"(?:\n\r)*")
# A line longer than this without its CRLF yet is hashed in pieces (see _long_line).
LONG_LINE = 64 * 1024


class RelaxedBodyHash:
    """Feed the body (after the empty line that ends the header section) with :meth:`update`,
    then read :meth:`digest` once. SHA-256, the only hash RFC 8301 §3.1 still allows."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""  # the current line, not yet ended by CRLF
        self._empty_lines = 0  # CRLFs held back: they count only if content follows
        self._done = False
        self._line_started = False  # part of the current line is already hashed

    def update(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("body hash already finished")
        if not data:
            return
        data = self._partial + data
        end = data.rfind(b"\r\n")
        if end < 0:
            if len(data) > LONG_LINE:
                self._long_line(data)
            else:
                self._partial = data
            return
        # A CR at the very end may be the first half of a CRLF: keep it with the partial line.
        self._partial = data[end + 2 :]
        self._lines(data[: end + 2])

    def _lines(self, lines: bytes) -> None:
        """Canonicalise and hash whole lines (``lines`` ends with CRLF)."""
        canon = _canonical_lines(lines)
        if self._line_started:
            # The rest of a long line hashed in pieces: up to its CRLF it is content,
            # even when that rest is empty.
            self._line_started = False
            first = canon.find(b"\r\n") + 2
            self._hash.update(memoryview(canon)[:first])
            canon = canon[first:]
            if not canon:
                return
        # The CRLFs at the end: the last line's own, then one per empty line. Reversed, they
        # are a run of LF CR at the start, which one anchored match measures in C.
        tail = len(canon) - len(canon.rstrip(b"\r\n"))
        match = _LFCR_RUN.match(canon[len(canon) - tail :][::-1])
        crlfs = (match.end() if match else 0) // 2
        content = len(canon) - 2 * crlfs
        if content == 0:
            self._empty_lines += crlfs
            return
        if self._empty_lines:
            self._hash.update(b"\r\n" * self._empty_lines)
        self._hash.update(memoryview(canon)[: content + 2])
        self._empty_lines = crlfs - 1

    def _long_line(self, data: bytes) -> None:
        """Hash most of a line that goes on and on, so it is not copied again with every
        chunk; only a trailing run of spaces, tabs and CRs waits for what follows it."""
        head = data.rstrip(b" \t\r")
        self._partial = data[len(head) :]
        if not head:
            return
        if self._empty_lines:
            self._hash.update(b"\r\n" * self._empty_lines)
            self._empty_lines = 0
        if b"\t" in head or b"  " in head:
            head = _WSP_RUN.sub(b" ", head)
        self._hash.update(head)
        self._line_started = True

    def digest(self) -> bytes:
        if not self._done:
            self._done = True
            if self._partial or self._line_started:
                # The body does not end with CRLF: its last line gets one (§3.4.4 c).
                self._lines(self._partial + b"\r\n")
                self._partial = b""
        return self._hash.digest()


def _canonical_lines(lines: bytes) -> bytes:
    """WSP runs to one space, none before CRLF; the two searches skip the work when there
    is nothing to do (plain text has neither tabs nor double spaces nor trailing blanks)."""
    if b"\t" in lines or b"  " in lines:
        lines = _WSP_RUN.sub(b" ", lines)
    if b" \r\n" in lines:
        lines = _SPACE_EOL.sub(b"\r\n", lines)
    return lines
