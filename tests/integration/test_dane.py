"""DANE end to end over real DNSSEC: NSD + validating unbound, receivers on 127.0.0.x:25.

::

    SmtpTransport --DnsResolver(trust_ad)--> unbound 127.0.0.1:<p> --stub--> NSD (signed zones)
         |
         +--STARTTLS--> 127.0.0.2:25 mx-bad.dane.test     TLSA 3 1 1 of another key
         +--STARTTLS--> 127.0.0.3:25 mx-good.dane.test    TLSA 3 1 1 of its key
         +--STARTTLS--> 127.0.0.4:25 mx-ta.dane.test      TLSA 2 1 1 of its issuing CA
         +--STARTTLS--> 127.0.0.5:25 mx-unusable.dane.test only unusable/malformed TLSA
         +------------> 127.0.0.6:25 mx-notls.dane.test   matching TLSA, no STARTTLS
         +--STARTTLS--> 127.0.0.7:25 mx.plain.test        unsigned zone, TLSA not matching
         +------------> 127.0.0.8:25 mx.bad.test          TLSA changed after signing (bogus)

Every answer's AD bit is unbound's real verdict. Needs root (port 25) inside
scripts/run-tests.sh's loopback-only network namespace.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postillon.core.envelope import MailParams, RcptParams
from postillon.core.outcome import Delivered, Outcome, TempFail
from postillon.delivery.transport import DeliveryJob
from postillon.dns.dnspython_resolver import DnsResolver
from postillon.observability.metrics import Metrics
from postillon.outbound.client_session import ClientTimeouts
from postillon.outbound.dane_policy import DaneHook
from postillon.outbound.smtp_transport import OutboundSettings, SmtpTransport
from postillon.outbound.sts_policies import StsPolicies
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo
from postillon.routing.router import Route
from support.dnssec import DnssecLab, Zone
from support.https_server import Answer, HttpsServer
from support.starttls_receiver import StartTlsReceiver

if TYPE_CHECKING:
    from support.dnssec_fixtures import MakeDnssecLab

pytest_plugins = ["support.dnssec_fixtures"]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="receivers bind 127.0.0.x:25 (root)"),
]


def _spki_sha256(pem: bytes) -> str:
    key = x509.load_pem_x509_certificate(pem).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


@dataclass
class World:
    lab: DnssecLab
    certs: dict[str, trustme.LeafCert]  # by host


IPS = {
    "mx-bad.dane.test": "127.0.0.2",
    "mx-good.dane.test": "127.0.0.3",
    "mx-ta.dane.test": "127.0.0.4",
    "mx-unusable.dane.test": "127.0.0.5",
    "mx-notls.dane.test": "127.0.0.6",
    "mx.plain.test": "127.0.0.7",
    "mx.bad.test": "127.0.0.8",
    "mx-real.dane.test": "127.0.0.9",  # behind the alias mx-alias (CNAME)
    "mx-tareal.dane.test": "127.0.0.10",  # behind mx-taalias; certificate for this name only
}


@pytest.fixture(scope="module")
def world(make_dnssec_lab: MakeDnssecLab) -> World:
    ee_ca = trustme.CA()  # issues the DANE-EE servers' certificates (its name is irrelevant)
    ta_root = trustme.CA()
    ta_inter = ta_root.create_child_ca()
    certs = {host: ee_ca.issue_cert(host) for host in IPS}
    certs["mx-ta.dane.test"] = ta_inter.issue_cert("mx-ta.dane.test")
    certs["mx-tareal.dane.test"] = ta_inter.issue_cert("mx-tareal.dane.test")
    stranger = ee_ca.issue_cert("mx-bad.dane.test")  # the key mx-bad's TLSA names instead

    def ee(host: str) -> str:
        return "3 1 1 " + _spki_sha256(certs[host].cert_chain_pems[0].bytes())

    good_digest = ee("mx-good.dane.test")
    dane = f"""
