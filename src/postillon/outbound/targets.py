"""The addresses a delivery tries: one :class:`Target` per address of each
next-hop host (split from ``smtp_transport``, which re-exports them)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from postillon.core.outcome import Outcome, TempFail
from postillon.core.reply import Reply
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver
from postillon.outbound.mx import MxResult
from postillon.routing.router import NextHop

__all__ = ["Target", "host_targets", "is_ip", "mx_targets", "next_hop", "shaping_domain"]


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # name for logs and SNI
    address: str  # IP address, or "" for a unix socket
    port: int
    hop: NextHop | None
    # DNSSEC (RFC 7672 §2.2): the MX answer (True for a host the operator named)
    # and this host's address answer were secure.
    mx_secure: bool = False
    address_secure: bool = False
    # The domain whose MX this host is (RFC 8460's policy domain); "" for a host
    # the operator named (smarthost, route), whose TLS is not reported.
    mx_domain: str = ""
    canonical: str = ""  # the CNAME-expanded host name, "" when not an alias (RFC 7672 §2.2.2)


def mx_targets(result: MxResult, port: int, hop: NextHop | None = None) -> list[Target]:
    """One target per address of each MX host of ``result``, in order (what the
    transport tries, and what ``postillon tls check`` shows)."""
    return [
        Target(
            h.host, a, port, hop, result.authenticated, h.authenticated, result.domain, h.canonical
        )
        for h in result.hops
        for a in h.addresses
    ]


def shaping_domain(target: Target) -> str:
    """The destination domain a shaping rule sees: the domain whose MX this is,
    else the host the route names."""
    return target.mx_domain or target.host


def next_hop(target: Target) -> str:
    """The next hop a dead-destination suspension names: the domain whose MX this
    is, else the host and port the route names."""
    return target.mx_domain or f"{target.host}:{target.port}"


async def host_targets(
    resolver: Resolver, host: str, port: int, hop: NextHop, limit: int
) -> list[Target] | Outcome:
    """The targets of a host the operator named (a route's or smarthost's host)."""
    if is_ip(host):
        return [Target(host, host, port, hop)]
    try:
        answer = await resolver.addresses(host)
    except DnsTempError as exc:
        return TempFail(Reply.of(451, "4.4.3", f"DNS lookup of {host} failed: {exc.reason}"))
    except DnsNotFound:
        return TempFail(Reply.of(451, "4.4.4", f"Host {host} has no address (check the route)"))
    # A configured host name needs no secure MX (RFC 7672 §2.2.2: its name came
    # from us, not from DNS); its addresses still do.
    secure = answer.authenticated
    return [Target(host, a, port, hop, True, secure) for a in answer.records][:limit]


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
