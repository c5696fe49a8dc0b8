"""The port-25 checks' pure parts and their answers to DNS failures (a fake resolver)."""

from __future__ import annotations

import pytest

from postillon.checks.context import ClientFacts, SessionContext
from postillon.checks.dnsbl import DnsblCheck, query_name
from postillon.checks.helo_check import syntax_problem
from postillon.checks.reverse_dns import ReverseDnsCheck
from postillon.dns.resolver import Answer, DnsNotFound, DnsTempError


class FakeResolver:
    def __init__(self, ptr: object, addresses: dict[str, object]) -> None:
        self._ptr = ptr
        self._addresses = addresses

    async def ptr(self, ip: str) -> Answer[str]:
        if isinstance(self._ptr, Exception):
            raise self._ptr
        return Answer(ip, tuple(self._ptr), 60, ip)  # type: ignore[arg-type]

    async def addresses(self, host: str) -> Answer[str]:
        found = self._addresses.get(host)
        if found is None:
            raise DnsNotFound(host, "A", "NXDOMAIN", nxdomain=True)
        if isinstance(found, Exception):
            raise found
        return Answer(host, tuple(found), 60, host)  # type: ignore[arg-type]

    ipv4 = addresses  # the DNSBL check's lookup (A only)


def test_dnsbl_query_names() -> None:
    assert query_name("192.0.2.1", "zen.example") == "1.2.0.192.zen.example"
    assert query_name("::ffff:192.0.2.1", "z.example") == "1.2.0.192.z.example"
    v6 = query_name("2001:db8::1", "z.example")
    assert (
        v6 is not None and v6.startswith("1.0.0.0.") and v6.endswith(".8.b.d.0.1.0.0.2.z.example")
    )
    assert query_name("not an ip", "z.example") is None


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("mail.example.org", True),
        ("[192.0.2.1]", True),
        ("[IPv6:2001:db8::1]", True),
        ("localhost", False),
        ("192.0.2.1", False),
        ("[192.0.2.300]", False),
        ("bad_name!.example", False),
    ],
)
def test_helo_syntax(name: str, ok: bool) -> None:
    assert (syntax_problem(name) == "") is ok


async def test_a_failing_list_never_refuses() -> None:
    resolver = FakeResolver([], {"1.2.0.192.bad.example": DnsTempError("x", "A", "SERVFAIL")})
    check = DnsblCheck(resolver, {"bad.example": 5}, 1, 1.0)  # type: ignore[arg-type]
    decision = await check.connect(SessionContext("S", ClientFacts(ip="192.0.2.1")))
    assert decision.action == "continue"


async def test_a_dnswl_listing_leaves_a_note() -> None:
    resolver = FakeResolver([], {"1.2.0.192.wl.example": ["127.0.10.1"]})
    check = DnsblCheck(resolver, {"wl.example": -2}, 1, 1.0)  # type: ignore[arg-type]
    s = SessionContext("S", ClientFacts(ip="192.0.2.1"))
    assert (await check.connect(s)).action == "continue"
    assert s.notes["dnswl"] is True and s.notes["dnsbl_score"] == -2


@pytest.mark.parametrize(
    ("ptr", "addresses", "action", "status", "code"),
    [
        (["host.example"], {"host.example": ["192.0.2.1"]}, "reject", "ok", None),
        (DnsTempError("x", "PTR", "SERVFAIL"), {}, "reject", "tempfail", 450),
        (DnsNotFound("x", "PTR", "NXDOMAIN", nxdomain=True), {}, "tempfail", "unknown", 450),
        (DnsNotFound("x", "PTR", "NXDOMAIN", nxdomain=True), {}, "reject", "unknown", 550),
        (["host.example"], {"host.example": ["192.0.2.9"]}, "off", "unknown", None),
        (
            ["a.example"],
            {"a.example": DnsTempError("a", "A", "timeout")},
            "reject",
            "tempfail",
            450,
        ),
    ],
)
async def test_reverse_dns(
    ptr: object, addresses: dict[str, object], action: str, status: str, code: int | None
) -> None:
    check = ReverseDnsCheck(FakeResolver(ptr, addresses), action)  # type: ignore[arg-type]
    s = SessionContext("S", ClientFacts(ip="192.0.2.1"))
    decision = await check.connect(s)
    assert s.client.rdns_status == status
    assert s.client.rdns == ("host.example" if status == "ok" else "")
    assert (decision.reply.code if decision.reply else None) == code
