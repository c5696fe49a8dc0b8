"""The REQUIRETLS decision (RFC 8689), table-driven: what a message's requirement
becomes, when a server is refused after EHLO, and which failures bounce."""

from __future__ import annotations

import dataclasses

import pytest

from postillon.core.envelope import MailParams
from postillon.core.reply import Reply
from postillon.dns.resolver import TlsaRecord
from postillon.outbound import requiretls
from postillon.outbound.session_types import SessionError
from postillon.outbound.tls_policy import HostRefused, TlsRequirement, decide

RTLS = MailParams(requiretls=True)
NO = MailParams(tls_required_no=True)
PLAIN = MailParams()
PIN = TlsRequirement("fingerprint", fingerprints=(b"x" * 32,), source="p")
DANE = TlsRequirement("dane", match=("mx.test",), tlsa=(TlsaRecord(3, 1, 1, b"\x01" * 32),))
STS_ENFORCE = TlsRequirement("verify", match=("mx.test",), source="mta-sts d.test", sts="enforce")
STS_TESTING = TlsRequirement(
    "opportunistic", match=("mx.test",), source="outbound.tls, mta-sts d.test", sts="testing"
)


@pytest.mark.parametrize(
    ("base", "params", "expected"),
    [
        # Not authenticated: raised to verify for the MX host name (WebPKI).
        (TlsRequirement("opportunistic"), RTLS, ("verify", ("mx.test",), True)),
        (TlsRequirement("none"), RTLS, ("verify", ("mx.test",), True)),
        (TlsRequirement("encrypt"), RTLS, ("verify", ("mx.test",), True)),
        # Already authenticated: stands (names, CA file, pins kept), plus REQUIRETLS.
        (
            TlsRequirement("verify", match=("a.test",), ca_file="ca.pem"),
            RTLS,
            ("verify", ("a.test",), True),
        ),
        (PIN, RTLS, ("fingerprint", (), True)),
        # RFC 8689 §4.2.1: DANE-TA/DANE-EE and an MTA-STS enforce match authenticate.
        (DANE, RTLS, ("dane", ("mx.test",), True)),
        (STS_ENFORCE, RTLS, ("verify", ("mx.test",), True)),
        # Not authenticated: DANE with only unusable TLSA (RFC 7672 §2.2), MTA-STS testing.
        (TlsRequirement("dane", tlsa=()), RTLS, ("verify", ("mx.test",), True)),
        (STS_TESTING, RTLS, ("verify", ("mx.test",), True)),
        # TLS-Required: No: down to opportunistic, from anything stricter.
        (TlsRequirement("verify", match=("a.test",)), NO, ("opportunistic", (), False)),
        (TlsRequirement("dane"), NO, ("opportunistic", (), False)),
        (TlsRequirement("encrypt"), NO, ("opportunistic", (), False)),
        (TlsRequirement("none"), NO, ("none", (), False)),
        # Neither: untouched.
        (TlsRequirement("encrypt"), PLAIN, ("encrypt", (), False)),
    ],
)
def test_requirement(
    base: TlsRequirement, params: MailParams, expected: tuple[object, ...]
) -> None:
    got = requiretls.requirement(base, "mx.test", params)
    assert (got.mode, got.match, got.requiretls) == expected
    if base.authenticated and params.requiretls:
        assert (got.ca_file, got.fingerprints) == (base.ca_file, base.fingerprints)


def test_local_delivery_unaffected() -> None:
    base = TlsRequirement("opportunistic")
    assert requiretls.requirement(base, "lmtp.test", RTLS, lmtp=True) is base
    assert requiretls.mail_params(RTLS, base) == PLAIN  # no REQUIRETLS on MAIL


def test_session_must_offer_requiretls() -> None:
    req = requiretls.requirement(TlsRequirement("opportunistic"), "mx.test", RTLS)
    assert requiretls.session_error(req, {"REQUIRETLS": "", "DSN": ""}) is None
    err = requiretls.session_error(req, {"DSN": ""})
    assert err is not None and err.permanent and err.status == "5.7.30"
    assert requiretls.session_error(TlsRequirement("verify"), {}) is None  # not asked


@pytest.mark.parametrize(
    ("tls_result", "null_sender", "status", "permanent"),
    [
        ("not-verified", False, "5.7.10", True),
        ("starttls-not-supported", False, "5.7.10", True),
        ("starttls-refused", False, "5.7.10", True),
        ("no-certificate", False, "5.7.10", True),
        ("requiretls-not-supported", False, "5.7.30", True),
        # A bounce is kept and retried, never dropped for REQUIRETLS (§5).
        ("not-verified", True, "4.7.10", False),
        ("requiretls-not-supported", True, "4.7.30", False),
    ],
)
def test_policy_failures_bounce(
    tls_result: str, null_sender: bool, status: str, permanent: bool
) -> None:
    req = TlsRequirement("verify", match=("mx.test",), requiretls=True)
    exc = SessionError(
        "certificate for mx.test not verified", status="4.7.5", tls_result=tls_result
    )
    got = requiretls.failure(req, exc, null_sender=null_sender)
    assert (got.status, got.permanent, got.tls_result) == (status, permanent, tls_result)
    assert "REQUIRETLS" in got.detail and "mx.test" in got.detail


@pytest.mark.parametrize("tls_result", ["", "handshake-failed", "dane-unavailable", "config-error"])
def test_temporary_failures_stay_temporary(tls_result: str) -> None:
    req = TlsRequirement("verify", requiretls=True)
    exc = SessionError("connect failed", tls_result=tls_result)
    assert requiretls.failure(req, exc, null_sender=False) is exc


def test_not_a_requiretls_message_unchanged() -> None:
    exc = SessionError("x", status="4.7.5", tls_result="not-verified")
    assert requiretls.failure(TlsRequirement("verify"), exc, null_sender=False) is exc
    refused = SessionError(
        "no", reply=Reply.of(454, "4.7.0", "TLS not available"), tls_result="starttls-refused"
    )
    got = requiretls.failure(TlsRequirement("verify", requiretls=True), refused, null_sender=False)
    assert got.status == "5.7.10" and "454" in got.detail


def test_tls_required_no_is_final_so_no_published_policy_applies() -> None:
    """§4.2.2: the sender chose delivery; relaxed before tls_policy.decide, the
    requirement is final, so DANE and MTA-STS (even a refusal) are not applied."""
    relaxed = requiretls.relax(TlsRequirement("opportunistic", source="outbound.tls"), NO)
    assert relaxed.final and relaxed.mode == "opportunistic"
    refusal = HostRefused("MTA-STS: mx.test does not match the policy of d.test", "x", "verify")
    assert decide(relaxed, dane=DANE, sts=refusal, host="mx.test") == relaxed
    # REQUIRETLS on MAIL wins over the header (§4.1).
    both = MailParams(requiretls=True, tls_required_no=True)
    assert requiretls.relax(TlsRequirement("encrypt"), both) == TlsRequirement("encrypt")


@pytest.mark.parametrize(
    "tls_result", ["tlsa-mismatch", "certificate-host-mismatch", "sts-webpki-invalid"]
)
def test_dane_and_mta_sts_check_failures_bounce(tls_result: str) -> None:
    exc = SessionError("certificate of mx.test refused", status="4.7.5", tls_result=tls_result)
    got = requiretls.failure(dataclasses.replace(DANE, requiretls=True), exc, null_sender=False)
    assert (got.status, got.permanent) == ("5.7.10", True)
