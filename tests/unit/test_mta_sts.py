"""MTA-STS (RFC 8461): the pure decision per MX host, the certificate check after STARTTLS
(tls.check_requirement, the one gate, with RFC 8460 result names),
the TXT id parser, and the policy cache (StsPolicies) with a scripted resolver and fetch,
the in-memory store and a clock that tests advance (no sleeps, no network)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from postillon.core.sts import CachedPolicy, StsPolicy, record_id
from postillon.dns.resolver import Answer, DnsNotFound, DnsTempError, TxtRecord
from postillon.dns.sts_fetch import WEBPKI_INVALID, PolicyFetchError
from postillon.outbound import mta_sts
from postillon.outbound.sts_policies import RETRY_AFTER, StsPolicies
from postillon.outbound.tls import AUTHENTICATED_RESULTS, check_requirement, load_anchors
from postillon.outbound.tls_policy import HostRefused, TlsRequirement, decide
from postillon.queue.memory_store import MemoryStore
from support.https_server import make_tls_files

ENFORCE = StsPolicy("enforce", 86400, ("mx1.example.net", "*.mx.example.net"))
TESTING = StsPolicy("testing", 86400, ("mx1.example.net",))
POLICY = b"version: STSv1\nmode: enforce\nmx: mx1.example.net\nmax_age: 86400\n"
T0 = 1_800_000_000.0
OPPORTUNISTIC = TlsRequirement("opportunistic", source="outbound.tls")


# -- the decision ------------------------------------------------------------------------


def enforce(host: str) -> TlsRequirement:
    return TlsRequirement("verify", match=(host,), source="mta-sts example.net", sts="enforce")


@pytest.mark.parametrize(
    ("policy", "host", "expected"),
    [
        (None, "mx1.example.net", None),
        (StsPolicy("none", 60, ()), "mx1.example.net", None),
        (ENFORCE, "mx1.example.net", enforce("mx1.example.net")),
        (ENFORCE, "MX1.example.net.", enforce("MX1.example.net.")),
        (ENFORCE, "a.mx.example.net", enforce("a.mx.example.net")),
        # §4.1: a wildcard covers exactly one label.
        (ENFORCE, "a.b.mx.example.net", HostRefused),
        (ENFORCE, "mx.example.net", HostRefused),
        (ENFORCE, "mx2.example.net", HostRefused),
        (
            TESTING,
            "mx1.example.net",
            TlsRequirement("opportunistic", match=("mx1.example.net",), sts="testing"),
        ),
    ],
)
def test_decision_per_mx_host(policy: StsPolicy | None, host: str, expected: Any) -> None:
    """An enforce match is the verify requirement the one post-handshake check judges;
    a host an enforce policy does not list is refused before connecting."""
    got = mta_sts.decide("example.net", policy, host)
    if expected is HostRefused:
        assert isinstance(got, HostRefused)
        assert got.reason == f"MTA-STS: {host} does not match the policy of example.net"
        assert got.result == "validation-failure"
    else:
        assert got == expected
    if isinstance(got, TlsRequirement):
        assert got.source == "mta-sts example.net"


def test_testing_mode_goes_on_to_a_host_it_does_not_list() -> None:
    got = mta_sts.decide("example.net", TESTING, "mx9.example.net")
    assert isinstance(got, TlsRequirement) and got.sts == "testing"
    assert got.match == ()  # nothing to verify it for: the check reports the mismatch
    decided = decide(OPPORTUNISTIC, dane=None, sts=got, host="mx9.example.net")
    assert isinstance(decided, TlsRequirement) and decided.starttls == "opportunistic"


def test_requirement_equality_ignores_the_domain() -> None:
    """Pooled connections: one that proved itself for a host serves every domain."""
    a = mta_sts.decide("a.example", ENFORCE, "mx1.example.net")
    b = mta_sts.decide(
        "b.example", StsPolicy("enforce", 60, ("mx1.example.net",)), "mx1.example.net"
    )
    assert a == b and hash(a) == hash(b)


# -- the check after STARTTLS: tls.check_requirement, the one gate ----------------------------


def _chain(tmp_path: Path, names: list[str]) -> tuple[list[bytes], Path]:
    ca, cert, _ = make_tls_files(tmp_path, names)
    leaf = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
    return [leaf], ca


def _now() -> datetime.datetime:
    # Read per test, not at import: the certificates are made by the test, valid from
    # five minutes before then, and collection may run long before.
    return datetime.datetime.now(datetime.UTC)


def _check(req: TlsRequirement, chain: list[bytes], ca: Path | None, **kw: Any) -> Any:
    anchors = load_anchors(str(ca)) if ca is not None else ()
    return check_requirement(
        req, chain, host="mx1.example.net", anchors=anchors, now=kw.get("now", _now())
    )


def test_certificate_for_the_mx_name_passes(tmp_path: Path) -> None:
    chain, ca = _chain(tmp_path, ["mx1.example.net"])
    got = _check(enforce("mx1.example.net"), chain, ca)
    assert got.ok and got.verified and got.result == "verified"
    assert got.result in AUTHENTICATED_RESULTS  # REQUIRETLS and AUTH count it (RFC 8689 §4.2.1)


def test_wrong_name_untrusted_expired_and_missing_fail_with_rfc8460_results(
    tmp_path: Path,
) -> None:
    req = enforce("mx1.example.net")
    chain, ca = _chain(tmp_path / "a", ["mx.other.example"])
    got = _check(req, chain, ca)
    assert not got.ok and got.result == "certificate-host-mismatch"
    assert got.reason.startswith("MTA-STS: certificate not valid for mx1.example.net: ")
    good, _ = _chain(tmp_path / "b", ["mx1.example.net"])
    got = _check(req, good, ca)  # another CA
    assert not got.ok and got.result == "sts-webpki-invalid"
    got = _check(req, good, tmp_path / "b" / ca.name, now=_now().replace(year=2099))
    assert not got.ok and got.result == "certificate-expired"
    got = _check(req, [], None)
    assert not got.ok and got.result == "sts-webpki-invalid"


def test_testing_mode_reports_and_passes(tmp_path: Path) -> None:
    """RFC 8461 §5: the same checks as enforce, a failure reported, the session goes on."""
    chain, ca = _chain(tmp_path, ["mx.other.example"])
    testing = decide(
        OPPORTUNISTIC,
        dane=None,
        sts=mta_sts.decide("example.net", TESTING, "mx1.example.net", ca_file=str(ca)),
        host="mx1.example.net",
    )
    assert isinstance(testing, TlsRequirement) and testing.sts == "testing"
    got = _check(testing, chain, ca)
    assert got.ok and not got.verified and got.result == "certificate-host-mismatch"
    assert got.reason.startswith("MTA-STS: certificate not valid for mx1.example.net")
    unlisted = decide(
        OPPORTUNISTIC,
        dane=None,
        sts=mta_sts.decide("example.net", TESTING, "mx9.example.net"),
        host="mx9.example.net",
    )
    got = _check(unlisted, chain, ca)  # type: ignore[arg-type]
    assert got.ok and got.result == "validation-failure" and "does not match" in got.reason
    good, ca2 = _chain(tmp_path / "g", ["mx1.example.net"])
    got = _check(testing, good, ca2)
    assert got.ok and got.verified and got.result == "verified" and not got.reason


# -- the TXT record (§3.1) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["v=STSv1; id=20260101T0"], "20260101T0"),
        (["v=STSv1;id=abc;"], "abc"),
        (["v=spf1 -all", "v=STSv1; id=abc"], "abc"),
        (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # two: no policy
        (["v=STSv1; id=abc; id=def"], None),
        (["v=STSv1; id=has-dash"], None),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv1"], None),
        (["id=abc; v=STSv1"], None),
        ([], None),
    ],
)
def test_txt_record_id(texts: list[str], expected: str | None) -> None:
    assert record_id(texts) == expected


# -- the policy cache --------------------------------------------------------------------


class Dns:
    """``_mta-sts`` TXT answers by domain: a str record, None (NXDOMAIN) or "tempfail"."""

    def __init__(self) -> None:
        self.txt_answers: dict[str, str | None] = {}

    async def txt(self, name: str) -> Answer[TxtRecord]:
        domain = name.removeprefix("_mta-sts.")
        text = self.txt_answers.get(domain)
        if text == "tempfail":
            raise DnsTempError(name, "TXT", "timeout")
        if text is None:
            raise DnsNotFound(name, "TXT", "NXDOMAIN", nxdomain=True)
        return Answer(name, (TxtRecord((text.encode(),)),), 300, name)


class Web:
    def __init__(self) -> None:
        self.bodies: dict[str, bytes | Exception] = {}
        self.fetches: list[str] = []

    async def fetch(self, domain: str) -> str:
        self.fetches.append(domain)
        body = self.bodies.get(domain, PolicyFetchError("cannot connect (refused)"))
        if isinstance(body, Exception):
            raise body
        return body.decode()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts() -> tuple[Dns, Web, Clock, MemoryStore]:
    dns, web, clock = Dns(), Web(), Clock()
    dns.txt_answers["example.net"] = "v=STSv1; id=one"
    web.bodies["example.net"] = POLICY
    return dns, web, clock, MemoryStore()


def _policies(parts: tuple[Dns, Web, Clock, MemoryStore]) -> StsPolicies:
    dns, web, clock, store = parts
    return StsPolicies(dns, store, fetch=web.fetch, clock=clock)  # type: ignore[arg-type]


async def test_fetched_once_stored_and_reused(parts: Any) -> None:
    _dns, web, _clock, store = parts
    sts = _policies(parts)
    policy = await sts.policy_for("Example.NET")
    assert policy == StsPolicy("enforce", 86400, ("mx1.example.net",))
    assert await sts.policy_for("example.net") == policy
    assert web.fetches == ["example.net"]
    stored = await store.sts_policy("example.net")
    assert stored is not None and stored.policy_id == "one" and stored.fetched_at == T0


async def test_a_new_txt_id_fetches_again(parts: Any) -> None:
    dns, web, clock, store = parts
    sts = _policies(parts)
    await sts.policy_for("example.net")
    web.bodies["example.net"] = POLICY.replace(b"enforce", b"testing")
    dns.txt_answers["example.net"] = "v=STSv1; id=two"
    clock.now += 10
    policy = await sts.policy_for("example.net")
    assert policy is not None and policy.mode == "testing"
    assert web.fetches == ["example.net", "example.net"]
    assert (await store.sts_policy("example.net")).policy_id == "two"  # type: ignore[union-attr]


async def test_unreachable_policy_host_keeps_the_cached_policy(parts: Any) -> None:
    """RFC 8461 §5.1: a failed fetch with an unexpired cached policy keeps it."""
    dns, web, clock, store = parts
    await _policies(parts).policy_for("example.net")
    dns.txt_answers["example.net"] = "v=STSv1; id=two"
    web.bodies["example.net"] = PolicyFetchError("cannot connect (refused)")
    clock.now += 100
    sts = _policies(parts)  # a restart: memory empty, the store has it
    policy = await sts.policy_for("example.net")
    assert policy is not None and policy.mode == "enforce"
    stored = await store.sts_policy("example.net")
    assert stored.policy_id == "one" and "refused" in stored.last_error
    # Not fetched again on every message: once per RETRY_AFTER.
    await sts.policy_for("example.net")
    assert len(web.fetches) == 2
    clock.now += RETRY_AFTER
    await sts.policy_for("example.net")
    assert len(web.fetches) == 3


async def test_no_cache_and_a_failed_fetch_means_no_policy(parts: Any) -> None:
    _dns, web, _clock, store = parts
    web.bodies["example.net"] = PolicyFetchError("HTTP 301 redirect to https://x/")
    assert await _policies(parts).policy_for("example.net") is None
    assert await store.sts_policy("example.net") is None


async def test_malformed_policy_is_no_policy(parts: Any) -> None:
    _dns, web, _clock, _store = parts
    web.bodies["example.net"] = b"<html>hello</html>"
    assert await _policies(parts).policy_for("example.net") is None


async def test_txt_record_gone_or_dns_failing_keeps_the_cached_policy(parts: Any) -> None:
    dns, web, clock, _store = parts
    sts = _policies(parts)
    await sts.policy_for("example.net")
    dns.txt_answers["example.net"] = None
    assert await sts.policy_for("example.net") is not None
    dns.txt_answers["example.net"] = "tempfail"
    assert await sts.policy_for("example.net") is not None
    clock.now += 86400  # expired: nothing applies any more
    assert await sts.policy_for("example.net") is None
    assert web.fetches == ["example.net"]


async def test_no_txt_record_no_policy_no_fetch(parts: Any) -> None:
    _dns, web, _clock, _store = parts
    assert await _policies(parts).policy_for("other.example") is None
    assert web.fetches == []


async def test_expired_policy_is_fetched_again(parts: Any) -> None:
    _dns, web, clock, _store = parts
    sts = _policies(parts)
    await sts.policy_for("example.net")
    clock.now += 86400
    assert await sts.policy_for("example.net") is not None
    assert len(web.fetches) == 2


async def test_background_refresh_before_expiry_and_on_id_change(parts: Any) -> None:
    dns, _web, clock, store = parts
    sts = _policies(parts)
    await sts.policy_for("example.net")
    assert await sts.refresh_due() == 0  # fresh, same id: nothing to do
    clock.now += 86400 / 2 + 1  # less than half the lifetime left
    assert await sts.refresh_due() == 1
    assert (await store.sts_policy("example.net")).fetched_at == clock.now  # type: ignore[union-attr]
    assert await sts.refresh_due() == 0
    dns.txt_answers["example.net"] = "v=STSv1; id=two"
    assert await sts.refresh_due() == 1
    assert (await store.sts_policy("example.net")).policy_id == "two"  # type: ignore[union-attr]


async def test_store_failure_does_not_stop_delivery(parts: Any) -> None:
    _dns, _web, _clock, store = parts
    await store.close()  # every store call now raises StoreError
    policy = await _policies(parts).policy_for("example.net")
    assert policy is not None and policy.mode == "enforce"  # fetched, kept in memory


async def test_cached_entry_from_another_node_is_used(parts: Any) -> None:
    _dns, web, _clock, store = parts
    await store.save_sts_policy(CachedPolicy("example.net", "one", TESTING, T0 - 10))
    policy = await _policies(parts).policy_for("example.net")
    assert policy == TESTING and web.fetches == []


async def test_failed_fetch_says_which_rfc8460_result_type(parts: Any) -> None:
    """RFC 8460 §4.3.2.2: a domain that publishes MTA-STS but whose policy cannot be
    had is reported as sts-policy-fetch-error, sts-webpki-invalid or sts-policy-invalid."""
    dns, web, clock, _store = parts
    sts = _policies(parts)
    web.bodies["example.net"] = PolicyFetchError("cannot connect (refused)")
    policy, failure = await sts.policy_or_failure("example.net")
    assert policy is None and failure == ("sts-policy-fetch-error", "cannot connect (refused)")
    # Within RETRY_AFTER nothing is fetched, and the failure still stands.
    assert await sts.policy_or_failure("example.net") == (None, failure)
    clock.now += RETRY_AFTER
    web.bodies["example.net"] = PolicyFetchError("the certificate is not valid", WEBPKI_INVALID)
    assert (await sts.policy_or_failure("example.net"))[1] == (
        "sts-webpki-invalid",
        "the certificate is not valid",
    )
    clock.now += RETRY_AFTER
    web.bodies["example.net"] = b"version: STSv1\r\nmode: enforce\r\n"  # no max_age, no mx
    _, failure = await sts.policy_or_failure("example.net")
    assert failure is not None and failure[0] == "sts-policy-invalid", failure
    # The TXT record went away: the domain publishes nothing, nothing failed.
    dns.txt_answers["example.net"] = None
    assert await sts.policy_or_failure("example.net") == (None, None)
    # A fetch that works clears it.
    dns.txt_answers["example.net"] = "v=STSv1; id=three"
    clock.now += RETRY_AFTER
    web.bodies["example.net"] = POLICY
    policy, failure = await sts.policy_or_failure("example.net")
    assert policy is not None and failure is None


async def test_cached_policy_after_a_failed_refetch_is_no_failure(parts: Any) -> None:
    dns, web, clock, _store = parts
    sts = _policies(parts)
    await sts.policy_for("example.net")
    dns.txt_answers["example.net"] = "v=STSv1; id=two"
    web.bodies["example.net"] = PolicyFetchError("cannot connect (refused)")
    clock.now += 100
    policy, failure = await sts.policy_or_failure("example.net")
    assert policy is not None and failure is None  # the cached policy applies (§5.1)
