"""SmtpTransport's decisions with scripted sessions (no sockets): which host
is tried next, what a broken transaction settles, when a destination is busy."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from postillon.core.envelope import MailParams, RcptParams
from postillon.core.outcome import Delivered, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.core.sts import StsPolicy
from postillon.delivery.transport import DeliveryJob
from postillon.dns.resolver import Answer, DnsBogus, TlsaRecord
from postillon.observability.metrics import Metrics
from postillon.outbound import connector, smtp_transport
from postillon.outbound.client_session import SessionError, TransactionResult
from postillon.outbound.dane_policy import DaneHook
from postillon.outbound.happy_eyeballs import Attempt, RaceResult
from postillon.outbound.smtp_transport import OutboundSettings, SmtpTransport
from postillon.outbound.tls_policy import PolicyRule, TlsPolicyTable, TlsRequirement
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo
from postillon.routing.router import NextHop, Route

OK = Reply.of(250, "2.0.0", "Ok")
UNKNOWN = Reply.of(550, "5.1.1", "unknown user")
LOST = Reply.of(451, "4.4.2", "connection lost")


@pytest.fixture(autouse=True)
def no_tcp_race(monkeypatch: pytest.MonkeyPatch) -> None:
    """No sockets here: the Happy Eyeballs race "wins" at its first address
    without connecting, and the scripted SmtpClientSession.connect decides."""

    async def first_address(addresses: Sequence[str], port: int, **kw: Any) -> RaceResult:
        return RaceResult(None, addresses[0], None, [Attempt(addresses[0], None)])

    monkeypatch.setattr(connector, "race", first_address)


def record(i: int, rcpt: str) -> DeliveryRecord:
    return DeliveryRecord(
        i, "Q1", rcpt, None, RcptParams(), DeliveryState.LEASED, 0, 0.0, None, "tok", "me", 0.0, 0.0
    )


def job(rcpts: Sequence[str], hosts: Sequence[str] = ("192.0.2.1",)) -> DeliveryJob:
    info = MessageInfo("Q1", "a@s.test", MailParams(), 10, 0.0, "", "", ())
    route = Route("smtp", "smtp:d.test", "d.test", hop=NextHop(hosts[0], 25))
    return DeliveryJob(
        info,
        tuple(record(i, r) for i, r in enumerate(rcpts)),
        route,
        store=None,
        cached_body=b"x\r\n",
    )  # type: ignore[arg-type]


class FakeSession:
    def __init__(self, script: Any) -> None:
        self.script = script
        self.usable = True
        self.messages_sent = 0
        self.tls = ""
        self.tls_verified = False
        self.extensions = {"DSN": ""}
        self.on_close: Any = None  # as SmtpClientSession (the metrics and shaping hooks)

    async def send(self, *args: Any, **kw: Any) -> TransactionResult:
        async for _ in args[3]:
            pass
        if isinstance(self.script, Exception):
            raise self.script
        self.messages_sent += 1
        return TransactionResult(per_recipient=tuple(self.script), mail_reply=OK)

    async def quit(self) -> None:
        self.usable = False

    def close(self) -> None:
        self.usable = False


def transport(
    monkeypatch: pytest.MonkeyPatch,
    scripts: dict[str, Any],
    settings: OutboundSettings | None = None,
    calls: list[dict[str, Any]] | None = None,
) -> tuple[SmtpTransport, list[str]]:
    connects: list[str] = []

    async def connect(host: str, port: int, **kw: Any) -> FakeSession:
        connects.append(host)
        if calls is not None:
            calls.append(kw)
        script = scripts[host]
        if (
            isinstance(script, SessionError)
            and script.partial is None
            and "connect" in script.detail
        ):
            raise script
        return FakeSession(script)

    monkeypatch.setattr(smtp_transport.SmtpClientSession, "connect", staticmethod(connect))
    settings = settings or OutboundSettings("me.test")
    return SmtpTransport(resolver=None, settings=settings), connects  # type: ignore[arg-type]


async def test_broken_transaction_keeps_settled_recipients(monkeypatch: pytest.MonkeyPatch) -> None:
    partial = TransactionResult(per_recipient=(UNKNOWN, LOST), mail_reply=OK)
    t, _ = transport(monkeypatch, {"192.0.2.1": SessionError("dropped", partial=partial)})
    outcomes = await t.deliver(job(["gone@d.test", "ok@d.test"]))
    assert isinstance(outcomes[0], PermFail) and outcomes[0].reply == UNKNOWN
    assert isinstance(outcomes[1], TempFail)


async def test_unsettled_failure_moves_to_the_next_host(monkeypatch: pytest.MonkeyPatch) -> None:
    t, connects = transport(
        monkeypatch,
        {
            "192.0.2.1": SessionError("connect refused"),
            "192.0.2.2": [OK],
        },
    )

    async def targets(route: Route) -> list[smtp_transport.Target]:
        return [
            smtp_transport.Target("mx1", "192.0.2.1", 25, None),
            smtp_transport.Target("mx2", "192.0.2.2", 25, None),
        ]

    monkeypatch.setattr(t, "_targets", targets)
    outcomes = await t.deliver(job(["ok@d.test"]))
    assert isinstance(outcomes[0], Delivered)
    assert connects == ["192.0.2.1", "192.0.2.2"]


async def test_reused_connection_closed_by_peer_is_retried_fresh(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, connects = transport(monkeypatch, {"192.0.2.1": [OK]})
    stale = FakeSession(SessionError("closed while idle"))
    key = ("192.0.2.1", 25, False, TlsRequirement("opportunistic", source="outbound.tls"))
    await t.pool.put(key, stale)  # type: ignore[arg-type]
    outcomes = await t.deliver(job(["ok@d.test"]))
    assert isinstance(outcomes[0], Delivered)
    assert connects == ["192.0.2.1"]  # one fresh connection after the stale one failed
    await t.close()


async def test_busy_destination_is_not_an_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]})
    monkeypatch.setattr(smtp_transport, "DESTINATION_WAIT", 0.05)
    slot = t.limits.destination("smtp:d.test")
    for _ in range(t.settings.per_destination):
        await slot.acquire()
    (outcome,) = await t.deliver(job(["ok@d.test"]))
    assert isinstance(outcome, TempFail) and not outcome.attempted
    slot.release()
    (outcome,) = await t.deliver(job(["ok@d.test"]))
    assert isinstance(outcome, Delivered)
    await asyncio.sleep(0)


# --- TLS policy in the transport ---------------------------------------------------------

DANE = TlsPolicyTable(rules=(PolicyRule("d.test", "dane"),))
TLSA = TlsaRecord(3, 1, 1, b"\x01" * 32)


class TlsaResolver:
    """Only what DaneHook asks: TLSA answers (or errors), recorded."""

    def __init__(self, result: Answer[TlsaRecord] | Exception) -> None:
        self.result = result
        self.asked: list[str] = []

    async def tlsa(self, name: str) -> Answer[TlsaRecord]:
        self.asked.append(name)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def secure_tlsa(*records: TlsaRecord) -> TlsaResolver:
    return TlsaResolver(Answer("_25._tcp.mx.d.test", records or (TLSA,), 60, "x", True))


def one_mx(
    monkeypatch: pytest.MonkeyPatch, t: SmtpTransport, *, secure: bool = True, hop: Any = None
) -> None:
    """mx.d.test at 192.0.2.1; ``secure``: its MX and address answers were DNSSEC-secure."""

    async def targets(route: Route) -> list[smtp_transport.Target]:
        host = hop.host if hop is not None else "mx.d.test"
        port = hop.port if hop is not None else 25
        return [smtp_transport.Target(host, "192.0.2.1", port, hop, secure, secure)]

    monkeypatch.setattr(t, "_targets", targets)


def sample(t: SmtpTransport, policy: str, result: str) -> float | None:
    assert t.metrics is not None
    return t.metrics.registry.get_sample_value(
        "postillon_outbound_tls_sessions_total", {"policy": policy, "result": result}
    )


async def test_dane_rule_without_trust_ad_defers_and_never_connects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No DaneHook (check-config refuses this, but the transport must not trust that)."""
    t, connects = transport(
        monkeypatch, {"192.0.2.1": [OK]}, OutboundSettings("me.test", tls_policy=DANE)
    )
    one_mx(monkeypatch, t)
    t.metrics = Metrics()
    (outcome,) = await t.deliver(job(["x@d.test"]))
    assert isinstance(outcome, TempFail) and outcome.reply.status == "4.7.5"
    assert sample(t, "dane", "dane-unavailable") == 1
    assert "DANE cannot run here" in " ".join(outcome.reply.lines)
    assert connects == []  # never connected: no silent downgrade


