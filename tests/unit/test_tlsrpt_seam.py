"""The TLS observer seam (outbound/tls_observer.py): the transport tells the observer
exactly what it counts in ``postillon_outbound_tls_sessions_total``, for MX sessions
only, with the policy domain, MX host, receiving IP and the published policy."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from test_smtp_transport import (  # noqa: F401 (no_tcp_race: an autouse fixture)
    OK,
    TLSA,
    AuthSession,
    TlsaResolver,
    job,
    no_tcp_race,
    sample,
    secure_tlsa,
    transport,
)

from postillon.core.outcome import Delivered, TempFail
from postillon.dns.resolver import DnsBogus, DnsNotFound
from postillon.observability.metrics import Metrics
from postillon.outbound import smtp_transport
from postillon.outbound.client_session import SessionError
from postillon.outbound.dane_policy import DaneHook
from postillon.outbound.smtp_transport import SmtpTransport
from postillon.outbound.tls_observer import TlsSessionResult, published_policy, tlsa_text
from postillon.routing.router import NextHop, Route

MX_ROUTE = Route("smtp", "smtp:d.test", "d.test")


class Observer:
    def __init__(self) -> None:
        self.seen: list[TlsSessionResult] = []

    def tls_session(self, result: TlsSessionResult) -> None:
        self.seen.append(result)


def mx_targets(monkeypatch: pytest.MonkeyPatch, t: SmtpTransport, *hosts: str) -> None:
    async def targets(route: Route) -> list[smtp_transport.Target]:
        return [
            smtp_transport.Target(f"mx{i}.d.test", ip, 25, None, True, True, "d.test")
            for i, ip in enumerate(hosts, 1)
        ]

    monkeypatch.setattr(t, "_targets", targets)


def observed(t: SmtpTransport) -> Observer:
    observer = Observer()
    t.tls_observer = observer
    t.metrics = Metrics()
    return observer


async def test_refused_host_and_plaintext_session_are_both_observed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mx1: bogus TLSA (refused before connecting); mx2: no STARTTLS offered (plaintext)."""
    t, connects = transport(monkeypatch, {"192.0.2.2": [OK]})
    calls = iter([DnsBogus("_25._tcp.mx1.d.test", "TLSA", "SERVFAIL"), None])

    class OneBogus(TlsaResolver):
        async def tlsa(self, name: str) -> Any:
            error = next(calls)
            if error is not None:
                raise error
            raise DnsNotFound(name, "TLSA", "none", nxdomain=True)

    t.dane = DaneHook(OneBogus(TLSA))  # type: ignore[arg-type]
    observer = observed(t)
    mx_targets(monkeypatch, t, "192.0.2.1", "192.0.2.2")
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=MX_ROUTE))
    assert isinstance(outcome, Delivered) and connects == ["192.0.2.2"]
    bogus, plain = observer.seen
    assert (bogus.policy_domain, bogus.mx_host, bogus.receiving_ip) == (
        "d.test",
        "mx1.d.test",
        "192.0.2.1",
    )
    assert (bogus.mode, bogus.result, bogus.policy_type) == ("dane", "dnssec-bogus", "tlsa")
    assert "TLSA lookup of _25._tcp.mx1.d.test failed" in bogus.reason
    assert (plain.mode, plain.result, plain.policy_type) == (
        "opportunistic",
        "plaintext",
        "no-policy-found",
    )
    # The same seam as the metric: one count each.
    assert sample(t, "dane", "dnssec-bogus") == 1
    assert sample(t, "opportunistic", "plaintext") == 1


async def test_dane_session_reports_its_tlsa_records(monkeypatch: pytest.MonkeyPatch) -> None:
    async def connect(host: str, port: int, **kw: Any) -> AuthSession:
        return AuthSession([OK], "dane-ee")

    monkeypatch.setattr(smtp_transport.SmtpClientSession, "connect", staticmethod(connect))
    t = SmtpTransport(resolver=None, settings=smtp_transport.OutboundSettings("me.test"))  # type: ignore[arg-type]
    t.dane = DaneHook(secure_tlsa())  # type: ignore[arg-type]
    observer = observed(t)
    mx_targets(monkeypatch, t, "192.0.2.1")
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=MX_ROUTE))
    assert isinstance(outcome, Delivered)
    (seen,) = observer.seen
    assert (seen.result, seen.policy_type) == ("dane-ee", "tlsa")
    assert seen.policy_strings == ("3 1 1 " + "01" * 32,) == (tlsa_text(TLSA),)


async def test_policy_failure_after_the_handshake_carries_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failure = SessionError(
        "connect: certificate for mx1.d.test not verified: no matching subjectAltName",
        status="4.7.5",
        tls_result="not-verified",
    )
    t, _ = transport(monkeypatch, {"192.0.2.1": failure})
    observer = observed(t)
    mx_targets(monkeypatch, t, "192.0.2.1")
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=MX_ROUTE))
    assert isinstance(outcome, TempFail)
    (seen,) = observer.seen
    assert seen.result == "not-verified" and "subjectAltName" in seen.reason


async def test_smarthost_sessions_are_not_observed(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 8460 reports go to the recipient domain about its MX hosts; a host the
    operator named (smarthost, route) is not the domain's."""
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]})
    observer = observed(t)
    (outcome,) = await t.deliver(job(["x@d.test"]))  # hop 192.0.2.1, no MX lookup
    assert isinstance(outcome, Delivered)
    assert observer.seen == [] and sample(t, "opportunistic", "plaintext") == 1


def test_lmtp_transport_never_observes() -> None:
    t = SmtpTransport(
        resolver=None,  # type: ignore[arg-type]
        settings=smtp_transport.OutboundSettings("me.test"),
        lmtp=True,
        tls_observer=Observer(),
    )
    assert t.tls_observer is None


def test_published_policy() -> None:
    assert published_policy("dane", (TLSA,)) == ("tlsa", (tlsa_text(TLSA),))
    assert published_policy("dane", None) == ("tlsa", ())
    sts = ("version: STSv1", "mode: enforce", "mx: mx.d.test", "max_age: 86400")
    # DANE wins where both apply (RFC 8461 §2); else the MTA-STS policy's lines.
    assert published_policy("dane", (TLSA,), sts_lines=sts)[0] == "tlsa"
    assert published_policy("verify", None, sts_lines=sts) == ("sts", sts)
    for mode in ("opportunistic", "encrypt", "verify", "fingerprint"):
        assert published_policy(mode, None) == ("no-policy-found", ())


def test_smarthost_hop_has_no_mx_domain() -> None:
    target = smtp_transport.Target("relay.test", "192.0.2.9", 587, NextHop("relay.test", 587))
    assert target.mx_domain == ""
