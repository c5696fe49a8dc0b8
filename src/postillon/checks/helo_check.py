"""HELO/EHLO checks on port 25 (``[client_checks] helo_checks``).

- syntax: the name must be a fully qualified domain name (RFC 5321 §4.1.1.1: the
  client's FQDN) or an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``,
  §4.1.3): ``501 5.5.2`` for anything else (a bare IP, ``localhost``, junk);
- our own name: a client claiming to be this server (our hostname, or one of our
  listening addresses, bare or as a literal) is lying: ``550 5.7.1``.

Clients in trusted networks and authenticated clients are not checked. The session
stays open: the client may say HELO again.
"""

from __future__ import annotations

import ipaddress

from postillon.checks.base import BaseCheck
from postillon.checks.context import ListenerKind, SessionContext
from postillon.checks.decision import Decision, Phase, proceed, reject
from postillon.checks.parts import PipelineParts
from postillon.core.address import AddressError, parse_domain
from postillon.core.reply import Reply

BAD_SYNTAX = Reply.of(501, "5.5.2", "Invalid HELO name: a domain name or address literal please")
CLAIMS_US = Reply.of(550, "5.7.1", "HELO name claims to be this server")


def literal_address(name: str) -> str | None:
    """The IP of an address literal, or of a bare IP (which is not valid HELO), else None."""
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def syntax_problem(name: str) -> str:
    """ "" when ``name`` is a valid HELO argument, else what is wrong with it."""
    if name.startswith("["):
        return "" if literal_address(name) is not None else "malformed address literal"
    if literal_address(name) is not None:
        return "a bare IP address (an address literal needs brackets)"
    try:
        domain = parse_domain(name.rstrip("."), smtputf8=True)
    except AddressError as exc:
        return f"not a domain name ({exc})"
    if "." not in domain:
        return "not fully qualified"
    return ""


class HeloCheck(BaseCheck):
    name = "helo"
    phases: frozenset[Phase] = frozenset({"helo"})

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname.lower().rstrip(".")

    async def helo(self, s: SessionContext) -> Decision:
        client = s.client
        name = client.helo
        if client.trusted or client.authenticated:
            return proceed(f"HELO {name}: not checked (trusted or authenticated)")
        problem = syntax_problem(name)
        if problem:
            return reject(BAD_SYNTAX, f"HELO {name!r}: {problem}", metric="helo")
        claimed = literal_address(name)
        ours = {ip for ip in client.local_ips}
        if name.lower().rstrip(".") == self.hostname or (claimed is not None and claimed in ours):
            saw = f"HELO {name} from {client.ip}: that is this server's own name"
            return reject(CLAIMS_US, saw, metric="helo")
        return proceed(f"HELO {name}: valid")


def build(kind: ListenerKind, parts: PipelineParts) -> HeloCheck | None:
    if kind != "smtp" or not parts.config.client_checks.helo_checks:
        return None
    return HeloCheck(parts.config.hostname)