async def test_published_dane_wins_over_the_default_and_the_session_checks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []
    settings = OutboundSettings("me.test", tls_policy=TlsPolicyTable(default="verify"))
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]}, settings, calls)
    resolver = secure_tlsa()
    t.dane = DaneHook(resolver)  # type: ignore[arg-type]
    one_mx(monkeypatch, t)
    route = Route("smtp", "smtp:d.test", "d.test")
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=route))
    assert isinstance(outcome, Delivered)
    assert resolver.asked == ["_25._tcp.mx.d.test"]
    assert calls[0]["starttls"] == "required" and "policy=dane" in outcome.detail
    check = calls[0]["tls_check"]([b"not the published key"])  # the one gate, DANE branch
    assert (check.ok, check.result) == (False, "tlsa-mismatch")


async def test_insecure_mx_keeps_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]})
    resolver = secure_tlsa()
    t.dane = DaneHook(resolver)  # type: ignore[arg-type]
    one_mx(monkeypatch, t, secure=False)
    route = Route("smtp", "smtp:d.test", "d.test")
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=route))
    assert isinstance(outcome, Delivered) and "policy=opportunistic" in outcome.detail
    assert resolver.asked == []  # RFC 7672 §2.2: no TLSA lookup below an insecure MX


async def test_verify_rule_wins_over_dane(monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator's verify rule is final: DANE is not even looked up."""
    calls: list[dict[str, Any]] = []
    table = TlsPolicyTable(rules=(PolicyRule("d.test", "verify"),))
    t, _ = transport(
        monkeypatch, {"192.0.2.1": [OK]}, OutboundSettings("me.test", tls_policy=table), calls
    )
    resolver = secure_tlsa()
    t.dane = DaneHook(resolver)  # type: ignore[arg-type]
    one_mx(monkeypatch, t)
    route = Route("smtp", "smtp:d.test", "d.test")
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=route))
    assert isinstance(outcome, Delivered) and "policy=verify" in outcome.detail
    assert resolver.asked == []


