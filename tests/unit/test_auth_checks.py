"""The pure parts of inbound authentication: Authentication-Results rendering and
forged-field removal (RFC 8601), DMARC records, alignment and evaluation (RFC 7489),
and the policy decisions."""

from __future__ import annotations

import pytest

from postillon.checks.auth_policy import decide
from postillon.checks.authresults import (
    MethodResult,
    header_values,
    render,
    strip_own_results,
)
from postillon.checks.dmarc_check import (
    AuthIdentity,
    DmarcRecord,
    PolicyLookup,
    aligned,
    evaluate,
    from_domain_of,
    organizational_domain,
    parse_record,
)
from postillon.config.model import AuthenticationConfig

# -- Authentication-Results -------------------------------------------------------------------


def test_render_one_field_one_clause_per_line() -> None:
    out = render(
        "mx.example.org",
        [
            MethodResult("spf", "pass", "ok", (("smtp.mailfrom", "bob@example.net"),)),
            MethodResult("dkim", "fail", "", (("header.d", "example.net"), ("header.s", ""))),
            MethodResult("dmarc", "pass", "p=reject", (("header.from", "example.net"),)),
        ],
    )
    assert out == (
        b"Authentication-Results: mx.example.org;\r\n"
        b"\tspf=pass (ok) smtp.mailfrom=bob@example.net;\r\n"
        b"\tdkim=fail header.d=example.net;\r\n"
        b"\tdmarc=pass (p=reject) header.from=example.net\r\n"
    )


def test_render_no_results_says_none() -> None:
    assert render("mx", []) == b"Authentication-Results: mx; none\r\n"


def test_render_quotes_and_neutralises_hostile_values() -> None:
    out = render(
        "mx",
        [
            MethodResult(
                "spf",
                "fail",
                "evil)\r\nX-Injected: yes (",
                (("smtp.mailfrom", 'a b"@x\r\nBcc: y'),),
            )
        ],
    )
    assert out.count(b"\r\n") == 2  # the fold and the end: nothing injected
    assert b"\\)" in out and b'"a b\\"@x  Bcc: y"' in out


@pytest.mark.parametrize(
    "forged",
    [
        b"Authentication-Results: mx.example.org; dkim=pass\r\n",
        b"authentication-results:MX.Example.Org.;\r\n\tspf=pass\r\n",
        b"Authentication-Results: (sneaky) mx.example.org 1; dmarc=pass\r\n",
        b"Authentication-Results:\r\n mx.example.org; dmarc=pass\r\n",
    ],
)
def test_forged_fields_for_our_host_are_removed(forged: bytes) -> None:
    header = b"From: a@b.example\r\n" + forged + b"Subject: x\r\n"
    cleaned, removed = strip_own_results(header, "mx.example.org")
    assert (cleaned, removed) == (b"From: a@b.example\r\nSubject: x\r\n", 1)


def test_fields_of_other_hosts_stay() -> None:
    header = (
        b"Authentication-Results: mx.example.org.evil; spf=pass\r\n"
        b"Authentication-Results: other.example; dkim=pass\r\n"
        b"X-Authentication-Results: mx.example.org; spf=pass\r\n"
    )
    assert strip_own_results(header, "mx.example.org") == (header, 0)


def test_header_values_unfolds() -> None:
    header = b"From: A\r\n <a@x.example>\r\nfrom: b@y.example\r\nTo: c\r\n"
    assert header_values(header, "From") == ["A <a@x.example>", "b@y.example"]


# -- DMARC ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("mail.example.co.uk", "example.co.uk"),
        ("a.b.example.org", "example.org"),
        ("example.org", "example.org"),
        ("x.y.example.test", "example.test"),  # unknown TLD: the default rule "*"
    ],
)
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


