"""The REQUIRETLS decision (RFC 8689), table-driven: what a message's requirement
becomes, when a server is refused after EHLO, and which failures bounce."""

from __future__ import annotations

import pytest

from postillon.core.envelope import MailParams
from postillon.core.reply import Reply
from postillon.outbound import requiretls
from postillon.outbound.session_types import SessionError
from postillon.outbound.tls_policy import TlsRequirement

RTLS = MailParams(requiretls=True)
NO = MailParams(tls_required_no=True)
PLAIN = MailParams()
PIN = TlsRequirement("fingerprint", fingerprints=(b"x" * 32,), source="p")


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
        (TlsRequirement("dane"), RTLS, ("dane", (), True)),
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