async def test_dane_rule_skips_the_insecure_host_for_the_secure_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, connects = transport(
        monkeypatch,
        {"192.0.2.1": [OK], "192.0.2.2": [OK]},
        OutboundSettings("me.test", tls_policy=DANE),
    )
    t.dane = DaneHook(secure_tlsa())  # type: ignore[arg-type]
    t.metrics = Metrics()

    async def targets(route: Route) -> list[smtp_transport.Target]:
        return [
            smtp_transport.Target("mx1.d.test", "192.0.2.1", 25, None, True, False),
            smtp_transport.Target("mx2.d.test", "192.0.2.2", 25, None, True, True),
        ]

    monkeypatch.setattr(t, "_targets", targets)
    route = Route("smtp", "smtp:d.test", "d.test")
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=route))
    assert isinstance(outcome, Delivered) and "mx2.d.test" in outcome.detail
    assert connects == ["192.0.2.2"]
    assert sample(t, "dane", "dane-unavailable") == 1


async def test_bogus_tlsa_refuses_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    t, connects = transport(monkeypatch, {"192.0.2.1": [OK]})
    t.dane = DaneHook(TlsaResolver(DnsBogus("_25._tcp.mx.d.test", "TLSA", "SERVFAIL")))  # type: ignore[arg-type]
    t.metrics = Metrics()
    one_mx(monkeypatch, t)
    route = Route("smtp", "smtp:d.test", "d.test")
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=route))
    assert isinstance(outcome, TempFail) and outcome.reply.status == "4.7.5"
    assert connects == [] and sample(t, "dane", "dnssec-bogus") == 1


