"""Policy resolution, table-driven: (destination, MX host, table) → TlsRequirement;
the precedence of table rules, DANE and MTA-STS (decide); and the config that
builds the table (keys, old names, DANE's precondition)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from postillon.build import tls_policy_table
from postillon.config.loader import ConfigError, parse_config
from postillon.config.model import Config
from postillon.dns.resolver import TlsaRecord
from postillon.outbound.tls_policy import (
    HostRefused,
    NoPublishedPolicy,
    PolicyRule,
    TlsPolicyTable,
    TlsRequirement,
    consults_dane,
    consults_sts,
    decide,
    resolve,
)

PIN = b"\x01" * 32
TABLE = TlsPolicyTable(
    default="opportunistic",
    rules=(
        PolicyRule("partner.example", "verify"),
        PolicyRule(".partner.example", "encrypt"),
        PolicyRule(".example", "none"),
        PolicyRule("pinned.test", "fingerprint", fingerprints=(PIN,)),
        PolicyRule(
            "named.test", "verify", match=("a.named.test", "b.named.test"), ca_file="ca.pem"
        ),
        PolicyRule("dane.test", "dane"),
    ),
)

CASES = [
    # (destination, mx host, table, expected requirement)
    (
        "partner.example",
        "mx.partner.example",
        TABLE,
        TlsRequirement(
            "verify",
            match=("mx.partner.example",),
            source="tls_policy partner.example",
            final=True,
        ),
    ),
    (
        "PARTNER.example.",
        "mx1.partner.example",
        TABLE,
        TlsRequirement(
            "verify",
            match=("mx1.partner.example",),
            source="tls_policy partner.example",
            final=True,
        ),
    ),
    (
        "eu.partner.example",
        "mx.eu.partner.example",
        TABLE,
        TlsRequirement("encrypt", source="tls_policy .partner.example"),
    ),
    (
        "a.b.partner.example",
        "mx",
        TABLE,
        TlsRequirement("encrypt", source="tls_policy .partner.example"),
    ),
    (
        "other.example",
        "mx.other.example",
        TABLE,
        TlsRequirement("none", source="tls_policy .example", final=True),
    ),
    ("example", "mx.example", TABLE, TlsRequirement("opportunistic", source="outbound.tls")),
    (
        "pinned.test",
        "mx.pinned.test",
        TABLE,
        TlsRequirement(
            "fingerprint", fingerprints=(PIN,), source="tls_policy pinned.test", final=True
        ),
    ),
    (
        "named.test",
        "mx.named.test",
        TABLE,
        TlsRequirement(
            "verify",
            match=("a.named.test", "b.named.test"),
            ca_file="ca.pem",
            source="tls_policy named.test",
            final=True,
        ),
    ),
    ("dane.test", "mx.dane.test", TABLE, TlsRequirement("dane", source="tls_policy dane.test")),
    (
        "unlisted.test",
        "mx.unlisted.test",
        TABLE,
        TlsRequirement("opportunistic", source="outbound.tls"),
    ),
    (
        "unlisted.test",
        "mx.unlisted.test",
        TlsPolicyTable(default="verify"),
        TlsRequirement("verify", match=("mx.unlisted.test",), source="outbound.tls"),
    ),
    (
        "unlisted.test",
        "mx",
        TlsPolicyTable(default="encrypt"),
        TlsRequirement("encrypt", source="outbound.tls"),
    ),
]


@pytest.mark.parametrize(("destination", "mx_host", "table", "expected"), CASES)
def test_resolve(
    destination: str, mx_host: str, table: TlsPolicyTable, expected: TlsRequirement
) -> None:
    assert resolve(destination, mx_host, table) == expected


@pytest.mark.parametrize(
    ("mode", "starttls", "authenticated"),
    [
        ("none", "none", False),
        ("opportunistic", "opportunistic", False),
        ("encrypt", "required", False),
        ("verify", "required", True),
        ("fingerprint", "required", True),
        ("dane", "required", False),  # a dane rule not looked up yet has proved nothing
    ],
)
def test_mode_properties(mode: Any, starttls: str, authenticated: bool) -> None:
    requirement = TlsRequirement(mode)
    assert requirement.starttls == starttls and requirement.authenticated is authenticated
    hash(requirement)  # pooled by it


def config(**data: Any) -> Config:
    return parse_config(data, "test.toml")


def test_table_from_config_reads_old_names_and_pins() -> None:
    pin = "sha256:" + "01" * 32
    cfg = config(
        outbound={"tls": "required"},
        tls_policy=[
            {"domain": "Partner.Example.", "policy": "verify", "match": ["MX.partner.example"]},
            {"domain": ".old.test", "policy": "required"},
            {"domain": "pin.test", "policy": "fingerprint", "fingerprints": [pin]},
        ],
    )
    table = tls_policy_table(cfg)
    assert table.default == "encrypt"
    assert table.rules[0] == PolicyRule("partner.example", "verify", match=("mx.partner.example",))
    assert table.rules[1].mode == "encrypt"
    assert table.rules[2].fingerprints == (PIN,)
    notes = cfg.deprecations()
    assert notes == [
        'outbound.tls = "required" is deprecated: write tls = "encrypt" '
        "(same meaning: TLS or no delivery, any certificate)",
        'tls_policy[1] (.old.test): policy = "required" is deprecated: write policy = "encrypt"',
    ]
    assert config().deprecations() == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"tls_policy": [{"domain": "d.test", "policy": "dane"}]},
            "tls_policy[0] (d.test): policy dane needs [dns] trust_ad = true",
        ),
        (
            {"outbound": {"tls": "dane"}, "dns": {"trust_ad": True}},
            'outbound.tls: "dane" is not a default',
        ),
        ({"tls_policy": [{"domain": "a b", "policy": "none"}]}, "tls_policy[0].domain"),
        ({"tls_policy": [{"domain": "", "policy": "none"}]}, "is not a domain"),
        (
            {
                "tls_policy": [
                    {
                        "domain": "d.test",
                        "policy": "verify",
                        "fingerprints": ["sha256:" + "00" * 32],
                    }
                ]
            },
            'fingerprints are only used with policy = "fingerprint"',
        ),
        (
            {"tls_policy": [{"domain": "d.test", "policy": "none", "ca_file": "x.pem"}]},
            'match and ca_file are only used with policy = "verify"',
        ),
        (
            {"tls_policy": [{"domain": "d.test", "policy": "verify", "tls": "x"}]},
            "tls_policy[0].tls: unknown key",
        ),
    ],
)
def test_config_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises((ConfigError, ValidationError)) as info:
        config(**data)
    assert message in str(info.value)


# --- the precedence: tls_policy.decide (the module note's numbered list) ------------------

REC = TlsaRecord(3, 1, 1, b"\x01" * 32)
DANE_REQ = TlsRequirement("dane", match=("mx.d.test",), tlsa=(REC,), source="dane _25._tcp.mx")
DANE_UNUSABLE = TlsRequirement("dane", match=("mx.d.test",), tlsa=(), source="dane _25._tcp.mx")
BOGUS = HostRefused("DANE: TLSA lookup of _25._tcp.mx failed: SERVFAIL", "dnssec-bogus")
ABSENT = NoPublishedPolicy("no TLSA records at _25._tcp.mx")
STS = TlsRequirement("verify", match=("mx.d.test",), source="mta-sts d.test", sts="enforce")
STS_TESTING = TlsRequirement(
    "opportunistic", match=("mx.d.test",), source="mta-sts d.test", sts="testing"
)
STS_REFUSED = HostRefused(
    "MTA-STS: mx.d.test does not match the policy of d.test", "validation-failure", "verify"
)
DEFAULT = TlsRequirement("opportunistic", source="outbound.tls")
VERIFY_RULE = TlsRequirement("verify", match=("mx.d.test",), source="tls_policy d.test", final=True)
NONE_RULE = TlsRequirement("none", source="tls_policy d.test", final=True)
ENCRYPT_RULE = TlsRequirement("encrypt", source="tls_policy d.test")
DANE_RULE = TlsRequirement("dane", source="tls_policy d.test")

DECIDE = [
    # (id, from the table, DANE lookup, MTA-STS, expected: a requirement or a refusal label)
    ("default, no DANE", DEFAULT, None, None, DEFAULT),
    ("default, DANE absent", DEFAULT, ABSENT, None, DEFAULT),
    ("3 DANE wins over the default", DEFAULT, DANE_REQ, None, DANE_REQ),
    ("3 DANE wins over MTA-STS (RFC 8461 §2)", DEFAULT, DANE_REQ, STS, DANE_REQ),
    ("3 unusable TLSA still wins (mandatory TLS)", DEFAULT, DANE_UNUSABLE, STS, DANE_UNUSABLE),
    ("3 bogus refuses the host", DEFAULT, BOGUS, STS, "dnssec-bogus"),
    ("4 MTA-STS when DANE is absent", DEFAULT, ABSENT, STS, STS),
    ("4 MTA-STS when DANE is off", DEFAULT, None, STS, STS),
    ("4 MTA-STS enforce refuses an unlisted host", DEFAULT, ABSENT, STS_REFUSED, "sts-refused"),
    ("3 DANE wins over an MTA-STS refusal", DEFAULT, DANE_REQ, STS_REFUSED, DANE_REQ),
    ("4 MTA-STS testing keeps the default", DEFAULT, ABSENT, STS_TESTING, "testing"),
    ("4 MTA-STS enforce raises an encrypt rule", ENCRYPT_RULE, None, STS, STS),
    ("4 MTA-STS testing keeps an encrypt rule", ENCRYPT_RULE, None, STS_TESTING, "testing"),
    ("1 verify rule is final over MTA-STS enforce", VERIFY_RULE, None, STS, VERIFY_RULE),
    ("1 none rule is final over an MTA-STS refusal", NONE_RULE, None, STS_REFUSED, NONE_RULE),
    ("5 encrypt rule is a minimum DANE raises", ENCRYPT_RULE, DANE_REQ, None, DANE_REQ),
    ("5 encrypt rule stands without DANE", ENCRYPT_RULE, ABSENT, None, ENCRYPT_RULE),
    ("1 verify rule is final", VERIFY_RULE, DANE_REQ, STS, VERIFY_RULE),
    ("1 none rule is final", NONE_RULE, BOGUS, None, NONE_RULE),
    ("2 dane rule with secure records", DANE_RULE, DANE_REQ, None, "dane+rule"),
    ("2 dane rule, DANE off", DANE_RULE, None, None, "dane-unavailable"),
    ("2 dane rule, insecure", DANE_RULE, ABSENT, STS, "dane-unavailable"),
    ("2 dane rule, only unusable", DANE_RULE, DANE_UNUSABLE, None, "tlsa-unusable"),
    ("2 dane rule, bogus", DANE_RULE, BOGUS, None, "dnssec-bogus"),
]


@pytest.mark.parametrize(
    ("static", "dane", "sts", "expected"), [c[1:] for c in DECIDE], ids=[c[0] for c in DECIDE]
)
def test_decide(static: TlsRequirement, dane: Any, sts: Any, expected: Any) -> None:
    got = decide(static, dane=dane, sts=sts, host="mx.d.test")
    if expected == "dane+rule":
        assert isinstance(got, TlsRequirement) and got.tlsa == (REC,) and got.authenticated
        assert got.source == "tls_policy d.test, dane _25._tcp.mx"
    elif expected == "sts-refused":
        assert got == STS_REFUSED
    elif expected == "testing":
        # RFC 8461 §5: what 5 requires stays; the check also reports what enforce would.
        assert isinstance(got, TlsRequirement) and got.sts == "testing"
        assert got.mode == static.mode and not got.authenticated
        assert got.match == ("mx.d.test",) and got.source == f"{static.source}, mta-sts d.test"
    elif isinstance(expected, str):
        assert isinstance(got, HostRefused) and got.result == expected and got.mode == "dane"
        assert "\n" not in got.reason
    else:
        assert got == expected


@pytest.mark.parametrize(
    ("static", "dane", "recipient_mx", "expected"),
    [
        (DEFAULT, None, True, True),
        (DEFAULT, ABSENT, True, True),  # DANE insecure or absent: MTA-STS may apply
        (DEFAULT, DANE_REQ, True, False),  # DANE decided: no policy fetch (RFC 8461 §2)
        (DEFAULT, BOGUS, True, False),
        (DEFAULT, None, False, False),  # a smarthost or route (RFC 8461 §3.4)
        (ENCRYPT_RULE, None, True, True),
        (VERIFY_RULE, None, True, False),
        (NONE_RULE, None, True, False),
        (DANE_RULE, ABSENT, True, False),
    ],
)
def test_consults_sts(
    static: TlsRequirement, dane: Any, recipient_mx: bool, expected: bool
) -> None:
    assert consults_sts(static, dane, recipient_mx=recipient_mx) is expected


@pytest.mark.parametrize(
    ("static", "mx_delivery", "expected"),
    [
        (DEFAULT, True, True),
        (DEFAULT, False, False),  # a smarthost or smtp:[host]: only with a dane rule
        (ENCRYPT_RULE, True, True),
        (VERIFY_RULE, True, False),
        (NONE_RULE, True, False),
        (DANE_RULE, False, True),
    ],
)
def test_consults_dane(static: TlsRequirement, mx_delivery: bool, expected: bool) -> None:
    assert consults_dane(static, mx_delivery=mx_delivery) is expected
