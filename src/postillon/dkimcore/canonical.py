"""Header fields and canonicalisation (RFC 6376 §3.4, §5.4.2).

A header field is ``(name, value)`` as written: the name without the colon, the value
after it with its folding (CRLF + WSP) kept and no final CRLF.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Field = tuple[bytes, bytes]


class HeaderFormatError(ValueError):
    """A line in the header section that is neither a field nor a continuation."""


_WSP = re.compile(rb"[ \t]+")
# One field: a name, a colon, the value with its continuation lines, the CRLF.
_FIELD = re.compile(rb"([^ \t\r\n:][^:\r\n]*):([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)\r\n")
# Only runs that relaxed canonicalisation changes: a tab, or a space followed by more WSP.
# Single spaces (most of any text) are left alone, which makes the common case cheap.
_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")
_SPACE_EOL = re.compile(rb" \r\n")
_LFCR_RUN = re.compile(rb"(?:\n\r)*")


def header_fields(header: bytes) -> list[Field]:
    """The fields of a header section (CRLF lines, with or without the final CRLF)."""
    if not header.endswith(b"\r\n"):
        header += b"\r\n"
    fields: list[Field] = []
    match = _FIELD.match
    pos, end = 0, len(header)
    while pos < end:
        found = match(header, pos)
        if found is None:
            line = header[pos : header.find(b"\r\n", pos)]
            if not line:  # an empty line: the header section has ended
                break
            raise HeaderFormatError(f"not a header field: {line[:40]!r}")
        fields.append((found.group(1), found.group(2)))
        pos = found.end()
    return fields


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """(header section without its final empty line, body); no empty line: all header."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 4 :]


def select_headers(fields: Sequence[Field], names: Sequence[bytes]) -> list[Field]:
    """RFC 6376 §5.4.2: each name in h= (lower-case) takes the last instance of that field
    not yet taken (bottom-up); a name listed more often than it occurs takes nothing."""
    by_name: dict[bytes, list[Field]] = {}
    for field in fields:
        by_name.setdefault(field[0].lower(), []).append(field)
    taken: dict[bytes, int] = {}
    out: list[Field] = []
    for name in names:
        instances = by_name.get(name)
        used = taken.get(name, 0)
        if instances and used < len(instances):
            out.append(instances[-1 - used])
            taken[name] = used + 1
    return out


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2: lower-case name, unfolded value with WSP runs as one space and none
    at either end; ``name:value\\r\\n``. The substitutions run only when needed."""
    if b"\n" in value:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP.sub(b" ", value)
    return name.lower().rstrip(b" \t") + b":" + value.strip(b" \t") + b"\r\n"


def simple_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.1: the field exactly as it arrived."""
    return name + b":" + value + b"\r\n"


def _without_trailing_crlfs(data: bytes) -> bytes:
    """``data`` without the CRLF pairs at its end (one C-level match, not a Python loop)."""
    tail = len(data) - len(data.rstrip(b"\r\n"))
    if not tail:
        return data
    match = _LFCR_RUN.match(data[len(data) - tail :][::-1])
    pairs = (match.end() if match else 0) // 2
    return data[: len(data) - 2 * pairs]


def simple_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.3: empty lines at the end removed; the body ends with one CRLF (an
    empty body is a single CRLF)."""
    return _without_trailing_crlfs(body) + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4: WSP runs inside a line become one space, WSP at line ends goes,
    empty lines at the end go; a non-empty body ends with CRLF, an empty one is empty.

    A body that does not end with CRLF is treated as if it did before the whitespace is
    stripped (as :class:`postillon.signing.body_hash.RelaxedBodyHash` does)."""
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    if b" \r\n" in body:
        body = _SPACE_EOL.sub(b"\r\n", body)
    content = _without_trailing_crlfs(body)
    return content + b"\r\n" if content else b""