@pytest.mark.parametrize(
    ("identifier", "author", "mode", "expected"),
    [
        ("example.org", "example.org", "s", True),
        ("bounce.example.org", "example.org", "s", False),
        ("bounce.example.org", "example.org", "r", True),
        ("example.org", "news.example.org", "r", True),
        ("example.co.uk", "other.co.uk", "r", False),  # public suffix is not an org
        ("example.net", "example.org", "r", False),
        ("", "example.org", "r", False),
    ],
)
def test_alignment(identifier: str, author: str, mode: str, expected: bool) -> None:
    assert aligned(identifier, author, mode) is expected


def test_parse_record() -> None:
    rec = parse_record("v=DMARC1; p=reject; sp=none; adkim=s; aspf=r; pct=50")
    assert rec == DmarcRecord("reject", "none", adkim="s", aspf="r", pct=50)
    assert parse_record("v=DMARC1;p=quarantine") == DmarcRecord("quarantine", "quarantine")
    assert parse_record("p=reject; v=DMARC1") is None  # v= must come first (RFC 7489 6.4)
    assert parse_record("v=DMARC1; p=bogus") is None
    bogus = parse_record("v=DMARC1; p=bogus; rua=mailto:x@y")
    assert bogus == DmarcRecord("none", "none", rua=("mailto:x@y",))  # rua= kept (RFC 7489 §7.2)


def test_from_domain_of() -> None:
    assert from_domain_of(["Bob <Bob@Example.ORG>"]) == ("example.org", "")
    assert from_domain_of([])[0] == ""
    assert from_domain_of(["a@x.example", "b@y.example"])[0] == ""
    assert from_domain_of(["a@x.example, b@y.example"])[0] == ""
    assert from_domain_of(["undisclosed"])[0] == ""


REJECT = PolicyLookup(DmarcRecord("reject", "reject"), "reject", "example.org")


def test_dmarc_pass_by_aligned_dkim_even_when_spf_fails() -> None:
    clause, policy = evaluate(
        "example.org",
        REJECT,
        AuthIdentity("bounce.other.net", "pass"),
        [AuthIdentity("example.org", "pass")],
    )
    assert (clause.result, policy) == ("pass", "none")


def test_dmarc_fail_when_only_unaligned_identifiers_pass() -> None:
    clause, policy = evaluate(
        "example.org",
        REJECT,
        AuthIdentity("other.net", "pass"),
        [AuthIdentity("other.net", "pass"), AuthIdentity("example.org", "fail")],
    )
    assert (clause.result, policy) == ("fail", "reject")
    assert clause.prop("header.from") == "example.org"


def test_dmarc_strict_spf_alignment() -> None:
    strict = PolicyLookup(DmarcRecord("reject", "reject", aspf="s"), "reject", "example.org")
    clause, _ = evaluate("example.org", strict, AuthIdentity("mail.example.org", "pass"), [])
    assert clause.result == "fail"


def test_dmarc_temperror_when_an_aligned_identifier_could_not_be_checked() -> None:
    clause, policy = evaluate("example.org", REJECT, AuthIdentity("example.org", "temperror"), [])
    assert (clause.result, policy) == ("temperror", "none")
    lookup_failed = PolicyLookup(None, "none", temperror="timeout")
    assert evaluate("example.org", lookup_failed, None, [])[0].result == "temperror"


@pytest.mark.parametrize(
    ("record_policy", "pct", "sampled", "applied"),
    [
        ("reject", 100, 0.99, "reject"),
        ("reject", 50, 0.49, "reject"),  # picked: the record's policy
        ("reject", 50, 0.50, "quarantine"),  # not picked: the next weaker one
        ("quarantine", 50, 0.50, "none"),
        ("reject", 0, 0.0, "quarantine"),
    ],
)
def test_dmarc_pct_samples_failing_mail(
    record_policy: str, pct: int, sampled: float, applied: str
) -> None:
    """RFC 7489 6.6.4."""
    record = DmarcRecord(record_policy, record_policy, pct=pct)  # type: ignore[arg-type]
    lookup = PolicyLookup(record, record_policy, "example.org")  # type: ignore[arg-type]
    clause, policy = evaluate(
        "example.org", lookup, AuthIdentity("other.net", "pass"), [], sample=lambda: sampled
    )
    assert (clause.result, policy) == ("fail", applied)
    assert f"dis={applied}" in clause.comment


