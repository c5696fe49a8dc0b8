"""[[tls_policy]] end to end: per-destination TLS rules against receiving
servers with good, wrong-name and self-signed certificates and none at all.

    smtplib ──▶ A ──DNS MX (test server)──▶ good.mx.test  127.0.0.2  cert from the test CA
                                         ├─▶ wrong.mx.test 127.0.0.3  test CA, for another name
                                         ├─▶ self.mx.test  127.0.0.4  self-signed
                                         └─▶ plain.mx.test 127.0.0.5  no STARTTLS
    (each a RecordingSmtp: what it heard is what A said)

A host that fails the destination's policy hears nothing after STARTTLS (or
EHLO); A tries the next MX, and defers with 4.7.5 and the reason when none
passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from support.ports import free_port
from support.recording_smtp import RecordingSmtp
from support.server import ServerProcess
from support.tls_certs import ca_issued, pin, self_signed

pytestmark = pytest.mark.integration

HOSTS = {"good": "127.0.0.2", "wrong": "127.0.0.3", "self": "127.0.0.4", "plain": "127.0.0.5"}
MX = {
    # domain: (policy rule, MX hosts in preference order)
    "verify.test": ({"policy": "verify"}, ["wrong", "good"]),
    "verifyfail.test": ({"policy": "verify"}, ["self", "plain"]),
    "pin.test": ({"policy": "fingerprint"}, ["good", "self"]),
    "encrypt.test": ({"policy": "required"}, ["plain", "self"]),  # the old name of encrypt
    "none.test": ({"policy": "none"}, ["good"]),
    "sub.matched.test": ({"policy": "verify", "match": ["good.mx.test"]}, ["good"]),
    "default.test": (None, ["plain"]),  # no rule: [outbound] tls = "opportunistic"
}


@pytest.fixture
def world(make_server, make_dns_server, tmp_path: Path) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    self_tls, self_cert = self_signed(tmp_path, "self.mx.test")
    contexts = {
        "good": ca_issued(ca, "good.mx.test"),
        "wrong": ca_issued(ca, "elsewhere.test"),
        "self": self_tls,
        "plain": None,
    }
    port = free_port("127.0.0.2")
    recs = {
        name: RecordingSmtp(tls=contexts[name], host=HOSTS[name], port=port, name=f"{name}.mx.test")
        for name in HOSTS
    }
    for rec in recs.values():
        rec.start()
    zones: dict[str, Any] = {"mx.test": {f"{n}.mx.test": {"A": ip} for n, ip in HOSTS.items()}}
    rules = []
    for domain, (rule, hosts) in MX.items():
        zones[domain] = {"@": {"MX": [f"{10 * (i + 1)} {h}.mx.test" for i, h in enumerate(hosts)]}}
        if rule is None:
            continue
        rule = {"domain": domain if domain != "sub.matched.test" else ".matched.test", **rule}
        if rule["policy"] == "verify":
            rule["ca_file"] = str(tmp_path / "ca.pem")
        if rule["policy"] == "fingerprint":
            rule["fingerprints"] = [pin(self_cert.read_bytes())]
        rules.append(rule)
    dns = make_dns_server(zones)
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={"port": port, "connect_timeout": 2.0, "tls": "opportunistic"},
        tls_policy=rules,
    ).start()
    yield {"a": a, "recs": recs}
    for rec in recs.values():
        rec.stop()


def rcpts(rec: RecordingSmtp, domain: str) -> list[str]:
    return [c for c in rec.commands if c.upper().startswith("RCPT") and f"@{domain}>" in c]


def test_tls_policy_table(world: dict[str, Any]) -> None:
    a: ServerProcess = world["a"]
    recs: dict[str, RecordingSmtp] = world["recs"]
    lines = {
        domain: a.wait_outcome(a.send_message(f"user@{domain}"), ("delivered", "deferred"))
        for domain in MX
    }

    # verify: the wrong-name MX is skipped after STARTTLS, the good one takes it.
    line = lines["verify.test"]
    assert ": delivered:" in line and "good.mx.test[127.0.0.2]" in line, line
    assert "tls=TLSv1.3/verified policy=verify" in line, line
    assert not rcpts(recs["wrong"], "verify.test") and "STARTTLS" in recs["wrong"].commands

    # verify with no passing MX: self-signed refused, no STARTTLS refused; deferred, reason.
    line = lines["verifyfail.test"]
    assert ": deferred:" in line and "4.7.5" in line, line
    assert "does not offer STARTTLS" in line, line  # the last MX's reason is the reply
    assert not rcpts(recs["self"], "verifyfail.test")
    assert not rcpts(recs["plain"], "verifyfail.test")
    assert "certificate for self.mx.test not verified" in a.maillog()

    # fingerprint: the CA-issued MX does not match the pin; the pinned self-signed one does.
    line = lines["pin.test"]
    assert ": delivered:" in line and "self.mx.test" in line, line
    assert "tls=TLSv1.3/pinned policy=fingerprint" in line, line
    assert not rcpts(recs["good"], "pin.test")
    assert "matches no configured fingerprint" in a.maillog()

    # encrypt ("required"): no STARTTLS → next MX; any certificate will do.
    line = lines["encrypt.test"]
    assert ": delivered:" in line and "tls=TLSv1.3/unverified policy=encrypt" in line, line
    assert not rcpts(recs["plain"], "encrypt.test")

    # none: no STARTTLS even where offered.
    line = lines["none.test"]
    assert ": delivered:" in line and "tls=none policy=none" in line, line

    # .matched.test covers sub.matched.test; match names the certificate's name.
    line = lines["sub.matched.test"]
    assert ": delivered:" in line and "verified policy=verify" in line, line

    # no rule: the [outbound] default, opportunistic, delivers in clear.
    line = lines["default.test"]
    assert ": delivered:" in line and "tls=none policy=opportunistic" in line, line
    assert rcpts(recs["plain"], "default.test")

    # The deprecated name is reported with its key and the new value.
    stderr = a.stderr() + a.maillog()
    assert 'tls_policy[3] (encrypt.test): policy = "required" is deprecated' in stderr
    assert 'write policy = "encrypt"' in stderr


def test_check_config_on_tls_policies(make_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """check-config names the key: dane without trust_ad, a bad pin, a missing
    CA file, keys that do not fit the policy; and warns about "required"."""
    cases = [
        (
            {"tls_policy": [{"domain": "d.test", "policy": "dane"}]},
            "tls_policy[0] (d.test): policy dane needs [dns] trust_ad = true",
        ),
        ({"outbound": {"tls": "dane"}}, 'outbound.tls: "dane" is not a default'),
        (
            {
                "tls_policy": [
                    {"domain": "d.test", "policy": "fingerprint", "fingerprints": ["md5:x"]}
                ]
            },
            "tls_policy[0].fingerprints: fingerprint 'md5:x' must start with",
        ),
        (
            {"tls_policy": [{"domain": "d.test", "policy": "fingerprint"}]},
            'policy = "fingerprint" needs fingerprints',
        ),
        (
            {"tls_policy": [{"domain": "d.test", "policy": "encrypt", "match": ["x.test"]}]},
            'match and ca_file are only used with policy = "verify"',
        ),
        (
            {"tls_policy": [{"domain": "d.test", "policy": "verify", "ca_file": "missing.pem"}]},
            "tls_policy[0].ca_file: cannot use",
        ),
        ({"relay": {"smarthost_ca_file": "missing.pem"}}, "relay.smarthost_ca_file: cannot use"),
        (
            {"relay": {"smarthost_fingerprints": ["sha256:AAAA"]}},
            "relay.smarthost_fingerprints: fingerprint",
        ),
        ({"tls_policy": [{"domain": "d.test", "policy": "strict"}]}, "tls_policy[0].policy"),
        (
            {
                "tls_policy": [
                    {"domain": "d.test", "policy": "none"},
                    {"domain": "D.test.", "policy": "verify"},
                ]
            },
            "has two rules",
        ),
    ]
    for overrides, expected in cases:
        server = make_server(**overrides)
        server.write_config()
        result = server.cli("check-config", check=False)
        assert result.returncode != 0, (overrides, result.stdout)
        assert expected in result.stderr, (overrides, result.stderr)
    server = make_server(outbound={"tls": "required"})
    server.write_config()
    result = server.cli("check-config", check=False)
    assert result.returncode == 0, result.stderr
    assert 'warning: outbound.tls = "required" is deprecated: write tls = "encrypt"' in (
        result.stderr
    )
