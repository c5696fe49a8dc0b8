"""DKIM body canonicalisation and body hashes of a body that arrives in pieces.

The whole-body functions (``canonical.simple_body`` / ``relaxed_body``) need the body in
memory; these produce the same bytes chunk by chunk, so a 50 MB message is verified (and
signed, ``signing/body_hash.py``) holding one chunk at a time:

* simple (RFC 6376 §3.4.3): the body as it is, without the empty lines at its end, ending
  with one CRLF (an empty body is a single CRLF);
* relaxed (§3.4.4): runs of spaces and tabs inside a line become one space and vanish at
  the end of a line; empty lines at the end are dropped; a non-empty body ends with CRLF.
  A body that does not end with CRLF is treated as if it did before the whitespace is
  stripped: that is what the next hop sees once DATA has added it.

The work is per whole chunk (a few C-level searches), never per line in Python. Only what
the next bytes decide is held back: the CRLFs at the end (they count only if content
follows), a final CR (maybe half a CRLF), and for relaxed the line not ended yet.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Protocol

__all__ = ["BodyHashes", "DigestKey", "RelaxedBody", "SimpleBody", "canonicalizer"]

# Only runs that change: a tab, or a space followed by more WSP. Single spaces (most of
# any text) are left alone, which makes the common case several times cheaper.
_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")
_SPACE_EOL = re.compile(rb" \r\n")
_LFCR_RUN = re.compile(rb"(?:\n\r)*")
# A relaxed line longer than this without its CRLF yet is emitted in pieces.
LONG_LINE = 64 * 1024

# (canonicalisation "simple" | "relaxed", hash name, l= or -1): one body hash.
DigestKey = tuple[str, str, int]


def trailing_crlfs(data: bytes) -> int:
    """How many CRLF pairs ``data`` ends with, looking only at its end (no copy of a
    large chunk unless it is all line ends)."""
    window = data[-256:]
    tail = len(window) - len(window.rstrip(b"\r\n"))
    if tail == len(window) and len(data) > len(window):
        window = data
        tail = len(data) - len(data.rstrip(b"\r\n"))
    if not tail:
        return 0
    # Reversed, the CRLFs are a run of LF CR at the start: one anchored match in C.
    match = _LFCR_RUN.match(window[len(window) - tail :][::-1])
    return (match.end() if match else 0) // 2


class Canonicalizer(Protocol):
    def feed(self, data: bytes) -> bytes:
        """The canonical form of everything fed so far that is settled (may be b"")."""
        ...

    def finish(self) -> bytes:
        """The rest, once the body has ended. Call once."""
        ...


class SimpleBody:
    """RFC 6376 §3.4.3, streamed."""

    def __init__(self) -> None:
        self._crlfs = 0  # CRLFs held back: they count only if content follows
        self._cr = False  # a CR at the end of the last piece, maybe half a CRLF

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if not data:
            return b""
        pairs = trailing_crlfs(data)
        content = len(data) - 2 * pairs
        if content == 0:
            self._crlfs += pairs
            return b""
        held, self._crlfs = self._crlfs, pairs
        if not held and not pairs:
            return data
        return b"\r\n" * held + data[:content]

    def finish(self) -> bytes:
        # A lone CR at the very end is content: the CRLFs before it count.
        end = b"\r\n" * self._crlfs + b"\r" if self._cr else b""
        self._crlfs, self._cr = 0, False
        return end + b"\r\n"


class RelaxedBody:
    """RFC 6376 §3.4.4, streamed. Bare LF is not expected (the SMTP reader refuses it)
    and counts as an ordinary character."""

    def __init__(self) -> None:
        self._partial = b""  # the current line, not yet ended by CRLF
        self._empty_lines = 0  # CRLFs held back: they count only if content follows
        self._line_started = False  # part of the current line was already emitted

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        data = self._partial + data
        end = data.rfind(b"\r\n")
        if end < 0:
            if len(data) > LONG_LINE:
                return self._long_line(data)
            self._partial = data
            return b""
        # A CR at the very end may be the first half of a CRLF: keep it with the partial line.
        self._partial = data[end + 2 :]
        return self._lines(data[: end + 2])

    def _lines(self, lines: bytes) -> bytes:
        """Canonicalise whole lines (``lines`` ends with CRLF)."""
        canon = _canonical_lines(lines)
        head = b""
        if self._line_started:
            # The rest of a long line emitted in pieces: up to its CRLF it is content,
            # even when that rest is empty.
            self._line_started = False
            first = canon.find(b"\r\n") + 2
            head, canon = canon[:first], canon[first:]
            if not canon:
                return head
        crlfs = trailing_crlfs(canon)
        content = len(canon) - 2 * crlfs
        if content == 0:
            self._empty_lines += crlfs
            return head
        held, self._empty_lines = self._empty_lines, crlfs - 1
        if not head and not held and crlfs == 1:
            return canon
        return head + b"\r\n" * held + canon[: content + 2]

    def _long_line(self, data: bytes) -> bytes:
        """Most of a line that goes on and on, so it is not copied again with every
        chunk; only a trailing run of spaces, tabs and CRs waits for what follows it."""
        head = data.rstrip(b" \t\r")
        self._partial = data[len(head) :]
        if not head:
            return b""
        held, self._empty_lines = self._empty_lines, 0
        if b"\t" in head or b"  " in head:
            head = _WSP_RUN.sub(b" ", head)
        self._line_started = True
        return b"\r\n" * held + head if held else head

    def finish(self) -> bytes:
        if not (self._partial or self._line_started):
            return b""
        # The body does not end with CRLF: its last line gets one (§3.4.4 c).
        last, self._partial = self._partial, b""
        return self._lines(last + b"\r\n")


def _canonical_lines(lines: bytes) -> bytes:
    """WSP runs to one space, none before CRLF; the two searches skip the work when there
    is nothing to do (plain text has neither tabs nor double spaces nor trailing blanks)."""
    if b"\t" in lines or b"  " in lines:
        lines = _WSP_RUN.sub(b" ", lines)
    if b" \r\n" in lines:
        lines = _SPACE_EOL.sub(b"\r\n", lines)
    return lines


def canonicalizer(name: str) -> Canonicalizer:
    """A fresh canonicaliser: ``"relaxed"``, else simple."""
    return RelaxedBody() if name == "relaxed" else SimpleBody()


class _Digest:
    __slots__ = ("hasher", "key", "remaining")

    def __init__(self, key: DigestKey) -> None:
        self.key = key
        self.hasher = hashlib.new(key[1])
        self.remaining = key[2]  # l=: canonical octets still to hash; -1 for all

    def update(self, data: bytes) -> None:
        if self.remaining < 0:
            self.hasher.update(data)
        elif self.remaining:
            part = memoryview(data)[: self.remaining]
            self.hasher.update(part)
            self.remaining -= len(part)


class BodyHashes:
    """Every body hash a message's signatures need, from one pass over its body:
    each canonicalisation runs once, feeding each hash (and l=) that uses it."""

    def __init__(self, keys: Iterable[DigestKey]) -> None:
        self._digests: dict[DigestKey, _Digest] = {}
        self._canons: dict[str, tuple[Canonicalizer, list[_Digest]]] = {}
        for key in keys:
            if key in self._digests:
                continue
            digest = self._digests[key] = _Digest(key)
            if key[0] not in self._canons:
                self._canons[key[0]] = (canonicalizer(key[0]), [])
            self._canons[key[0]][1].append(digest)
        self._done = False

    def update(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("body hashes already finished")
        for canon, digests in self._canons.values():
            out = canon.feed(data)
            if out:
                for digest in digests:
                    digest.update(out)

    def digests(self) -> dict[DigestKey, bytes]:
        if not self._done:
            self._done = True
            for canon, digests in self._canons.values():
                out = canon.finish()
                for digest in digests:
                    digest.update(out)
        return {key: d.hasher.digest() for key, d in self._digests.items()}