fallback MX 10 mx-bad
fallback MX 20 mx-good
refuse MX 10 mx-bad
ta MX 10 mx-ta
unusable MX 10 mx-unusable
notls MX 10 mx-notls
alias MX 10 mx-alias
mx-alias CNAME mx-real
taalias MX 10 mx-taalias
both MX 10 mx-good
_mta-sts.both TXT "v=STSv1; id=1"
mta-sts.both A 127.0.0.80
mx-taalias CNAME mx-tareal
{"".join(f"{h.split('.')[0]} A {ip}{chr(10)}" for h, ip in IPS.items() if h.endswith("dane.test"))}
_25._tcp.mx-bad TLSA 3 1 1 {_spki_sha256(stranger.cert_chain_pems[0].bytes())}
_25._tcp.mx-good TLSA {good_digest}
_25._tcp.mx-ta TLSA 2 1 1 {_spki_sha256(ta_inter.cert_pem.bytes())}
_25._tcp.mx-unusable TLSA 1 1 1 {ee("mx-unusable.dane.test")[6:]}
_25._tcp.mx-unusable TLSA 3 0 0 deadbeef
_25._tcp.mx-unusable TLSA 2 1 0 3003020100
_25._tcp.mx-unusable TLSA 3 1 3 {ee("mx-unusable.dane.test")[6:]}
_25._tcp.mx-unusable TLSA 4 0 1 {ee("mx-unusable.dane.test")[6:]}
_25._tcp.mx-notls TLSA {ee("mx-notls.dane.test")}
_25._tcp.mx-real TLSA {ee("mx-real.dane.test")}
_25._tcp.mx-alias TLSA 3 1 1 {"22" * 32}
_25._tcp.mx-tareal TLSA 2 1 1 {_spki_sha256(ta_inter.cert_pem.bytes())}
"""
    zones = [
        Zone("dane.test", dane),
        Zone(
            "plain.test",
            f"@ MX 10 mx\nmx A {IPS['mx.plain.test']}\n_25._tcp.mx TLSA 3 1 1 {'00' * 32}\n",
            signed=False,
        ),
        Zone(
            "bad.test",
            f"@ MX 10 mx\nmx A {IPS['mx.bad.test']}\n_25._tcp.mx TLSA {ee('mx.bad.test')}\n",
            # Changed after signing: the RRSIG no longer matches, unbound says SERVFAIL.
            tamper=(("_25._tcp.mx", "TLSA", f"3 1 1 {'11' * 32}"),),
        ),
    ]
    return World(make_dnssec_lab(zones), certs)


@asynccontextmanager
async def receivers(world: World, *hosts: str) -> AsyncIterator[dict[str, StartTlsReceiver]]:
    async with AsyncExitStack() as stack:
        out = {}
        for host in hosts:
            ctx: ssl.SSLContext | None = None
            if host != "mx-notls.dane.test":
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                world.certs[host].configure_cert(ctx)
            out[host] = await stack.enter_async_context(StartTlsReceiver(IPS[host], 25, host, ctx))
        yield out


def transport(
    world: World, *, trust_ad: bool = True, metrics: Metrics | None = None
) -> SmtpTransport:
    resolver = DnsResolver([world.lab.nameserver], timeout=2.0, attempts=1, trust_ad=trust_ad)
    settings = OutboundSettings(
        helo_name="client.test", timeouts=ClientTimeouts(connect=5, greeting=5, command=5)
    )
    return SmtpTransport(resolver, settings, dane=DaneHook(resolver), metrics=metrics)


def job(domain: str) -> DeliveryJob:
    info = MessageInfo("Q1", "a@s.test", MailParams(), 10, 0.0, "", "", ())
    record = DeliveryRecord(
        1, "Q1", f"rcpt@{domain}", None, RcptParams(), DeliveryState.LEASED, 0, 0.0, None,
        "tok", "me", 0.0, 0.0,
    )  # fmt: skip
    route = Route("smtp", f"smtp:{domain}", domain)
    return DeliveryJob(info, (record,), route, store=None, cached_body=b"Subject: t\r\n\r\nhi\r\n")  # type: ignore[arg-type]


async def deliver(world: World, domain: str, **kw: Any) -> Sequence[Outcome]:
    t = transport(world, **kw)
    try:
        return await t.deliver(job(domain))
    finally:
        await t.close()


# -- the resolver sees real DNSSEC states ---------------------------------------------------


async def test_resolver_reports_secure_insecure_and_bogus(world: World) -> None:
    resolver = DnsResolver([world.lab.nameserver], timeout=2.0, attempts=1, trust_ad=True)
    assert (await resolver.mx("fallback.dane.test")).authenticated
    assert (await resolver.tlsa("_25._tcp.mx-good.dane.test")).authenticated
    assert not (await resolver.mx("plain.test")).authenticated
    from postillon.dns.resolver import DnsBogus, DnsNotFound

    with pytest.raises(DnsBogus):
        await resolver.tlsa("_25._tcp.mx.bad.test")
    with pytest.raises(DnsNotFound) as info:
        await resolver.tlsa("_25._tcp.nothing.dane.test")
    assert info.value.authenticated  # NSEC-proven denial


# -- DANE decides ----------------------------------------------------------------------------


async def test_dane_refuses_the_mismatching_mx_and_uses_the_next(world: World) -> None:
    metrics = Metrics()
    async with receivers(world, "mx-bad.dane.test", "mx-good.dane.test") as rx:
        [outcome] = await deliver(world, "fallback.dane.test", metrics=metrics)
    assert isinstance(outcome, Delivered), outcome
    assert "mx-good.dane.test" in outcome.detail
    assert "tls=TLSv1.3/dane-ee policy=dane" in outcome.detail
    bad, good = rx["mx-bad.dane.test"], rx["mx-good.dane.test"]
    assert bad.handshakes == 1 and bad.messages == []  # TLS came up, then no MAIL
    assert [m.tls for m in good.messages] == [True]
    # postillon_outbound_tls_sessions_total{policy,result} shows both sessions.
    for result in ("tlsa-mismatch", "dane-ee"):
        labels = {"policy": "dane", "result": result}
        count = metrics.registry.get_sample_value("postillon_outbound_tls_sessions_total", labels)
        assert count == 1, result


async def test_dane_defers_when_no_mx_matches(world: World) -> None:
    async with receivers(world, "mx-bad.dane.test") as rx:
        [outcome] = await deliver(world, "refuse.dane.test")
    assert isinstance(outcome, TempFail), outcome
    assert outcome.reply.code == 451 and outcome.reply.status == "4.7.5"
    assert "DANE: no TLSA record of mx-bad.dane.test matched the certificate" in str(outcome.reply)
    assert rx["mx-bad.dane.test"].messages == []


async def test_without_trust_ad_dane_does_not_apply(world: World) -> None:
    """The same DNS through an untrusted resolver: opportunistic TLS to the first MX."""
    async with receivers(world, "mx-bad.dane.test") as rx:
        [outcome] = await deliver(world, "refuse.dane.test", trust_ad=False)
    assert isinstance(outcome, Delivered), outcome
    assert [m.tls for m in rx["mx-bad.dane.test"].messages] == [True]


async def test_dane_ta_through_the_presented_chain(world: World) -> None:
    async with receivers(world, "mx-ta.dane.test") as rx:
        [outcome] = await deliver(world, "ta.dane.test")
    assert isinstance(outcome, Delivered), outcome
    assert "tls=TLSv1.3/dane-ta policy=dane" in outcome.detail
    assert len(rx["mx-ta.dane.test"].messages) == 1


async def test_only_unusable_tlsa_means_mandatory_unauthenticated_tls(world: World) -> None:
    async with receivers(world, "mx-unusable.dane.test") as rx:
        [outcome] = await deliver(world, "unusable.dane.test")
    assert isinstance(outcome, Delivered), outcome
    assert "tls=TLSv1.3/tlsa-unusable policy=dane" in outcome.detail
    assert [m.tls for m in rx["mx-unusable.dane.test"].messages] == [True]


async def test_dane_host_without_starttls_gets_nothing(world: World) -> None:
    async with receivers(world, "mx-notls.dane.test") as rx:
        [outcome] = await deliver(world, "notls.dane.test")
    assert isinstance(outcome, TempFail), outcome
    assert "STARTTLS" in str(outcome.reply)
    assert rx["mx-notls.dane.test"].messages == []


async def test_bogus_tlsa_defers(world: World) -> None:
    async with receivers(world, "mx.bad.test") as rx:
        [outcome] = await deliver(world, "bad.test")
    assert isinstance(outcome, TempFail), outcome
    assert outcome.reply.status == "4.7.5"
    assert "DANE: TLSA lookup of _25._tcp.mx.bad.test failed" in str(outcome.reply)
    assert rx["mx.bad.test"].connections == 0  # not even connected to


async def test_insecure_zone_delivers_opportunistically(world: World) -> None:
    """plain.test publishes a TLSA record that matches nothing, but it is unsigned."""
    async with receivers(world, "mx.plain.test") as rx:
        [outcome] = await deliver(world, "plain.test")
    assert isinstance(outcome, Delivered), outcome
    assert "policy=opportunistic" in outcome.detail
    assert [m.tls for m in rx["mx.plain.test"].messages] == [True]


# -- a CNAME'd MX host (RFC 7672 §2.2.2) ------------------------------------------------------


async def test_cname_expanded_name_tlsa_first(world: World) -> None:
    """alias.dane.test MX mx-alias, a CNAME to mx-real (a signed chain). TLSA at the
    expanded name match the server; the ones at the alias name match nothing. Matching
    by the expanded name first delivers; by the MX name it would have refused."""
    resolver = DnsResolver([world.lab.nameserver], timeout=2.0, attempts=1, trust_ad=True)
    address = await resolver.addresses("mx-alias.dane.test")
    assert address.authenticated and address.canonical_name == "mx-real.dane.test"
    async with receivers(world, "mx-real.dane.test") as rx:
        [outcome] = await deliver(world, "alias.dane.test")
    assert isinstance(outcome, Delivered), outcome
    assert "tls=TLSv1.3/dane-ee policy=dane" in outcome.detail
    assert outcome.tls is not None and outcome.tls.mx == "mx-alias.dane.test"
    assert len(rx["mx-real.dane.test"].messages) == 1


async def test_cname_expanded_name_is_a_dane_ta_reference_identifier(world: World) -> None:
    """taalias.dane.test MX mx-taalias → CNAME mx-tareal, whose certificate names only
    mx-tareal.dane.test: DANE-TA's name check passes with the expanded name (§3.2.2)."""
    async with receivers(world, "mx-tareal.dane.test") as rx:
        [outcome] = await deliver(world, "taalias.dane.test")
    assert isinstance(outcome, Delivered), outcome
    assert "tls=TLSv1.3/dane-ta policy=dane" in outcome.detail
    assert len(rx["mx-tareal.dane.test"].messages) == 1


