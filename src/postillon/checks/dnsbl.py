"""DNS block and allow lists at connect, with weights (postscreen's ``dnsbl_sites``).

For a client 192.0.2.1 each zone of ``[dnsbl] zones`` is asked for
``1.2.0.192.<zone>`` (IPv6: the 32 nibbles reversed, RFC 5782 §2.4), all at once and
within ``[dnsbl] timeout``. A zone lists the client when it answers an address in
127.0.0.0/8 (RFC 5782 §2.1; 127.0.0.1 and anything else are not listings). The
client's score is the sum of the weights of the zones that list it; at ``threshold``
or more the connection is refused with ``554 5.7.1`` naming the lists (and closed).
A zone with a negative weight is an allow list (DNSWL): it lowers the score and
leaves the note ``dnswl`` for later checks (greylisting skips such clients).

A zone that fails or is slow counts as "not listed": a broken list must not refuse
mail. Only A records are asked (RFC 5782 §2.1). Answers come through postillon's
resolver, whose cache keeps them for their TTL, and "not listed" (NXDOMAIN) for the
zone's negative TTL (RFC 2308): a busy MX's regular clients cost the list one query
per TTL, not one per connection.
"""

from __future__ import annotations

import asyncio
import ipaddress

from postillon.checks.base import BaseCheck
from postillon.checks.context import ListenerKind, SessionContext
from postillon.checks.decision import CONTINUE, Decision, Phase, proceed, reject
from postillon.checks.parts import PipelineParts
from postillon.config.model import Config
from postillon.core.reply import Reply
from postillon.dns.resolver import DnsError, Resolver


def query_name(ip: str, zone: str) -> str | None:
    """The name to ask ``zone`` about ``ip``; None for something not an IP."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split("."))) + "." + zone
    nibbles = addr.exploded.replace(":", "")
    return ".".join(reversed(nibbles)) + "." + zone


def refused(ip: str, lists: list[str]) -> Reply:
    return Reply.of(
        554, "5.7.1", f"Service unavailable; client [{ip}] blocked using {', '.join(lists)}"
    )


class DnsblCheck(BaseCheck):
    name = "dnsbl"
    phases: frozenset[Phase] = frozenset({"connect"})

    def __init__(
        self, resolver: Resolver, zones: dict[str, int], threshold: int, timeout: float
    ) -> None:
        self.resolver = resolver
        self.zones = zones
        self.threshold = threshold
        self.timeout = timeout

    async def _listed(self, name: str) -> list[str]:
        try:
            answer = await self.resolver.ipv4(name)  # lists answer in A records only
        except DnsError:
            return []
        return [a for a in answer.records if a.startswith("127.") and a != "127.0.0.1"]

    async def connect(self, s: SessionContext) -> Decision:
        ip = s.client.ip
        names = {zone: query_name(ip, zone) for zone in self.zones}
        if not ip or s.client.trusted or any(n is None for n in names.values()):
            return CONTINUE
        tasks = {
            zone: asyncio.ensure_future(self._listed(name))
            for zone, name in names.items()
            if name is not None
        }
        done, pending = await asyncio.wait(tasks.values(), timeout=self.timeout)
        for task in pending:
            task.cancel()
        score = 0
        seen: list[str] = []
        blocking: list[str] = []
        for zone, task in tasks.items():
            if task not in done or task.cancelled() or task.exception() is not None:
                seen.append(f"{zone}: no answer in time")
                continue
            codes = task.result()
            if not codes:
                continue
            weight = self.zones[zone]
            score += weight
            seen.append(f"{zone} ({', '.join(codes)}) weight {weight:+d}")
            if weight > 0:
                blocking.append(zone)
            else:
                s.notes["dnswl"] = True
        s.notes["dnsbl_score"] = score
        listed = "; ".join(seen) if seen else "listed nowhere"
        saw = f"{ip}: {listed}; score {score}, threshold {self.threshold}"
        if score >= self.threshold:
            return reject(refused(ip, blocking), saw, disconnect=True, metric="dnsbl")
        return proceed(saw)


def build(kind: ListenerKind, parts: PipelineParts) -> DnsblCheck | None:
    config: Config = parts.config
    if kind != "smtp" or not config.dnsbl.zones or parts.resolver is None:
        return None
    settings = config.dnsbl
    return DnsblCheck(parts.resolver, dict(settings.zones), settings.threshold, settings.timeout)
