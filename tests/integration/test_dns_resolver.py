"""DnsResolver against a real DnsServer on 127.0.0.1, over real UDP and TCP sockets.

    test --(DnsResolver: dnspython async, UDP, TCP on TC)--> DnsServer 127.0.0.1:<random>

Nothing here queries the machine's resolver: every resolver is built with the loopback
server as its only nameserver. Timeouts are a fraction of a second so the failure cases
stay fast.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable

import pytest

from postillon.core.clock import FakeClock
from postillon.dns.dnspython_resolver import DnsResolver
from postillon.dns.resolver import (
    DnsBogus,
    DnsNotFound,
    DnsTempError,
    LookupEvent,
    MxRecord,
    TlsaRecord,
    dnssec_state,
)
from postillon.outbound.mx import resolve_next_hops
from postillon.testing.dns_server import DnsServer, Zones

pytest_plugins = ["dns_fixtures"]
pytestmark = pytest.mark.integration

MakeDnsServer = Callable[..., DnsServer]

FAST = {"timeout": 1.0, "attempts": 1}  # failure tests that wait set 0.2 themselves


def resolver_for(*servers: DnsServer, **kwargs: object) -> DnsResolver:
    options: dict[str, object] = {**FAST, **kwargs}
    return DnsResolver([s.nameserver for s in servers], **options)  # type: ignore[arg-type]


# -- answers -----------------------------------------------------------------------------------


async def test_mx_answer(dns_resolver: DnsResolver) -> None:
    answer = await dns_resolver.mx("example.org")
    assert sorted(answer.records, key=lambda r: (r.preference, r.exchange)) == [
        MxRecord(10, "mx1.example.org"),
        MxRecord(10, "mx2.example.org"),
        MxRecord(20, "backup.example.net"),
    ]
    assert answer.name == "example.org"
    assert answer.canonical_name == "example.org"
    assert answer.ttl == 300
    assert answer.authenticated is False


async def test_null_mx_is_a_root_exchange(dns_resolver: DnsResolver) -> None:
    answer = await dns_resolver.mx("nullmx.test")
    assert answer.records == (MxRecord(0, "."),)
    assert answer.records[0].is_null


async def test_names_are_case_insensitive_and_dot_tolerant(dns_resolver: DnsResolver) -> None:
    answer = await dns_resolver.mx("Example.ORG.")
    assert len(answer.records) == 3
    assert answer.name == "example.org"


async def test_a_and_aaaa(dns_resolver: DnsResolver) -> None:
    answer = await dns_resolver.addresses("mx1.example.org")
    assert answer.records == ("192.0.2.1", "2001:db8::1")
    only_a = await dns_resolver.addresses("mx2.example.org")
    assert only_a.records == ("192.0.2.2",)


async def test_address_families_can_be_disabled(dns_server: DnsServer) -> None:
    v4 = resolver_for(dns_server, ipv6=False)
    assert (await v4.addresses("mx1.example.org")).records == ("192.0.2.1",)
    v6 = resolver_for(dns_server, ipv4=False)
    assert (await v6.addresses("mx1.example.org")).records == ("2001:db8::1",)
    assert dns_server.query_count("mx1.example.org", "A") == 1
    assert dns_server.query_count("mx1.example.org", "AAAA") == 1


async def test_txt_keeps_strings_and_joins_them(dns_server: DnsServer) -> None:
    dns_server.set_records("dkim._domainkey.example.org", "TXT", ['"v=DKIM1; k=rsa; " "p=ABC"'])
    answer = await resolver_for(dns_server).txt("dkim._domainkey.example.org")
    (record,) = answer.records
    assert record.strings == (b"v=DKIM1; k=rsa; ", b"p=ABC")
    assert record.text == "v=DKIM1; k=rsa; p=ABC"


async def test_tlsa(dns_resolver: DnsResolver) -> None:
    answer = await dns_resolver.tlsa("_25._tcp.mx1.example.org")
    assert answer.records == (TlsaRecord(3, 1, 1, bytes.fromhex("ab" * 32)),)


async def test_ptr_ipv4_and_mapped(dns_resolver: DnsResolver) -> None:
    assert (await dns_resolver.ptr("192.0.2.1")).records == ("mx1.example.org",)
    assert (await dns_resolver.ptr("::ffff:192.0.2.1")).records == ("mx1.example.org",)


async def test_ptr_ipv6(dns_server: DnsServer) -> None:
    dns_server.add_zone("8.b.d.0.1.0.0.2.ip6.arpa", {})
    owner = "1." + "0." * 23 + "8.b.d.0.1.0.0.2.ip6.arpa"
    dns_server.set_records(owner, "PTR", "mx1.example.org")
    assert (await resolver_for(dns_server).ptr("2001:db8::1")).records == ("mx1.example.org",)


async def test_ptr_rejects_a_malformed_ip(dns_resolver: DnsResolver) -> None:
    with pytest.raises(ValueError):
        await dns_resolver.ptr("not-an-ip")


async def test_cname_chain_is_followed(dns_server: DnsServer) -> None:
    dns_server.set_records("a.example.org", "CNAME", "b.example.org")
    dns_server.set_records("b.example.org", "CNAME", "mx1.example.org")
    dns_server.set_records("mxalias.example.org", "CNAME", "example.org")
    resolver = resolver_for(dns_server)
    answer = await resolver.addresses("a.example.org")
    assert answer.records == ("192.0.2.1", "2001:db8::1")
    assert answer.name == "a.example.org"
    assert answer.canonical_name == "mx1.example.org"
    mx = await resolver.mx("mxalias.example.org")
    assert mx.canonical_name == "example.org"
    assert len(mx.records) == 3


async def test_cname_into_another_zone(dns_server: DnsServer) -> None:
    dns_server.set_records("cross.example.org", "CNAME", "backup.example.net")
    answer = await resolver_for(dns_server).addresses("cross.example.org")
    assert answer.records == ("198.51.100.2", "2001:db8:1::2")


async def test_cname_to_missing_name_is_nxdomain(dns_server: DnsServer) -> None:
    dns_server.set_records("dangling.example.org", "CNAME", "gone.example.org")
    with pytest.raises(DnsNotFound) as info:
        await resolver_for(dns_server).mx("dangling.example.org")
    assert info.value.nxdomain


async def test_idn_is_queried_as_a_label(dns_server: DnsServer) -> None:
    dns_server.add_zone("xn--bcher-kva.example", {"@": {"MX": "5 mail.example.org"}})
    answer = await resolver_for(dns_server).mx("bücher.example")
    assert answer.records == (MxRecord(5, "mail.example.org"),)
    assert dns_server.query_count("xn--bcher-kva.example", "MX") == 1


async def test_authenticated_data_bit_is_reported_only_when_trusted(
    make_dns_server: MakeDnsServer,
) -> None:
    server = make_dns_server({"dane.test": {"@": {"MX": "10 mx.dane.test"}}}, authenticated=True)
    answer = await resolver_for(server, trust_ad=True).mx("dane.test")
    assert answer.authenticated is True
    assert dnssec_state(answer) == "secure"
    # The default: an AD bit from a resolver nobody vouched for proves nothing (RFC 7672 §2.1.1).
    untrusted = await resolver_for(server).mx("dane.test")
    assert untrusted.authenticated is False
    assert dnssec_state(untrusted) == "insecure"


async def test_authenticated_denial_is_reported(make_dns_server: MakeDnsServer) -> None:
    server = make_dns_server({"dane.test": {"@": {"MX": "10 mx.dane.test"}}}, authenticated=True)
    resolver = resolver_for(server, trust_ad=True)
    for _ in range(2):  # the second answer comes from the negative cache, still authenticated
        with pytest.raises(DnsNotFound) as info:
            await resolver.tlsa("_25._tcp.mx.dane.test")
        assert info.value.authenticated is True
        assert dnssec_state(info.value) == "not found"
    with pytest.raises(DnsNotFound) as untrusted:
        await resolver_for(server).tlsa("_25._tcp.mx.dane.test")
    assert untrusted.value.authenticated is False


async def test_servfail_from_a_trusted_validator_is_bogus(dns_server: DnsServer) -> None:
    dns_server.set_failure("example.org", "servfail")
    with pytest.raises(DnsBogus) as info:
        await resolver_for(dns_server, trust_ad=True).mx("example.org")
    assert dnssec_state(info.value) == "bogus"
    with pytest.raises(DnsTempError) as plain:
        await resolver_for(dns_server).mx("example.org")
    assert not isinstance(plain.value, DnsBogus)


# -- does not exist ----------------------------------------------------------------------------


async def test_nxdomain(dns_resolver: DnsResolver) -> None:
    with pytest.raises(DnsNotFound) as info:
        await dns_resolver.mx("nope.example.org")
    assert info.value.nxdomain is True
    assert info.value.rdtype == "MX"


async def test_nodata(dns_resolver: DnsResolver) -> None:
    with pytest.raises(DnsNotFound) as info:
        await dns_resolver.mx("mx1.example.org")
    assert info.value.nxdomain is False


async def test_empty_non_terminal_is_nodata(dns_resolver: DnsResolver) -> None:
    with pytest.raises(DnsNotFound) as info:
        await dns_resolver.txt("_tcp.mx1.example.org")
    assert info.value.nxdomain is False


async def test_addresses_not_found(dns_resolver: DnsResolver) -> None:
    with pytest.raises(DnsNotFound) as info:
        await dns_resolver.addresses("nope.example.org")
    assert info.value.nxdomain is True
    with pytest.raises(DnsNotFound) as info:
        await dns_resolver.addresses("nullmx.test")
    assert info.value.nxdomain is False


async def test_invalid_name_is_not_found_without_a_query(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server)
    for bad in ("a..b", "x" * 64 + ".example.org", ""):
        with pytest.raises(DnsNotFound) as info:
            await resolver.mx(bad)
        assert info.value.nxdomain
    assert dns_server.queries == []


# -- temporary failures ------------------------------------------------------------------------


async def test_servfail_is_temporary(dns_server: DnsServer) -> None:
    dns_server.set_failure("example.org", "servfail")
    with pytest.raises(DnsTempError) as info:
        await resolver_for(dns_server).mx("example.org")
    assert "SERVFAIL" in info.value.reason


async def test_refused_outside_served_zones_is_temporary(dns_resolver: DnsResolver) -> None:
    with pytest.raises(DnsTempError) as info:
        await dns_resolver.mx("example.com")
    assert "REFUSED" in info.value.reason


async def test_timeout_is_temporary_and_quick(dns_server: DnsServer) -> None:
    dns_server.set_failure("example.org", "drop", rdtype="MX")
    resolver = resolver_for(dns_server, timeout=0.2, attempts=2)
    started = time.monotonic()
    with pytest.raises(DnsTempError) as info:
        await resolver.mx("example.org")
    elapsed = time.monotonic() - started
    assert info.value.reason == "timeout"
    assert 0.3 <= elapsed < 2.0
    assert dns_server.query_count("example.org", "MX") >= 2  # attempts: two tries
    # Only MX was dropped: other types still answer.
    assert (await resolver.txt("example.org")).records


async def test_nothing_listening_is_temporary(dns_server: DnsServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    resolver = DnsResolver([f"127.0.0.1:{dead_port}"], timeout=0.2, attempts=1)
    with pytest.raises(DnsTempError):
        await resolver.mx("example.org")


async def test_one_family_failing_does_not_hide_the_other(dns_server: DnsServer) -> None:
    dns_server.set_failure("mx1.example.org", "servfail", rdtype="AAAA")
    answer = await resolver_for(dns_server).addresses("mx1.example.org")
    assert answer.records == ("192.0.2.1",)
    dns_server.set_failure("mx2.example.org", "servfail", rdtype="A")
    with pytest.raises(DnsTempError):  # A failed, AAAA does not exist: not "not found"
        await resolver_for(dns_server).addresses("mx2.example.org")


async def test_second_nameserver_answers_after_servfail(make_dns_server: MakeDnsServer) -> None:
    zones = {"example.org": {"@": {"MX": "10 mx1.example.org"}}}
    broken = make_dns_server(zones)
    broken.set_failure(None, "servfail")
    good = make_dns_server(zones)
    answer = await resolver_for(broken, good).mx("example.org")
    assert answer.records == (MxRecord(10, "mx1.example.org"),)
    assert broken.query_count() == 1 and good.query_count() == 1


async def test_second_nameserver_answers_after_timeout(make_dns_server: MakeDnsServer) -> None:
    zones = {"example.org": {"@": {"MX": "10 mx1.example.org"}}}
    silent = make_dns_server(zones)
    silent.set_failure(None, "drop")
    good = make_dns_server(zones)
    answer = await resolver_for(silent, good, timeout=0.2).mx("example.org")
    assert answer.records == (MxRecord(10, "mx1.example.org"),)


async def test_failure_for_a_number_of_queries(dns_server: DnsServer) -> None:
    dns_server.set_failure("example.org", "servfail", rdtype="MX", times=1)
    resolver = resolver_for(dns_server)
    with pytest.raises(DnsTempError):
        await resolver.mx("example.org")
    assert len((await resolver.mx("example.org")).records) == 3


# -- TCP ---------------------------------------------------------------------------------------


async def test_truncated_answer_retried_over_tcp(dns_server: DnsServer) -> None:
    dns_server.set_failure("example.org", "truncate", rdtype="MX")
    answer = await resolver_for(dns_server).mx("example.org")
    assert len(answer.records) == 3
    assert dns_server.query_count("example.org", "MX", "udp") == 1
    assert dns_server.query_count("example.org", "MX", "tcp") == 1


async def test_answer_too_big_for_udp_comes_over_tcp(dns_server: DnsServer) -> None:
    # About 3 KB of TXT: more than the 1232-byte EDNS payload the resolver offers.
    strings = [f'"{i:02d}-' + "x" * 250 + '"' for i in range(12)]
    dns_server.set_records("big.example.org", "TXT", strings)
    answer = await resolver_for(dns_server).txt("big.example.org")
    assert len(answer.records) == 12
    assert dns_server.query_count("big.example.org", "TXT", "udp") == 1
    assert dns_server.query_count("big.example.org", "TXT", "tcp") == 1


# -- cache -------------------------------------------------------------------------------------


async def test_second_lookup_is_served_from_cache(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server)
    first = await resolver.mx("example.org")
    second = await resolver.mx("example.org")
    assert first == second
    assert dns_server.query_count("example.org", "MX") == 1


async def test_cache_respects_ttl(dns_server: DnsServer) -> None:
    clock = FakeClock()
    dns_server.set_records("short.example.org", "A", [(30, "192.0.2.30")])
    resolver = resolver_for(dns_server, clock=clock, ipv6=False)
    await resolver.addresses("short.example.org")
    clock.advance(29)
    await resolver.addresses("short.example.org")
    assert dns_server.query_count("short.example.org", "A") == 1
    dns_server.set_records("short.example.org", "A", [(30, "192.0.2.31")])
    clock.advance(2)
    answer = await resolver.addresses("short.example.org")
    assert answer.records == ("192.0.2.31",)
    assert dns_server.query_count("short.example.org", "A") == 2


async def test_cache_ttl_is_capped(dns_server: DnsServer) -> None:
    clock = FakeClock()
    resolver = resolver_for(dns_server, clock=clock, max_ttl=10)
    await resolver.mx("example.org")  # TTL 300
    clock.advance(11)
    await resolver.mx("example.org")
    assert dns_server.query_count("example.org", "MX") == 2


async def test_ttl_zero_is_not_cached(dns_server: DnsServer) -> None:
    dns_server.set_records("volatile.example.org", "TXT", [(0, '"x"')])
    resolver = resolver_for(dns_server)
    await resolver.txt("volatile.example.org")
    await resolver.txt("volatile.example.org")
    assert dns_server.query_count("volatile.example.org", "TXT") == 2


async def test_negative_answers_are_cached_for_the_soa_minimum(dns_server: DnsServer) -> None:
    clock = FakeClock()
    resolver = resolver_for(dns_server, clock=clock)
    for _ in range(2):
        with pytest.raises(DnsNotFound):
            await resolver.mx("nope.example.org")
        with pytest.raises(DnsNotFound):
            await resolver.mx("mx1.example.org")
    assert dns_server.query_count("nope.example.org", "MX") == 1
    assert dns_server.query_count("mx1.example.org", "MX") == 1
    clock.advance(61)  # synthetic SOA: negative TTL 60
    dns_server.set_records("nope.example.org", "MX", "10 mx1.example.org")
    assert (await resolver.mx("nope.example.org")).records == (MxRecord(10, "mx1.example.org"),)


async def test_temporary_failures_are_not_cached(dns_server: DnsServer) -> None:
    dns_server.set_failure("example.org", "servfail")
    resolver = resolver_for(dns_server)
    with pytest.raises(DnsTempError):
        await resolver.mx("example.org")
    dns_server.set_failure("example.org", None)
    assert len((await resolver.mx("example.org")).records) == 3


async def test_concurrent_identical_lookups_share_one_query(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server)
    answers = await asyncio.gather(*(resolver.mx("example.org") for _ in range(20)))
    assert len({a.records for a in answers}) == 1
    assert dns_server.query_count("example.org", "MX") == 1


async def test_cache_is_bounded(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server, cache_size=2, ipv6=False)
    for host in ("mx1.example.org", "mx2.example.org", "example.org", "mx1.example.org"):
        await resolver.addresses(host)
    assert len(resolver.cache) == 2
    assert dns_server.query_count("mx1.example.org", "A") == 2  # evicted, asked again


async def test_records_changed_at_run_time(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server, cache_size=0)
    dns_server.set_records("example.org", "MX", ["5 new.example.org"])
    assert (await resolver.mx("example.org")).records == (MxRecord(5, "new.example.org"),)
    dns_server.set_records("example.org", "MX", [])
    with pytest.raises(DnsNotFound) as info:
        await resolver.mx("example.org")
    assert not info.value.nxdomain
    dns_server.delete_records("mx2.example.org")
    with pytest.raises(DnsNotFound) as info:
        await resolver.addresses("mx2.example.org")
    assert info.value.nxdomain


# -- latency hook ------------------------------------------------------------------------------


async def test_lookup_events(dns_server: DnsServer) -> None:
    events: list[LookupEvent] = []
    dns_server.set_failure("example.org", "servfail", rdtype="TXT")
    resolver = resolver_for(dns_server, on_lookup=events.append)
    await resolver.mx("example.org")
    await resolver.mx("example.org")
    with pytest.raises(DnsNotFound):
        await resolver.mx("nope.example.org")
    with pytest.raises(DnsTempError):
        await resolver.txt("example.org")
    summary = [(e.name, e.rdtype, e.result, e.cached) for e in events]
    assert summary == [
        ("example.org", "MX", "answer", False),
        ("example.org", "MX", "answer", True),
        ("nope.example.org", "MX", "nxdomain", False),
        ("example.org", "TXT", "tempfail", False),
    ]
    assert all(e.seconds >= 0 for e in events)


async def test_a_failing_hook_does_not_break_lookups(dns_server: DnsServer) -> None:
    def broken(_: LookupEvent) -> None:
        raise RuntimeError("metrics down")

    resolver = resolver_for(dns_server, on_lookup=broken)
    assert (await resolver.mx("example.org")).records


# -- IPv6 loopback -----------------------------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1 on this machine")
async def test_server_and_resolver_on_ipv6_loopback(dns_zones: Zones) -> None:
    with DnsServer(dns_zones, host="::1") as server:
        assert server.nameserver.startswith("[::1]:")
        answer = await resolver_for(server).mx("example.org")
        assert len(answer.records) == 3
        server.set_failure("example.org", "truncate")
        answer = await resolver_for(server).mx("example.org")  # TCP over IPv6
        assert len(answer.records) == 3


# -- resolve_next_hops over the wire -----------------------------------------------------------


async def test_next_hops_end_to_end(dns_resolver: DnsResolver) -> None:
    result = await resolve_next_hops("example.org", dns_resolver, rng=random.Random(1))
    assert result.ok and not result.implicit
    hosts = [h.host for h in result.hops]
    assert sorted(hosts[:2]) == ["mx1.example.org", "mx2.example.org"]
    assert hosts[2] == "backup.example.net"
    by_host = {h.host: h.addresses for h in result.hops}
    assert by_host["mx1.example.org"] == ("192.0.2.1", "2001:db8::1")
    assert by_host["backup.example.net"] == ("198.51.100.2", "2001:db8:1::2")

    v6 = await resolve_next_hops("example.org", dns_resolver, prefer_ipv6=True)
    assert {h.host: h.addresses for h in v6.hops}["mx1.example.org"] == (
        "2001:db8::1",
        "192.0.2.1",
    )


async def test_next_hops_failures_end_to_end(dns_server: DnsServer) -> None:
    resolver = resolver_for(dns_server)
    implicit = await resolve_next_hops("example.net", resolver)
    assert implicit.implicit and implicit.hops[0].addresses == ("198.51.100.1",)

    null = await resolve_next_hops("nullmx.test", resolver)
    assert null.failure is not None and null.failure.reply.status == "5.1.10"

    missing = await resolve_next_hops("nope.example.org", resolver)
    assert missing.failure is not None and missing.failure.reply.status == "5.1.2"

    dns_server.set_failure("example.org", "servfail", rdtype="MX")
    temp = await resolve_next_hops("example.org", resolver)
    assert temp.failure is not None and temp.failure.reply.status == "4.4.3"
    assert temp.failure.reply.code == 451
