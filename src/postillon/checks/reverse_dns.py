"""Forward-confirmed reverse DNS of the client, at connect (RFC 8601 §3 "iprev").

The client's IP is looked up as PTR; each name (at most ``MAX_NAMES``) is looked up as
A/AAAA; the first name whose addresses include the IP is the client's confirmed name.
It is written into the checks' facts (``client.rdns``, ``rdns_status``) and from there
into ``Received:`` (``from helo (name [ip])``). Without one:
``[client_checks] reject_unknown_client`` = "off" accepts, "tempfail" says 450 4.7.25,
"reject" 550 5.7.25 (RFC 7372 "reverse DNS validation failed"); a DNS failure is
always 450 (the name may well exist). Trusted networks are never refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace

from postillon.checks.base import BaseCheck
from postillon.checks.context import ListenerKind, RdnsStatus, SessionContext
from postillon.checks.decision import Decision, Phase, proceed, reject
from postillon.checks.parts import PipelineParts
from postillon.config.model import UnknownClientAction
from postillon.core.reply import Reply
from postillon.dns.resolver import DnsError, DnsNotFound, DnsTempError, Resolver

MAX_NAMES = 5  # PTR names tried (a client with more is not our problem to solve)
LOOKUP_TIMEOUT = 10.0


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


async def confirmed_name(resolver: Resolver, ip: str) -> tuple[RdnsStatus, str, str]:
    """(status, confirmed name or "", what happened, for the trace)."""
    try:
        names = (await resolver.ptr(ip)).records[:MAX_NAMES]
    except DnsNotFound:
        return "unknown", "", f"no PTR record for {ip}"
    except (DnsTempError, ValueError) as exc:
        return "tempfail", "", f"PTR lookup for {ip} failed: {exc}"
    failed = ""
    for name in names:
        name = name.rstrip(".").lower()
        try:
            addresses = (await resolver.addresses(name)).records
        except DnsNotFound:
            continue
        except DnsError as exc:
            failed = f"{name}: {exc}"
            continue
        if any(_same_ip(a, ip) for a in addresses):
            return "ok", name, f"{ip} is {name} (forward-confirmed)"
    if failed:
        return "tempfail", "", f"PTR {', '.join(names)}; lookup failed: {failed}"
    return "unknown", "", f"PTR {', '.join(names)} does not resolve back to {ip}"


class ReverseDnsCheck(BaseCheck):
    name = "reverse_dns"
    phases: frozenset[Phase] = frozenset({"connect"})

    def __init__(self, resolver: Resolver, action: UnknownClientAction) -> None:
        self.resolver = resolver
        self.action = action

    async def connect(self, s: SessionContext) -> Decision:
        ip = s.client.ip
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                status, name, saw = await confirmed_name(self.resolver, ip)
        except TimeoutError:
            status, name, saw = "tempfail", "", f"reverse lookup of {ip} timed out"
        s.client = replace(s.client, rdns=name, rdns_status=status)
        if status == "ok" or self.action == "off" or s.client.trusted:
            return proceed(saw)
        if status == "tempfail" or self.action == "tempfail":
            reply = Reply.of(
                450, "4.7.25", f"Client host [{ip}] reverse DNS not confirmed, try again later"
            )
        else:
            reply = Reply.of(550, "5.7.25", f"Client host [{ip}] has no confirmed reverse DNS")
        return reject(reply, saw, disconnect=True, metric="reverse_dns")


def build(kind: ListenerKind, parts: PipelineParts) -> ReverseDnsCheck | None:
    checks = parts.config.client_checks
    if kind != "smtp" or not checks.wants_reverse_dns or parts.resolver is None:
        return None
    return ReverseDnsCheck(parts.resolver, checks.reject_unknown_client)
