"""resolve_next_hops as pure logic over a fake resolver (RFC 5321 §5.1, RFC 7505)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence

import pytest

from postillon.core.outcome import PermFail, TempFail
from postillon.dns.resolver import (
    Answer,
    DnsNotFound,
    DnsTempError,
    MxRecord,
    Resolver,
    TlsaRecord,
    TxtRecord,
)
from postillon.outbound.mx import (
    DNS_TEMP_FAILURE,
    NO_ROUTE,
    NO_SUCH_DOMAIN,
    NULL_MX,
    NextHop,
    order_mx,
    resolve_next_hops,
)

NXDOMAIN = DnsNotFound("x", "MX", "NXDOMAIN", nxdomain=True)
NODATA = DnsNotFound("x", "MX", "no records", nxdomain=False)
TEMP = DnsTempError("x", "MX", "SERVFAIL")

MxData = Sequence[tuple[int, str]] | BaseException
AddrData = Sequence[str] | BaseException


class FakeResolver:
    """Answers from dicts; a missing name is NXDOMAIN. Counts the lookups it was asked."""

    def __init__(
        self,
        mx: Mapping[str, MxData] | None = None,
        addresses: Mapping[str, AddrData] | None = None,
        *,
        authenticated: bool = False,
    ) -> None:
        self._mx = dict(mx or {})
        self._addresses = dict(addresses or {})
        self._authenticated = authenticated
        self.asked: list[tuple[str, str]] = []

    async def mx(self, domain: str) -> Answer[MxRecord]:
        self.asked.append(("MX", domain))
        data = self._mx.get(domain, NXDOMAIN)
        if isinstance(data, BaseException):
            raise data
        records = tuple(MxRecord(p, h) for p, h in data)
        return Answer(domain, records, 300, domain, self._authenticated)

    async def addresses(self, host: str) -> Answer[str]:
        self.asked.append(("ADDR", host))
        data = self._addresses.get(host, NXDOMAIN)
        if isinstance(data, BaseException):
            raise data
        return Answer(host, tuple(data), 300, host, self._authenticated)

    async def txt(self, name: str) -> Answer[TxtRecord]:
        raise NXDOMAIN

    def cached_txt(self, name: str) -> Answer[TxtRecord] | None:
        return None

    async def tlsa(self, name: str) -> Answer[TlsaRecord]:
        raise NXDOMAIN

    async def ptr(self, ip: str) -> Answer[str]:
        raise NXDOMAIN


def _is_resolver(r: Resolver) -> Resolver:  # mypy checks FakeResolver fits the protocol
    return r


_is_resolver(FakeResolver())


def hosts(hops: Sequence[NextHop]) -> list[str]:
    return [h.host for h in hops]


# -- ordering ----------------------------------------------------------------------------------


async def test_sorted_by_preference() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(30, "c.example.org"), (10, "a.example.org"), (20, "b.example.org")]},
        addresses={
            "a.example.org": ["192.0.2.1"],
            "b.example.org": ["192.0.2.2"],
            "c.example.org": ["192.0.2.3"],
        },
    )
    result = await resolve_next_hops("example.org", resolver)
    assert result.ok and result.failure is None
    assert hosts(result.hops) == ["a.example.org", "b.example.org", "c.example.org"]
    assert [h.preference for h in result.hops] == [10, 20, 30]
    assert result.hops[0] == NextHop("a.example.org", ("192.0.2.1",), 10, False)


def test_equal_preferences_are_shuffled_but_stay_in_their_band() -> None:
    records = [MxRecord(10, f"h{i}") for i in range(4)] + [MxRecord(5, "first"), MxRecord(50, "z")]
    seen: Counter[tuple[str, ...]] = Counter()
    rng = random.Random(7)
    for _ in range(400):
        order = [r.exchange for r in order_mx(records, rng)]
        assert order[0] == "first" and order[-1] == "z"
        seen[tuple(order[1:5])] += 1
    assert len(seen) == 24  # every permutation of the four equal hosts shows up
    firsts = Counter(order[0] for order in seen.elements())
    assert all(60 <= n <= 140 for n in firsts.values()), firsts  # roughly uniform


def test_order_is_reproducible_with_a_seeded_rng() -> None:
    records = [MxRecord(10, f"h{i}") for i in range(6)]
    assert order_mx(records, random.Random(3)) == order_mx(
        list(reversed(records)), random.Random(3)
    )


def test_duplicate_hosts_keep_their_best_preference() -> None:
    records = [MxRecord(20, "a"), MxRecord(10, "a"), MxRecord(15, "b")]
    assert order_mx(records, random.Random(0)) == [MxRecord(10, "a"), MxRecord(15, "b")]


async def test_equal_preference_order_varies_between_calls() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "a"), (10, "b"), (10, "c")]},
        addresses={"a": ["192.0.2.1"], "b": ["192.0.2.2"], "c": ["192.0.2.3"]},
    )
    rng = random.Random(11)
    orders = {
        tuple(hosts((await resolve_next_hops("example.org", resolver, rng=rng)).hops))
        for _ in range(50)
    }
    assert len(orders) == 6


async def test_addresses_ipv4_first_or_ipv6_first() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "mx")]},
        addresses={"mx": ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"]},
    )
    v4 = (await resolve_next_hops("example.org", resolver)).hops[0].addresses
    assert {a for a in v4[:2]} == {"192.0.2.1", "192.0.2.2"}
    assert {a for a in v4[2:]} == {"2001:db8::1", "2001:db8::2"}
    v6 = (await resolve_next_hops("example.org", resolver, prefer_ipv6=True)).hops[0].addresses
    assert {a for a in v6[:2]} == {"2001:db8::1", "2001:db8::2"}
    assert {a for a in v6[2:]} == {"192.0.2.1", "192.0.2.2"}


async def test_duplicate_addresses_are_dropped() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "mx")]}, addresses={"mx": ["192.0.2.1", "192.0.2.1"]}
    )
    assert (await resolve_next_hops("example.org", resolver)).hops[0].addresses == ("192.0.2.1",)


# -- null MX -----------------------------------------------------------------------------------


async def test_null_mx_is_permanent_5_1_10() -> None:
    resolver = FakeResolver(mx={"example.org": [(0, ".")]})
    result = await resolve_next_hops("example.org", resolver)
    assert isinstance(result.failure, PermFail)
    assert result.failure.reply == NULL_MX
    assert result.failure.reply.status == "5.1.10"
    assert result.hops == ()
    assert resolver.asked == [("MX", "example.org")]  # no address lookups after a null MX


async def test_null_target_among_real_mx_is_ignored() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(0, "."), (10, "mx")]}, addresses={"mx": ["192.0.2.1"]}
    )
    result = await resolve_next_hops("example.org", resolver)
    assert hosts(result.hops) == ["mx"]
    assert any("null target" in n for n in result.notes)


# -- implicit MX -------------------------------------------------------------------------------


async def test_no_mx_uses_the_domain_itself() -> None:
    resolver = FakeResolver(
        mx={"example.org": NODATA}, addresses={"example.org": ["192.0.2.9", "2001:db8::9"]}
    )
    result = await resolve_next_hops("example.org", resolver, prefer_ipv6=True)
    assert result.implicit and result.ok
    assert result.hops == (NextHop("example.org", ("2001:db8::9", "192.0.2.9"), 0, False),)


async def test_no_mx_and_no_address_is_permanent() -> None:
    resolver = FakeResolver(mx={"example.org": NODATA}, addresses={"example.org": NODATA})
    result = await resolve_next_hops("example.org", resolver)
    assert isinstance(result.failure, PermFail)
    assert result.failure.reply == NO_ROUTE


async def test_no_mx_and_address_lookup_temporary_failure_is_temporary() -> None:
    resolver = FakeResolver(mx={"example.org": NODATA}, addresses={"example.org": TEMP})
    result = await resolve_next_hops("example.org", resolver)
    assert isinstance(result.failure, TempFail)
    assert result.failure.reply == DNS_TEMP_FAILURE


# -- temporary versus permanent ----------------------------------------------------------------


async def test_nxdomain_is_permanent_5_1_2() -> None:
    result = await resolve_next_hops("nope.example", FakeResolver())
    assert isinstance(result.failure, PermFail)
    assert result.failure.reply == NO_SUCH_DOMAIN
    assert (result.failure.reply.code, result.failure.reply.status) == (550, "5.1.2")


async def test_mx_temporary_failure_is_temporary_4_4_3() -> None:
    result = await resolve_next_hops("example.org", FakeResolver(mx={"example.org": TEMP}))
    assert isinstance(result.failure, TempFail)
    assert (result.failure.reply.code, result.failure.reply.status) == (451, "4.4.3")
    assert "SERVFAIL" in result.failure.detail


@pytest.mark.parametrize("error", [RuntimeError("boom"), OSError("unreachable"), KeyError("x")])
async def test_an_unexpected_resolver_error_is_temporary(error: Exception) -> None:
    result = await resolve_next_hops("example.org", FakeResolver(mx={"example.org": error}))
    assert isinstance(result.failure, TempFail)
    assert "boom" not in result.failure.reply.text  # details stay out of the reply


async def test_hosts_without_addresses_are_skipped() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "dead"), (20, "nodata"), (30, "temp"), (40, "live")]},
        addresses={"dead": NXDOMAIN, "nodata": NODATA, "temp": TEMP, "live": ["192.0.2.4"]},
    )
    result = await resolve_next_hops("example.org", resolver)
    assert result.ok
    assert hosts(result.hops) == ["live"]
    assert len(result.notes) == 3


async def test_all_hosts_permanently_without_addresses_is_permanent() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "dead"), (20, "nodata"), (30, "empty")]},
        addresses={"dead": NXDOMAIN, "nodata": NODATA, "empty": []},
    )
    result = await resolve_next_hops("example.org", resolver)
    assert isinstance(result.failure, PermFail)
    assert result.failure.reply == NO_ROUTE
    assert result.failure.reply.status == "5.4.4"


async def test_any_temporary_host_failure_makes_no_hosts_temporary() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "dead"), (20, "temp")]},
        addresses={"dead": NXDOMAIN, "temp": TEMP},
    )
    result = await resolve_next_hops("example.org", resolver)
    assert isinstance(result.failure, TempFail)


async def test_unexpected_error_for_a_host_counts_as_temporary() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "weird")]}, addresses={"weird": RuntimeError("bug")}
    )
    result = await resolve_next_hops("example.org", resolver)
    assert isinstance(result.failure, TempFail)


# -- inputs and limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "address"),
    [("[192.0.2.5]", "192.0.2.5"), ("[IPv6:2001:db8::5]", "2001:db8::5")],
)
async def test_address_literal_needs_no_dns(literal: str, address: str) -> None:
    resolver = FakeResolver()
    result = await resolve_next_hops(literal, resolver)
    assert result.hops == (NextHop(literal, (address,)),)
    assert resolver.asked == []


async def test_bad_address_literal_is_permanent() -> None:
    result = await resolve_next_hops("[300.1.1.1]", FakeResolver())
    assert isinstance(result.failure, PermFail)


async def test_idn_domain_is_looked_up_as_a_labels() -> None:
    resolver = FakeResolver(
        mx={"xn--bcher-kva.example": [(10, "mx")]}, addresses={"mx": ["192.0.2.1"]}
    )
    result = await resolve_next_hops("bücher.example", resolver)
    assert result.ok
    assert resolver.asked[0] == ("MX", "xn--bcher-kva.example")


async def test_idn_domain_is_looked_up_by_its_idna_2008_a_label() -> None:
    """IDNA 2008: faß.de is xn--fa-hia.de (IDNA 2003 made it fass.de, another domain)."""
    resolver = FakeResolver(mx={"xn--fa-hia.de": [(10, "mx")]}, addresses={"mx": ["192.0.2.1"]})
    result = await resolve_next_hops("faß.de", resolver)
    assert result.ok
    assert resolver.asked[0] == ("MX", "xn--fa-hia.de")


async def test_ip_and_loopback_targets_are_ordinary_names() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "192.0.2.1"), (20, "localhost")]},
        addresses={"localhost": ["127.0.0.1"]},
    )
    result = await resolve_next_hops("example.org", resolver)
    assert ("ADDR", "192.0.2.1") in resolver.asked  # looked up as a name, not used as an IP
    assert hosts(result.hops) == ["localhost"]


async def test_only_max_hosts_are_resolved() -> None:
    mx = [(i, f"mx{i}") for i in range(30)]
    resolver = FakeResolver(
        mx={"example.org": mx}, addresses={f"mx{i}": ["192.0.2.1"] for i in range(30)}
    )
    result = await resolve_next_hops("example.org", resolver, max_hosts=5)
    assert hosts(result.hops) == [f"mx{i}" for i in range(5)]
    assert sum(1 for kind, _ in resolver.asked if kind == "ADDR") == 5


async def test_authenticated_flags_are_passed_on() -> None:
    resolver = FakeResolver(
        mx={"example.org": [(10, "mx")]}, addresses={"mx": ["192.0.2.1"]}, authenticated=True
    )
    result = await resolve_next_hops("example.org", resolver)
    assert result.authenticated and result.hops[0].authenticated