def test_dmarc_none_without_record() -> None:
    clause, policy = evaluate("example.org", PolicyLookup(None, "none"), None, [])
    assert (clause.result, policy) == ("none", "none")


# -- policy ----------------------------------------------------------------------------------

DEFAULTS = AuthenticationConfig()


def _decide(config: AuthenticationConfig = DEFAULTS, **kw: object) -> tuple[str, str]:
    args: dict[str, object] = {
        "dmarc_result": "none",
        "dmarc_policy": "none",
        "from_domain": "example.org",
        "spf_result": "none",
        "spf_domain": "example.org",
    }
    args.update(kw)
    d = decide(config, **args)  # type: ignore[arg-type]
    reply = f"{d.reply.code} {d.reply.status}" if d.reply is not None else ""
    return d.action, reply


def test_default_policy_decisions() -> None:
    assert _decide(dmarc_result="fail", dmarc_policy="reject") == ("reject", "550 5.7.1")
    assert _decide(dmarc_result="fail", dmarc_policy="quarantine") == ("quarantine", "")
    assert _decide(dmarc_result="fail", dmarc_policy="none") == ("accept", "")
    assert _decide(dmarc_result="temperror") == ("defer", "451 4.7.1")
    assert _decide(spf_result="fail") == ("quarantine", "")  # never reject on SPF alone
    assert _decide(spf_result="temperror") == ("accept", "")
    assert _decide(spf_result="softfail") == ("accept", "")
    assert _decide(dmarc_result="pass", spf_result="fail") == ("accept", "")


def test_configured_policy_decisions() -> None:
    strict = AuthenticationConfig(spf_fail="reject", dmarc_quarantine="reject")
    assert _decide(strict, spf_result="fail") == ("reject", "550 5.7.23")
    assert _decide(strict, spf_result="temperror") == ("defer", "451 4.7.24")
    assert _decide(strict, dmarc_result="fail", dmarc_policy="quarantine") == (
        "reject",
        "550 5.7.1",
    )
    lax = AuthenticationConfig(dmarc_reject="quarantine", temperror="accept")
    assert _decide(lax, dmarc_result="fail", dmarc_policy="reject") == ("quarantine", "")
    assert _decide(lax, dmarc_result="temperror") == ("accept", "")


def test_allowlisted_mail_is_never_refused() -> None:
    assert _decide(dmarc_result="fail", dmarc_policy="reject", allowlisted=True) == (
        "accept",
        "",
    )


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="not a network"):
        AuthenticationConfig(allow_networks=("10.0.0.0/33",))
    with pytest.raises(ValueError, match="header field name"):
        AuthenticationConfig(quarantine_header="X Bad:")
    assert AuthenticationConfig(allow_domains=("Example.ORG.",)).allow_domains == ("example.org",)


def test_spf_cache_lifetime_is_bounded_by_ttl_and_a_minute() -> None:
    from postillon.checks.spf_check import SpfCache

    now = [100.0]
    cache = SpfCache(max_entries=2, max_age=60.0, clock=lambda: now[0])
    key = ("192.0.2.1", "bob@example.org", "mx.example.org")
    cache.put(key, ("pass", "ok"), ttl=10)
    assert cache.get(key) == ("pass", "ok")
    now[0] += 10
    assert cache.get(key) is None  # the smallest TTL consulted ended
    cache.put(key, ("fail", "no"), ttl=3600)
    now[0] += 59
    assert cache.get(key) == ("fail", "no")
    now[0] += 1
    assert cache.get(key) is None  # never beyond max_age
    for i in range(3):
        cache.put((str(i), "", ""), ("pass", ""), ttl=30)
    assert cache.get(("0", "", "")) is None  # bounded: the oldest went first
    assert cache.get(("2", "", "")) == ("pass", "")
