"""Recipient → route, at delivery time.

Recipients were checked and aliases expanded at RCPT time (intake stores the
final targets), so the router only decides *how* each stored recipient is
delivered. In order:

1. a ``[[transport]]`` rule for the recipient's domain (exact, then parent
   domains, then ``*``);
2. a local domain → Maildir;
3. a configured smarthost → SMTP to it;
4. otherwise → SMTP to the domain's MX hosts.

``Route.key`` groups deliveries that can share one transport call (same next
hop), so that a message for ten recipients at one domain is sent once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from postillon.core.credentials import parse_smarthost_url
from postillon.core.pins import parse_fingerprint
from postillon.core.reply import Reply
from postillon.routing.local import LocalRecipients


@dataclass(frozen=True, slots=True)
class NextHop:
    """An explicit destination instead of an MX lookup."""

    host: str  # name or IP address (no brackets)
    port: int
    mx_lookup: bool = False  # smtp:host (no brackets) means "MX records of host"
    unix_path: str | None = None
    implicit_tls: bool = False
    username: str | None = None
    password: str | None = None
    # With credentials: what the server must prove before AUTH (see
    # outbound.tls_policy.for_credentials). CA file instead of the system CAs;
    # SPKI SHA-256 pins (32 bytes each), which when set are the proof.
    tls_ca_file: str | None = None
    tls_fingerprints: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # "maildir" | "smtp" | "lmtp" | "discard" | "error"
    key: str
    domain: str
    hop: NextHop | None = None
    error: Reply | None = None


@dataclass(frozen=True, slots=True)
class TransportEntry:
    domain: str  # "example.net", ".example.net" (subdomains) or "*"
    route: str


_ERROR_ROUTE = re.compile(r"error:([45])\.(\d{1,3})\.(\d{1,3})(?: (.*))?$")


def parse_route(spec: str, domain: str, default_port: int) -> Route:
    """Parse one transport-table value (validated by the config model)."""
    kind, _, rest = spec.partition(":")
    if kind == "maildir":
        return Route("maildir", "maildir", domain)
    if kind == "discard":
        return Route("discard", "discard", domain)
    if kind == "error":
        m = _ERROR_ROUTE.match(spec)
        if m is None:
            raise ValueError(f"bad error route {spec!r}")
        cls, subject, detail, text = m.groups()
        code = 550 if cls == "5" else 450
        reply = Reply.of(
            code, f"{cls}.{subject}.{detail}", text or "Delivery refused by configuration"
        )
        return Route("error", f"error:{domain}", domain, error=reply)
    if kind == "lmtp":
        if rest.startswith("unix:"):
            hop = NextHop("localhost", 0, unix_path=rest[5:])
        else:
            host, port = _host_port(rest, 24)
            hop = NextHop(host, port)
        return Route("lmtp", f"lmtp:{rest}", domain, hop=hop)
    if kind == "smtp":
        mx_lookup = not rest.startswith("[")
        host, port = _host_port(rest, default_port)
        hop = NextHop(host, port, mx_lookup=mx_lookup)
        return Route("smtp", f"smtp:{rest}", domain, hop=hop)
    raise ValueError(f"unknown route kind in {spec!r}")


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else default_port
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ":" not in host:
        return host, int(port)
    return text, default_port


def parse_smarthost(
    url: str, *, ca_file: str | None = None, fingerprints: Sequence[str] = ()
) -> NextHop:
    """The next hop for ``[relay] smarthost`` (with ``smarthost_ca_file`` and
    ``smarthost_fingerprints``); the config check ran the same parsers
    (``core.credentials``, ``core.pins``), so this does not fail on a checked config."""
    parsed = parse_smarthost_url(url)
    return NextHop(
        host=parsed.host,
        port=parsed.port,
        implicit_tls=parsed.implicit_tls,
        username=parsed.username,
        password=parsed.password,
        tls_ca_file=ca_file,
        tls_fingerprints=tuple(parse_fingerprint(pin) for pin in fingerprints),
    )


class Router:
    def __init__(
        self,
        local: LocalRecipients,
        transport_table: Sequence[TransportEntry] = (),
        *,
        smarthost: NextHop | None = None,
        smtp_port: int = 25,
    ) -> None:
        self.local = local
        self.table = {entry.domain: entry.route for entry in transport_table}
        self.smarthost = smarthost
        self.smtp_port = smtp_port

    def _table_lookup(self, domain: str) -> str | None:
        if domain in self.table:
            return self.table[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self.table:
                return self.table[parent]
        return self.table.get("*")

    def route(self, recipient: str) -> Route:
        domain = recipient.rpartition("@")[2].lower()
        spec = self._table_lookup(domain)
        if spec is not None:
            return parse_route(spec, domain, self.smtp_port)
        if self.local.is_local_domain(domain):
            return Route("maildir", "maildir", domain)
        if self.smarthost is not None:
            hop = self.smarthost
            return Route("smtp", f"smarthost:{hop.host}:{hop.port}", domain, hop=hop)
        return Route("smtp", f"smtp:{domain}", domain)