# -- DANE and MTA-STS on one domain (RFC 8461 §2: DANE wins) ---------------------------------


async def test_dane_wins_over_mta_sts_which_is_not_even_fetched(
    world: World, tmp_path: Path
) -> None:
    """both.dane.test publishes DANE (signed MX, TLSA of mx-good) and MTA-STS (a TXT id
    and a policy host on 127.0.0.80:443 whose enforce policy lists another MX, so it
    would refuse mx-good). DANE applies; the policy host never sees a request."""
    sts_policy = b"version: STSv1\r\nmode: enforce\r\nmx: mx.elsewhere.test\r\nmax_age: 86400\r\n"
    with HttpsServer(tmp_path / "web", "127.0.0.80", ["mta-sts.both.dane.test"]) as web:
        web.answers["/.well-known/mta-sts.txt"] = Answer(200, sts_policy)
        resolver = DnsResolver([world.lab.nameserver], timeout=2.0, attempts=1, trust_ad=True)
        # The policy is there for anyone who asks: MTA-STS alone would refuse mx-good.
        sts = StsPolicies(resolver, None, ca_file=str(web.ca_file))
        policy = await sts.policy_for("both.dane.test")
        assert policy is not None and not policy.covers("mx-good.dane.test")
        assert len(web.requests) == 1
        web.requests.clear()
        await sts.close()

        settings = OutboundSettings(
            helo_name="client.test", timeouts=ClientTimeouts(connect=5, greeting=5, command=5)
        )
        fresh = StsPolicies(resolver, None, ca_file=str(web.ca_file))  # nothing cached
        t = SmtpTransport(resolver, settings, dane=DaneHook(resolver), mta_sts=fresh)
        try:
            async with receivers(world, "mx-good.dane.test") as rx:
                [outcome] = await t.deliver(job("both.dane.test"))
        finally:
            await t.close()
    assert isinstance(outcome, Delivered), outcome
    assert "tls=TLSv1.3/dane-ee policy=dane" in outcome.detail
    assert outcome.tls is not None and outcome.tls.policy == "dane"
    assert len(rx["mx-good.dane.test"].messages) == 1
    assert web.requests == []  # MTA-STS was not consulted at all