class AuthSession(FakeSession):
    def __init__(self, script: Any, tls_result: str) -> None:
        super().__init__(script)
        self.tls = "TLSv1.3 TLS_AES_128_GCM_SHA256"
        self.tls_result = tls_result
        self.auth: list[str] = []

    async def authenticate(self, user: str, password: str) -> None:
        self.auth.append(user)


@pytest.mark.parametrize(
    ("tls_result", "authenticated"), [("dane-ee", True), ("tlsa-unusable", False)]
)
async def test_dane_authenticated_smarthost_gets_auth(
    monkeypatch: pytest.MonkeyPatch, tls_result: str, authenticated: bool
) -> None:
    """A smarthost under a dane rule: a DANE match is proof enough for the password;
    secure TLSA with no usable record is not (for_credentials then asks for verify)."""
    sessions: list[AuthSession] = []
    calls: list[dict[str, Any]] = []

    async def connect(host: str, port: int, **kw: Any) -> AuthSession:
        calls.append(kw)
        sessions.append(AuthSession([OK], tls_result))
        return sessions[-1]

    monkeypatch.setattr(smtp_transport.SmtpClientSession, "connect", staticmethod(connect))
    table = TlsPolicyTable(rules=(PolicyRule("relay.d.test", "dane"),))
    t = SmtpTransport(resolver=None, settings=OutboundSettings("me.test", tls_policy=table))  # type: ignore[arg-type]
    tlsa = () if not authenticated else (TLSA,)
    resolver = secure_tlsa(*tlsa) if tlsa else secure_tlsa(TlsaRecord(1, 1, 1, b"\x01" * 32))
    t.dane = DaneHook(resolver)  # type: ignore[arg-type]
    hop = NextHop("relay.d.test", 587, username="u", password="p")
    one_mx(monkeypatch, t, hop=hop)
    route = Route("smtp", "smtp:relay", "d.test", hop=hop)
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=route))
    assert resolver.asked == ["_587._tcp.relay.d.test"]
    if authenticated:
        assert isinstance(outcome, Delivered), outcome
        assert sessions[0].auth == ["u"] and "policy=dane" in outcome.detail
    else:
        # Only unusable TLSA under a dane rule: the host is refused before connecting.
        assert isinstance(outcome, TempFail) and calls == []
        assert "no usable TLSA record" in " ".join(outcome.reply.lines)


async def test_connections_are_pooled_by_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection opened for an opportunistic domain never carries mail for a
    verify domain that shares the MX host."""
    table = TlsPolicyTable(rules=(PolicyRule("strict.test", "verify"),))
    t, connects = transport(
        monkeypatch, {"192.0.2.1": [OK]}, OutboundSettings("me.test", tls_policy=table)
    )

    async def targets(route: Route) -> list[smtp_transport.Target]:
        return [smtp_transport.Target("mx.shared.test", "192.0.2.1", 25, None)]

    monkeypatch.setattr(t, "_targets", targets)
    loose = job(["a@loose.test"])
    strict = job(["b@strict.test"])
    object.__setattr__(loose, "route", Route("smtp", "smtp:loose.test", "loose.test"))
    object.__setattr__(strict, "route", Route("smtp", "smtp:strict.test", "strict.test"))
    t.metrics = Metrics()
    await t.deliver(loose)
    await t.deliver(strict)
    await t.deliver(loose)
    assert connects == ["192.0.2.1", "192.0.2.1"]  # the third reused the first
    count = t.metrics.registry.get_sample_value
    labels = {"policy": "verify", "result": "plaintext"}  # FakeSession has no TLS
    assert count("postillon_outbound_tls_sessions_total", labels) == 1
    labels = {"policy": "opportunistic", "result": "plaintext"}
    assert count("postillon_outbound_tls_sessions_total", labels) == 1
    await t.close()


# --- MTA-STS as one input of tls_policy.decide (precedence 4) ------------------------------


class FakeSts:
    """What the transport asks of sts_policies.StsPolicies: the domain's policy."""

    def __init__(self, policy: StsPolicy | None) -> None:
        self.policy = policy
        self.asked: list[str] = []
        self.ca_file: str | None = None

    async def policy_for(self, domain: str) -> StsPolicy | None:
        self.asked.append(domain)
        return self.policy

    async def policy_or_failure(self, domain: str) -> tuple[StsPolicy | None, None]:
        return await self.policy_for(domain), None

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


