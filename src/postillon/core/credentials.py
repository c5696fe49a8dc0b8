"""URLs that carry a password: one parser for the smarthost URL, and one
redaction for every message that might quote such a URL.

The smarthost (``smtp://user:password@host:587``) and the PostgreSQL queue
(``postgresql://user:password@host/db``) are configured as URLs with the
password inside. Any message that quotes one (a config error, a refused
reload, a store error, a log line) goes through :func:`redact` first, so the
password never reaches a terminal, a log file or an HTTP answer.

``parse_smarthost_url`` is the only parser of the smarthost URL: the config
check runs it and the server builds its next hop from its result, so a URL
that passes ``check-config`` is a URL the server starts with (a ``#`` in an
unencoded password used to pass the check and then fail at start).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

REDACTED = "***"

# scheme://user:password@ — the password runs to the last "@" of the
# non-blank run (a password may hold an unencoded "@", "#" or "/"). Greedy on
# purpose: redacting too much is harmless, too little is not. It stops at a
# double quote so that a URL inside a JSON log record keeps the record valid.
# One slash is enough: "smtp:/user:password@host" is a typo worth an error
# message, and that message must not show the password either.
_USERINFO = re.compile(r'(?i)\b([a-z][a-z0-9+.\-]*:/{1,2})([^:@/\s"]*):[^\s"]*@')
_SCHEME = re.compile(r"(?i)[a-z][a-z0-9+.\-]*:/{1,2}")


def redact(text: str, *secrets: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` replaced
    by ``***``, and every one of ``secrets`` (passwords known to the caller,
    e.g. taken from its own URL) replaced wherever it appears on its own."""
    if ":/" in text:
        text = _USERINFO.sub(rf"\1\2:{REDACTED}@", text)
    for secret in secrets:
        # Very short "secrets" would blank out ordinary words; such a
        # password is no secret anyway.
        if len(secret) >= 4 and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def url_password(url: str) -> tuple[str, ...]:
    """The password of ``url`` as written and percent-decoded, found leniently
    (even in a URL that does not parse), for ``redact(text, *secrets)``."""
    scheme = _SCHEME.match(url)
    userinfo, at, _ = url[scheme.end() if scheme else 0 :].rpartition("@")
    if not scheme or not at or ":" not in userinfo:
        return ()
    password = userinfo.split(":", 1)[1]
    return tuple({password, unquote(password)} - {""})


@dataclass(frozen=True, slots=True)
class SmarthostUrl:
    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = None


_EXAMPLE = (
    "smtp://host:587 (STARTTLS) or smtps://host:465 (implicit TLS), "
    "with user:password@ before the host for a login"
)


def parse_smarthost_url(url: str) -> SmarthostUrl:
    """``smtp://[user:password@]host[:port]`` (STARTTLS) or ``smtps://...``
    (implicit TLS, RFC 8314). Raises ValueError with a message that never
    contains the password."""
    shown = redact(url, *url_password(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        # urlsplit stops the authority at "#", "?" or "/": a password with one
        # of them unencoded leaves part of it where the port should be.
        raise ValueError(
            f"smarthost {shown!r} does not parse: the port must be a number, and "
            "'#', '?', '/' and '@' in a user name or password must be percent-encoded "
            "(%23, %3F, %2F, %40)"
        ) from None
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError(f"smarthost {shown!r} must look like {_EXAMPLE}")
    if parts.fragment or parts.query or parts.path not in ("", "/"):
        raise ValueError(
            f"smarthost {shown!r} has something after the host: a '#', '?' or '/' "
            "in a user name or password must be percent-encoded (%23, %3F, %2F)"
        )
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    for value in (username, password):
        if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"smarthost {shown!r}: control characters in the credentials")
    implicit = parts.scheme == "smtps"
    return SmarthostUrl(
        host=parts.hostname,
        port=port or (465 if implicit else 587),
        implicit_tls=implicit,
        username=username,
        password=password,
    )


def check_postgresql_url(url: str) -> None:
    """Raise ValueError (without the password) unless ``url`` is a
    ``postgresql://`` URL whose authority parses: asyncpg's own errors for
    a bad one quote pieces of the password."""
    shown = redact(url, *url_password(url))
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("dsn must be a postgresql:// URL")
    parts = urlsplit(url)
    if parts.fragment:
        raise ValueError(f"dsn {shown!r} contains '#': percent-encode it in the password as %23")
    # asyncpg accepts several hosts, "host1:5432,host2:5433", each with its port.
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(","):
        port = host.rpartition("]")[2].rpartition(":")
        if port[1] and port[2] and not port[2].isdigit():
            raise ValueError(
                f"dsn {shown!r}: the port must be a number, and '/', '?' or '#' in the "
                "password must be percent-encoded (%2F, %3F, %23)"
            )
