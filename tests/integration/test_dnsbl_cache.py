"""The DNSBL check against a real DNS server on loopback (``checks/dnsbl.py``): it asks
a list for A records only (RFC 5782 §2.1), and "not listed" (NXDOMAIN) comes from the
resolver's cache for the zone's negative TTL, so a regular client costs the list one
query per TTL and not one per connection; a listing is cached the same way."""

from __future__ import annotations

from typing import Any

import pytest

from postillon.checks.context import ClientFacts, SessionContext
from postillon.checks.dnsbl import DnsblCheck
from postillon.core.clock import FakeClock
from postillon.dns.dnspython_resolver import DnsResolver
from postillon.testing.dns_server import DnsServer

ZONE = "bl.example"
CLEAN = "192.0.2.1"  # asked as 1.2.0.192.bl.example: NXDOMAIN
LISTED = "192.0.2.2"


@pytest.fixture
def dns_zones() -> dict[str, Any]:
    return {
        ZONE: {
            "@": {"SOA": f"ns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 120"},
            f"2.2.0.192.{ZONE}": {"A": [(300, "127.0.0.2")]},
        }
    }


def session(ip: str) -> SessionContext:
    return SessionContext("S", ClientFacts(ip=ip))


async def test_not_listed_is_cached_for_the_negative_ttl_and_only_a_is_asked(
    dns_server: DnsServer, dns_resolver: DnsResolver, dns_clock: FakeClock
) -> None:
    check = DnsblCheck(dns_resolver, {ZONE: 2}, threshold=2, timeout=2.0)
    name = f"1.2.0.192.{ZONE}"
    for _ in range(5):  # five connections from the same client
        decision = await check.connect(session(CLEAN))
        assert decision.action != "reject"
    assert dns_server.query_count(name, "A") == 1
    assert dns_server.query_count(name, "AAAA") == 0
    dns_clock.advance(121)  # past the SOA's negative TTL (its MINIMUM, 120 s)
    await check.connect(session(CLEAN))
    assert dns_server.query_count(name, "A") == 2


async def test_a_listing_is_cached_too(dns_server: DnsServer, dns_resolver: DnsResolver) -> None:
    check = DnsblCheck(dns_resolver, {ZONE: 2}, threshold=2, timeout=2.0)
    for _ in range(3):
        decision = await check.connect(session(LISTED))
        assert decision.action == "reject" and decision.reply is not None
        assert ZONE in decision.reply.text
    assert dns_server.query_count(f"2.2.0.192.{ZONE}") == 1
