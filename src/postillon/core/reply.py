"""SMTP replies with enhanced status codes (RFC 5321 §4.2, RFC 2034, RFC 3463).

Every reply postillon sends carries an enhanced status code, so a client that
negotiated ENHANCEDSTATUSCODES (and every operator reading a log) can tell
"mailbox unknown" from "relay denied" without parsing English.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) SMTP reply.

    ``status`` is the enhanced status code ("2.1.0"), or ``None`` for replies that
    RFC 2034 exempts (the 220 greeting and the EHLO/HELO response) and for replies
    parsed from peers that do not send one.
    """

    code: int
    status: str | None
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.status is not None:
            m = _ENHANCED.match(self.status)
            if m is None or m.group(1) != str(self.code)[0]:
                raise ValueError(f"enhanced status {self.status!r} does not match {self.code}")
        if not self.lines:
            object.__setattr__(self, "lines", ("",))
        for line in self.lines:
            if "\r" in line or "\n" in line:
                raise ValueError("reply text must not contain CR or LF")

    @classmethod
    def of(cls, code: int, status: str | None, *lines: str) -> Reply:
        return cls(code, status, tuple(lines) or ("",))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def to_bytes(self) -> bytes:
        out: list[str] = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            body = f"{self.status} {line}" if self.status else line
            out.append(f"{self.code}{sep}{body}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        head = f"{self.code} {self.status}" if self.status else str(self.code)
        return f"{head} {' / '.join(self.lines)}".rstrip()


# Replies used in more than one place; naming them keeps tests and code in step
# (aiosmtpd's testing/statuscodes.py habit).
OK = Reply.of(250, "2.0.0", "Ok")
BAD_SEQUENCE = Reply.of(503, "5.5.1", "Bad sequence of commands")
SYNTAX_ERROR = Reply.of(500, "5.5.2", "Syntax error, command unrecognized")
PARAM_SYNTAX = Reply.of(501, "5.5.4", "Syntax error in parameters or arguments")
LINE_TOO_LONG = Reply.of(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1)")
BARE_LINE_ENDING = Reply.of(
    500, "5.5.2", "Bare CR or LF not allowed; lines end with CRLF (RFC 5321 2.3.8)"
)
NUL_NOT_ALLOWED = Reply.of(500, "5.5.2", "NUL character not allowed")
TEMP_LOCAL_ERROR = Reply.of(451, "4.3.0", "Temporary local problem, try again later")
SERVICE_CLOSING = Reply.of(221, "2.0.0", "Bye")
TOO_MANY_ERRORS = Reply.of(421, "4.7.0", "Too many errors, closing connection")
TIMEOUT = Reply.of(421, "4.4.2", "Timeout exceeded, closing connection")
SHUTTING_DOWN = Reply.of(421, "4.3.2", "Service shutting down, closing connection")
