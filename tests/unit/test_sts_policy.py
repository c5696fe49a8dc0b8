"""MTA-STS policy files (RFC 8461 §3.2) and MX patterns (§4.1)."""

from __future__ import annotations

import pytest

from postillon.core.sts import PolicyError, StsPolicy, mx_matches, parse_policy
from postillon.dnsrecords.records import mta_sts_policy


def test_the_policy_dns_records_suggests_parses() -> None:
    policy = parse_policy(mta_sts_policy("mx.example.org"))
    assert policy == StsPolicy("testing", 604800, ("mx.example.org",))
    assert policy.covers("MX.example.org.") and not policy.covers("mx2.example.org")


def test_crlf_several_mx_unknown_keys_and_blank_lines() -> None:
    text = (
        "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
        "mx:*.example.net\r\n\r\nfuture_key: ignored\r\nmax_age:86400\r\n"
    )
    policy = parse_policy(text)
    assert policy.mode == "enforce" and policy.max_age == 86400
    assert policy.mx == ("mail.example.com", "*.example.net")
    assert policy.covers("mx1.example.net") and policy.covers("mail.example.com")


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "a.b.example.com", False),  # one label only (§4.1)
        ("*.example.com", "example.com", False),
        ("mail.example.com", "MAIL.EXAMPLE.COM.", True),
        ("mail.example.com", "mail.example.com.evil", False),
    ],
)
def test_mx_patterns(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("mode: enforce\nmx: a.example\nmax_age: 1\n", "version: STSv1"),
        ("version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n", "version: STSv1"),
        ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", "enforce, testing or none"),
        ("version: STSv1\nmode: enforce\nmx: a.example\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 60\n", "at least one 'mx:'"),
        ("<html>policy</html>\n", "not a 'key: value' line"),
    ],
)
def test_broken_policies_name_the_rule(text: str, rule: str) -> None:
    with pytest.raises(PolicyError, match=rule):
        parse_policy(text)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mx == ()