STS_ELSEWHERE = StsPolicy("enforce", 86400, ("mx.elsewhere.test",))
STS_LISTED = StsPolicy("enforce", 86400, ("mx.d.test",))
MX_ROUTE = Route("smtp", "smtp:d.test", "d.test")  # the recipient domain's own MX hosts


async def test_dane_decides_for_a_domain_that_also_publishes_mta_sts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RFC 8461 §2: DANE (precedence 3) wins; the MTA-STS policy, which would refuse
    this MX, is not even fetched."""
    calls: list[dict[str, Any]] = []
    t, connects = transport(monkeypatch, {"192.0.2.1": [OK]}, calls=calls)
    t.dane = DaneHook(secure_tlsa())  # type: ignore[arg-type]
    sts = FakeSts(STS_ELSEWHERE)
    t.mta_sts = sts  # type: ignore[assignment]
    one_mx(monkeypatch, t)
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=MX_ROUTE))
    assert isinstance(outcome, Delivered) and "policy=dane" in outcome.detail
    assert "mta-sts" not in outcome.detail and sts.asked == [] and connects == ["192.0.2.1"]
    check = calls[0]["tls_check"]([b"not the published key"])
    assert (check.ok, check.result) == (False, "tlsa-mismatch")


async def test_verify_rule_wins_over_mta_sts_enforce(monkeypatch: pytest.MonkeyPatch) -> None:
    """Precedence 1: the operator's verify rule is final; MTA-STS is not looked up, so
    an MX the policy does not list is still used, under the rule's own names."""
    calls: list[dict[str, Any]] = []
    rule = PolicyRule("d.test", "verify", match=("partner-name.d.test",))
    table = TlsPolicyTable(rules=(rule,))
    settings = OutboundSettings("me.test", tls_policy=table)
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]}, settings, calls)
    sts = FakeSts(STS_ELSEWHERE)
    t.mta_sts = sts  # type: ignore[assignment]
    one_mx(monkeypatch, t)
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=MX_ROUTE))
    assert isinstance(outcome, Delivered) and "policy=verify" in outcome.detail
    assert "mta-sts" not in outcome.detail and sts.asked == []
    check = calls[0]["tls_check"]([])
    assert (check.ok, check.result) == (False, "no-certificate")  # not an MTA-STS label


async def test_mta_sts_enforce_is_a_verify_requirement_checked_by_the_one_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[dict[str, Any]] = []
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]}, calls=calls)
    t.mta_sts = FakeSts(STS_LISTED)  # type: ignore[assignment]
    one_mx(monkeypatch, t)
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=MX_ROUTE))
    assert isinstance(outcome, Delivered)
    assert "policy=verify mta-sts=enforce" in outcome.detail
    assert calls[0]["starttls"] == "required"  # RFC 8461 §5: never in clear
    check = calls[0]["tls_check"]([b"garbage"])
    assert not check.ok and check.result == "sts-webpki-invalid"
    assert check.reason.startswith("MTA-STS: certificate not valid for mx.d.test")


async def test_mta_sts_enforce_refuses_an_unlisted_mx_without_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, connects = transport(monkeypatch, {"192.0.2.1": [OK]})
    t.mta_sts = FakeSts(STS_ELSEWHERE)  # type: ignore[assignment]
    t.metrics = Metrics()
    one_mx(monkeypatch, t)
    (outcome,) = await t.deliver(replace(job(["x@d.test"]), route=MX_ROUTE))
    assert isinstance(outcome, TempFail) and outcome.reply.status == "4.7.5"
    assert "MTA-STS: mx.d.test does not match the policy of d.test" in str(outcome.reply)
    assert connects == [] and sample(t, "verify", "validation-failure") == 1


