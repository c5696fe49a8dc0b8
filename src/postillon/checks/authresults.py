"""Authentication-Results (RFC 8601): the verdict values, their rendering, and
the removal of forged copies.

Pure: bytes and values in, bytes out. The inbound checks (``spf_check``,
``dkim_check``, ``dmarc_check``, ``arc_check``) each produce
:class:`MethodResult` values; :func:`render` turns them into one header field
naming this host (the authserv-id), and :func:`strip_own_results` removes any
``Authentication-Results:`` field a sender wrote in our name (RFC 8601 §5:
an MTA MUST remove, or rename, fields that claim its authserv-id, otherwise a
sender could forge our verdicts for the MUAs that trust them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 8601 §2.2 / RFC 2045 token characters (a value outside them is quoted).
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~@]+")
_FIELD = re.compile(rb"(?m)^([!-9;-~]+)[ \t]*:")
_HEADER_NAME = b"authentication-results"


@dataclass(frozen=True, slots=True)
class MethodResult:
    """One ``method=result`` clause: e.g. ``spf=pass smtp.mailfrom=a@example.org``.

    ``properties`` are ``(ptype.property, value)`` pairs in the order written;
    ``comment`` goes in parentheses after the result (a reason for humans).
    """

    method: str
    result: str
    comment: str = ""
    properties: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str:
        for key, value in self.properties:
            if key == name:
                return value
        return ""


def _value(text: str) -> str:
    """A pvalue: a token as is, anything else as an RFC 5322 quoted-string."""
    if _TOKEN.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{_printable(escaped)}"'


def _printable(text: str) -> str:
    """No CR, LF or other controls in our header, whatever DNS or a sender gave us."""
    if text.isprintable():  # the usual case: nothing to replace
        return text
    return "".join(c if c.isprintable() else " " for c in text)


def _comment(text: str) -> str:
    cleaned = _printable(text).replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f" ({cleaned})" if cleaned else ""


def render_clause(result: MethodResult) -> str:
    parts = [f"{result.method}={result.result}{_comment(result.comment)}"]
    parts.extend(f"{key}={_value(value)}" for key, value in result.properties if value)
    return " ".join(parts)


def render(authserv_id: str, results: list[MethodResult]) -> bytes:
    """The whole header field, folded one clause per line, CRLF-terminated.

    With no results the field says ``none`` (RFC 8601 §2.2: no checks ran).
    """
    head = f"Authentication-Results: {authserv_id}"
    if not results:
        return f"{head}; none\r\n".encode()
    clauses = ";\r\n\t".join(render_clause(r) for r in results)
    return f"{head};\r\n\t{clauses}\r\n".encode()


_FOLD = re.compile(r"\r?\n[ \t]")


def _authserv_id(value: bytes) -> str:
    """The authserv-id of a field body: the first token, comments skipped."""
    text = value.decode("utf-8", errors="replace")
    # Drop comments (not nested beyond one level: enough to find the first token).
    text = re.sub(r"\([^()]*\)", " ", text)
    token = text.strip().split(";", 1)[0].split()
    return token[0].lower().rstrip(".") if token else ""


def split_fields(header: bytes) -> list[bytes]:
    """A header section as raw fields, each with its continuation lines and CRLF."""
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def strip_own_results(header: bytes, authserv_id: str) -> tuple[bytes, int]:
    """Remove every Authentication-Results field that claims ``authserv_id``.

    Returns the new header section and how many fields were removed. Fields
    naming other hosts stay: they are someone else's (possibly useful) claims.
    """
    if _HEADER_NAME not in header.lower():  # the usual case: no such field at all
        return header, 0
    own = authserv_id.lower().rstrip(".")
    kept: list[bytes] = []
    removed = 0
    for field in split_fields(header):
        match = _FIELD.match(field)
        is_results = match is not None and match.group(1).lower() == _HEADER_NAME
        if is_results and match is not None and _authserv_id(field[match.end() :]) == own:
            removed += 1
            continue
        kept.append(field)
    return b"".join(kept), removed


def header_values(header: bytes, name: str) -> list[str]:
    """The unfolded values of every field called ``name`` (case-insensitive)."""
    wanted = name.lower().encode()
    out = []
    for field in split_fields(header):
        match = _FIELD.match(field)
        if match is not None and match.group(1).lower() == wanted:
            out.append(unfold(field[match.end() :].decode("utf-8", errors="replace")))
    return out


def unfold(raw: str) -> str:
    """A field value on one line: each line break with the blank after it becomes a space."""
    return _FOLD.sub(" ", raw).strip() if "\n" in raw else raw.strip()
