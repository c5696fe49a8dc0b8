"""DANE through a real ``postillon serve``: the combined policy (DANE, the table, AUTH).

::

    smtplib ─▶ A (postillon serve; [dns] nameservers = unbound, trust_ad = true, MX port 25)
                 ├─MX fallback.danes.test ─▶ mx-bad  127.0.0.11:25  TLSA 3 1 1 of another key
                 │                        └▶ mx-good 127.0.0.12:25  TLSA 3 1 1 of its key
                 ├─MX must.danes.test     ─▶ mx-good                [[tls_policy]] dane
                 ├─MX verified.danes.test ─▶ mx-bad                 [[tls_policy]] verify
                 └─MX unsigned.test       ─▶ mx.unsigned.test 127.0.0.14:25  [[tls_policy]] dane,
                                              unsigned zone (TLSA matching, but insecure)
    smtplib ─▶ B (smarthost = smtp://user:pw@relay.danes.test:P, [[tls_policy]] dane for it)
                 └──STARTTLS──▶ relay 127.0.0.13:P  TLSA 3 1 1 of its key at _P._tcp.relay

    unbound 127.0.0.1:<p> (validating) ──stub──▶ NSD (danes.test signed, unsigned.test not)

Each receiver is a RecordingSmtp, so what it heard is what postillon said. Needs root
(port 25) inside scripts/run-tests.sh's loopback-only network namespace.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.dnssec import Zone
from support.ports import free_port
from support.recording_smtp import RecordingSmtp

if TYPE_CHECKING:
    from conftest import MakeServer
    from support.dnssec_fixtures import MakeDnssecLab

pytest_plugins = ["support.dnssec_fixtures"]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="receivers bind 127.0.0.x:25 (root)"),
]

IPS = {
    "mx-bad": "127.0.0.11",
    "mx-good": "127.0.0.12",
    "relay": "127.0.0.13",
    "mx.unsigned.test": "127.0.0.14",
}


def spki_sha256(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def context(leaf: trustme.LeafCert) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    return ctx


@dataclass
class World:
    nameserver: str
    ca_file: Path  # the CA that issued every receiver's certificate
    recs: dict[str, RecordingSmtp]
    relay_port: int


@pytest.fixture
def world(make_dnssec_lab: MakeDnssecLab, tmp_path: Path) -> Iterator[World]:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    names = {
        "mx-bad": "mx-bad.danes.test",
        "mx-good": "mx-good.danes.test",
        "relay": "relay.danes.test",
        "mx.unsigned.test": "mx.unsigned.test",
    }
    leaves = {key: ca.issue_cert(name) for key, name in names.items()}
    stranger = ca.issue_cert("mx-bad.danes.test")  # the key mx-bad's TLSA names instead
    relay_port = free_port(IPS["relay"])
    recs = {
        key: RecordingSmtp(
            tls=context(leaves[key]),
            host=IPS[key],
            port=relay_port if key == "relay" else 25,
            name=names[key],
        ).start()
        for key in names
    }
    signed = f"""
fallback MX 10 mx-bad
fallback MX 20 mx-good
must MX 10 mx-good
verified MX 10 mx-bad
mx-bad A {IPS["mx-bad"]}
mx-good A {IPS["mx-good"]}
relay A {IPS["relay"]}
_25._tcp.mx-bad TLSA 3 1 1 {spki_sha256(stranger)}
_25._tcp.mx-good TLSA 3 1 1 {spki_sha256(leaves["mx-good"])}
_{relay_port}._tcp.relay TLSA 3 1 1 {spki_sha256(leaves["relay"])}
"""
    unsigned = f"""@ MX 10 mx
mx A {IPS["mx.unsigned.test"]}
_25._tcp.mx TLSA 3 1 1 {spki_sha256(leaves["mx.unsigned.test"])}
"""
    lab = make_dnssec_lab(
        [Zone("danes.test", signed), Zone("unsigned.test", unsigned, signed=False)]
    )
    yield World(lab.nameserver, tmp_path / "ca.pem", recs, relay_port)
    for rec in recs.values():
        rec.stop()


def dns(world: World) -> dict[str, object]:
    return {"nameservers": [world.nameserver], "timeout": 2.0, "attempts": 1, "trust_ad": True}


def rcpts(rec: RecordingSmtp, domain: str) -> list[str]:
    return [c for c in rec.commands if c.upper().startswith("RCPT") and f"@{domain}>" in c]


def test_dane_and_the_table_through_a_server(make_server: MakeServer, world: World) -> None:
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns=dns(world),
        outbound={"port": 25, "connect_timeout": 2.0},
        tls_policy=[
            {"domain": "must.danes.test", "policy": "dane"},
            {"domain": "unsigned.test", "policy": "dane"},
            {"domain": "verified.danes.test", "policy": "verify", "ca_file": str(world.ca_file)},
        ],
    ).start()
    domains = ("fallback.danes.test", "must.danes.test", "verified.danes.test", "unsigned.test")
    lines = {
        d: a.wait_outcome(a.send_message(f"user@{d}"), ("delivered", "deferred")) for d in domains
    }
    bad, good = world.recs["mx-bad"], world.recs["mx-good"]

    # Published DANE, no rule: the mismatching MX hears STARTTLS and then nothing; the
    # matching one gets the message.
    line = lines["fallback.danes.test"]
    assert ": delivered:" in line and "mx-good.danes.test[127.0.0.12]:25" in line, line
    assert "tls=TLSv1.3/dane-ee policy=dane" in line, line
    assert "STARTTLS" in bad.commands and not rcpts(bad, "fallback.danes.test")
    assert rcpts(good, "fallback.danes.test")
    assert "no TLSA record of mx-bad.danes.test matched the certificate" in a.maillog()

    # A dane rule with secure, matching TLSA delivers.
    line = lines["must.danes.test"]
    assert ": delivered:" in line and "tls=TLSv1.3/dane-ee policy=dane" in line, line

    # A verify rule is final: mx-bad's CA-issued certificate verifies, its TLSA is not asked.
    line = lines["verified.danes.test"]
    assert ": delivered:" in line and "mx-bad.danes.test" in line, line
    assert "tls=TLSv1.3/verified policy=verify" in line, line
    assert rcpts(bad, "verified.danes.test")

    # A dane rule for an unsigned zone: deferred with the reason, nothing sent.
    line = lines["unsigned.test"]
    assert ": deferred:" in line and "4.7.5" in line, line
    assert "policy=dane" in line and "not DNSSEC-secure" in line, line
    assert world.recs["mx.unsigned.test"].commands == []


def test_dane_authenticated_smarthost_gets_auth(make_server: MakeServer, world: World) -> None:
    """No smarthost_ca_file, no pin, a certificate from a CA nobody trusts: DANE is the proof."""
    b = make_server(
        relay={
            "trusted_networks": ["127.0.0.0/8"],
            "smarthost": f"smtp://user:s3cret-pw@relay.danes.test:{world.relay_port}",
        },
        dns=dns(world),
        tls_policy=[{"domain": "relay.danes.test", "policy": "dane"}],
    ).start()
    line = b.wait_outcome(b.send_message("friend@elsewhere.test"), ("delivered", "deferred"))
    relay = world.recs["relay"]
    assert ": delivered:" in line and "tls=TLSv1.3/dane-ee policy=dane" in line, line
    assert relay.saw("AUTH") and relay.saw("MAIL")