async def test_mta_sts_is_not_applied_to_a_smarthost(monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 8461 §3.4: a next hop the operator named is not the recipient's MX."""
    t, connects = transport(monkeypatch, {"192.0.2.1": [OK]})
    sts = FakeSts(STS_ELSEWHERE)
    t.mta_sts = sts  # type: ignore[assignment]
    (outcome,) = await t.deliver(job(["x@d.test"]))
    assert isinstance(outcome, Delivered) and sts.asked == [] and connects == ["192.0.2.1"]


# --- REQUIRETLS (RFC 8689) on top of the one decision ------------------------------------


def offering_requiretls(monkeypatch: pytest.MonkeyPatch) -> None:
    init = FakeSession.__init__

    def patched(self: FakeSession, script: Any) -> None:
        init(self, script)
        self.extensions = {"DSN": "", "REQUIRETLS": ""}

    monkeypatch.setattr(FakeSession, "__init__", patched)


def rtls_job(**params: bool) -> DeliveryJob:
    j = replace(job(["x@d.test"]), route=MX_ROUTE)
    return replace(j, message=replace(j.message, mail_params=MailParams(**params)))


async def test_requiretls_keeps_an_mta_sts_enforce_requirement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """§4.2.1: an MTA-STS enforce match authenticates the server (and, the policy
    listing it, the MX name): the requirement stands, REQUIRETLS added."""
    calls: list[dict[str, Any]] = []
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]}, calls=calls)
    offering_requiretls(monkeypatch)
    t.mta_sts = FakeSts(STS_LISTED)  # type: ignore[assignment]
    one_mx(monkeypatch, t)
    (outcome,) = await t.deliver(rtls_job(requiretls=True))
    assert isinstance(outcome, Delivered), outcome
    assert "policy=verify+requiretls mta-sts=enforce" in outcome.detail
    check = calls[0]["tls_check"]([b"garbage"])
    assert check.result == "sts-webpki-invalid"  # still the MTA-STS check


async def test_requiretls_keeps_a_dane_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]})
    offering_requiretls(monkeypatch)
    t.dane = DaneHook(secure_tlsa())  # type: ignore[arg-type]
    one_mx(monkeypatch, t)
    (outcome,) = await t.deliver(rtls_job(requiretls=True))
    assert isinstance(outcome, Delivered) and "policy=dane+requiretls" in outcome.detail


async def test_requiretls_to_a_server_without_it_bounces(monkeypatch: pytest.MonkeyPatch) -> None:
    t, _ = transport(monkeypatch, {"192.0.2.1": [OK]})  # FakeSession: no REQUIRETLS
    t.mta_sts = FakeSts(STS_LISTED)  # type: ignore[assignment]
    one_mx(monkeypatch, t)
    (outcome,) = await t.deliver(rtls_job(requiretls=True))
    assert isinstance(outcome, PermFail) and outcome.reply.status == "5.7.30"


async def test_tls_required_no_skips_dane_and_mta_sts(monkeypatch: pytest.MonkeyPatch) -> None:
    """§4.2.2: no DANE lookup, no policy fetch, not even the MTA-STS refusal."""
    t, connects = transport(monkeypatch, {"192.0.2.1": [OK]})
    resolver = secure_tlsa()
    t.dane = DaneHook(resolver)  # type: ignore[arg-type]
    sts = FakeSts(STS_ELSEWHERE)
    t.mta_sts = sts  # type: ignore[assignment]
    one_mx(monkeypatch, t)
    (outcome,) = await t.deliver(rtls_job(tls_required_no=True))
    assert isinstance(outcome, Delivered) and "policy=opportunistic" in outcome.detail
    assert resolver.asked == [] and sts.asked == [] and connects == ["192.0.2.1"]
