"""The pure TLS decisions: a handshake's chain against a TlsRequirement
(``outbound.tls.check_requirement``), the credentials rule
(``tls_policy.for_credentials``) and the pin parser (``core.pins``).

Certificates come from trustme (a CA and leaves) and from the server's own
self-signed maker; no sockets: the chain is the DER a server would send.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from postillon.core.pins import parse_fingerprint
from postillon.dns.resolver import TlsaRecord
from postillon.inbound.tls import ensure_self_signed
from postillon.outbound.tls import check_requirement, load_anchors, spki_sha256
from postillon.outbound.tls_policy import TlsRequirement, for_credentials

NOW = datetime.datetime.now(datetime.UTC)
HOST = "mx.partner.example"


def der_chain(leaf: trustme.LeafCert) -> list[bytes]:
    return [
        x509.load_pem_x509_certificate(blob.bytes()).public_bytes(Encoding.DER)
        for blob in leaf.cert_chain_pems
    ]


def anchors(ca: trustme.CA) -> list[Any]:
    return [x509.load_pem_x509_certificate(ca.cert_pem.bytes())]


def pin_of(der: bytes) -> bytes:
    spki = (
        x509.load_der_x509_certificate(der)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(spki).digest()


CA = trustme.CA()
CA_DER = x509.load_pem_x509_certificate(CA.cert_pem.bytes()).public_bytes(Encoding.DER)
OTHER_CA = trustme.CA()
GOOD = der_chain(CA.issue_cert(HOST))
WILDCARD = der_chain(CA.issue_cert("*.partner.example"))
WRONG_NAME = der_chain(CA.issue_cert("mx.elsewhere.example"))
EXPIRED = der_chain(
    CA.issue_cert(
        HOST,
        not_after=NOW - datetime.timedelta(days=1),
        not_before=NOW - datetime.timedelta(days=30),
    )
)
IP_CERT = der_chain(CA.issue_cert("192.0.2.25"))


def self_signed(tmp: Path) -> list[bytes]:
    cert, _ = ensure_self_signed(tmp, HOST)
    return [x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)]


# (requirement, chain, host, anchors, expected (ok, verified, result), reason contains)
CASES: list[
    tuple[str, TlsRequirement, list[bytes], str, list[Any], tuple[bool, bool, str], str]
] = [
    (
        "verify good",
        TlsRequirement("verify"),
        GOOD,
        HOST,
        anchors(CA),
        (True, True, "verified"),
        "",
    ),
    (
        "verify with match list",
        TlsRequirement("verify", match=("mx9.partner.example", HOST)),
        GOOD,
        "192.0.2.1",
        anchors(CA),
        (True, True, "verified"),
        "",
    ),
    (
        "wildcard covers one label",
        TlsRequirement("verify"),
        WILDCARD,
        HOST,
        anchors(CA),
        (True, True, "verified"),
        "",
    ),
    (
        "wrong name",
        TlsRequirement("verify"),
        WRONG_NAME,
        HOST,
        anchors(CA),
        (False, False, "not-verified"),
        f"certificate for {HOST} not verified: ",
    ),
    (
        "match list is the rule, not the host",
        TlsRequirement("verify", match=("mx.elsewhere.example",)),
        GOOD,
        HOST,
        anchors(CA),
        (False, False, "not-verified"),
        "certificate for mx.elsewhere.example not verified",
    ),
    (
        "untrusted CA",
        TlsRequirement("verify"),
        GOOD,
        HOST,
        anchors(OTHER_CA),
        (False, False, "not-verified"),
        "not verified",
    ),
    (
        "expired",
        TlsRequirement("verify"),
        EXPIRED,
        HOST,
        anchors(CA),
        (False, False, "not-verified"),
        "not verified",
    ),
    (
        "no anchors at all",
        TlsRequirement("verify"),
        GOOD,
        HOST,
        [],
        (False, False, "not-verified"),
        "no trusted CA certificates",
    ),
    (
        "IP literal host",
        TlsRequirement("verify"),
        IP_CERT,
        "192.0.2.25",
        anchors(CA),
        (True, True, "verified"),
        "",
    ),
    (
        "no certificate",
        TlsRequirement("verify"),
        [],
        HOST,
        anchors(CA),
        (False, False, "no-certificate"),
        "sent no certificate",
    ),
    (
        "encrypt accepts anything, records",
        TlsRequirement("encrypt"),
        WRONG_NAME,
        HOST,
        anchors(CA),
        (True, False, "unverified"),
        "",
    ),
    (
        "opportunistic records a good one",
        TlsRequirement("opportunistic"),
        GOOD,
        HOST,
        anchors(CA),
        (True, True, "verified"),
        "",
    ),
    (
        "pin matches the leaf",
        TlsRequirement("fingerprint", fingerprints=(b"\0" * 32, pin_of(GOOD[0]))),
        GOOD,
        "anything",
        [],
        (True, False, "pinned"),
        "",
    ),
    (
        "pin of the CA is not the leaf",
        TlsRequirement("fingerprint", fingerprints=(pin_of(CA_DER),)),
        [*GOOD, CA_DER],
        HOST,
        anchors(CA),
        (False, False, "fingerprint-mismatch"),
        "matches no configured fingerprint (its key is sha256:"
        + base64.b64encode(pin_of(GOOD[0])).decode(),
    ),
    (
        "dane rule never looked up fails closed",
        TlsRequirement("dane"),
        GOOD,
        HOST,
        anchors(CA),
        (False, False, "dane-unavailable"),
        "TLSA records not looked up",
    ),
    # DANE (RFC 7672 §3): TLSA records decide; web PKI plays no part.
    (
        "dane-ee matches the leaf key, expired and misnamed as it is",
        TlsRequirement(
            "dane", match=("other.example",), tlsa=(TlsaRecord(3, 1, 1, pin_of(EXPIRED[0])),)
        ),
        EXPIRED,
        "other.example",
        [],
        (True, True, "dane-ee"),
        "DANE-EE 3 1 1 matched",
    ),
    (
        "dane-ta: the CA the server sends signs a leaf for the MX name",
        TlsRequirement("dane", match=(HOST,), tlsa=(TlsaRecord(2, 1, 1, pin_of(CA_DER)),)),
        [*GOOD, CA_DER],
        HOST,
        [],
        (True, True, "dane-ta"),
        "DANE-TA 2 1 1 matched",
    ),
    (
        "dane-ta: the leaf must name the MX host",
        TlsRequirement("dane", match=(HOST,), tlsa=(TlsaRecord(2, 1, 1, pin_of(CA_DER)),)),
        [*WRONG_NAME, CA_DER],
        HOST,
        [],
        (False, False, "tlsa-mismatch"),
        "no TLSA record of mx.partner.example matched",
    ),
    (
        "dane: a key nobody published",
        TlsRequirement("dane", match=(HOST,), tlsa=(TlsaRecord(3, 1, 1, b"\1" * 32),)),
        GOOD,
        HOST,
        anchors(CA),
        (False, False, "tlsa-mismatch"),
        "no TLSA record of mx.partner.example matched",
    ),
    (
        "dane: no certificate at all",
        TlsRequirement("dane", match=(HOST,), tlsa=(TlsaRecord(3, 1, 1, b"\1" * 32),)),
        [],
        HOST,
        [],
        (False, False, "no-certificate"),
        "sent no certificate",
    ),
    (
        "dane without usable records: encrypted, unauthenticated (§2.2)",
        TlsRequirement("dane", tlsa=()),
        WRONG_NAME,
        HOST,
        [],
        (True, False, "tlsa-unusable"),
        "",
    ),
]


@pytest.mark.parametrize(
    ("requirement", "chain", "host", "trusted", "expected", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_check_requirement(
    requirement: TlsRequirement,
    chain: list[bytes],
    host: str,
    trusted: list[Any],
    expected: tuple[bool, bool, str],
    reason: str,
) -> None:
    result = check_requirement(requirement, chain, host=host, anchors=trusted, now=NOW)
    assert (result.ok, result.verified, result.result) == expected
    assert reason in result.reason
    assert "\n" not in result.reason and len(result.reason) < 400  # it becomes a reply line


def test_self_signed_fails_verify_but_matches_its_pin(tmp_path: Path) -> None:
    chain = self_signed(tmp_path)
    verify = check_requirement(
        TlsRequirement("verify"), chain, host=HOST, anchors=load_anchors(None), now=NOW
    )
    assert not verify.ok and verify.reason.startswith(f"certificate for {HOST} not verified: ")
    pinned = TlsRequirement("fingerprint", fingerprints=(pin_of(chain[0]),))
    assert check_requirement(pinned, chain, host=HOST, anchors=[], now=NOW).ok
    # The certificate itself as its own CA file (a self-signed smarthost) also works.
    own = check_requirement(
        TlsRequirement("verify"),
        chain,
        host=HOST,
        anchors=load_anchors(str(tmp_path / "selfsigned-cert.pem")),
        now=NOW,
    )
    assert own.ok, own.reason


def test_the_clock_is_passed_in() -> None:
    fresh = der_chain(CA.issue_cert(HOST, not_before=NOW - datetime.timedelta(days=1)))
    for when, ok in ((NOW, True), (NOW - datetime.timedelta(days=2), False)):
        result = check_requirement(
            TlsRequirement("verify"), fresh, host=HOST, anchors=anchors(CA), now=when
        )
        assert result.ok is ok


def test_load_anchors_errors_and_renewal(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_anchors(str(tmp_path / "missing.pem"))
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(ValueError):
        load_anchors(str(empty))
    CA.cert_pem.write_to_path(str(empty))
    assert len(load_anchors(str(empty))) == 1  # a changed file is read again


CREDENTIAL_CASES = [
    # (requirement in, pins, ca_file, mode out, match out)
    (TlsRequirement("opportunistic"), (), None, "verify", ("relay.example",)),
    (TlsRequirement("none"), (), "ca.pem", "verify", ("relay.example",)),
    (TlsRequirement("encrypt"), (b"p" * 32,), None, "fingerprint", ()),
    (TlsRequirement("verify", match=("x.example",)), (b"p" * 32,), None, "verify", ("x.example",)),
    (TlsRequirement("fingerprint", fingerprints=(b"q" * 32,)), (), None, "fingerprint", ()),
    (TlsRequirement("dane"), (), None, "verify", ("relay.example",)),  # not looked up
    (TlsRequirement("dane", tlsa=()), (), None, "verify", ("relay.example",)),  # no usable TLSA
    (
        TlsRequirement("dane", match=("r",), tlsa=(TlsaRecord(3, 1, 1, b"d" * 32),)),
        (),
        None,
        "dane",
        ("r",),
    ),
]


@pytest.mark.parametrize(("given", "pins", "ca_file", "mode", "match"), CREDENTIAL_CASES)
def test_credentials_need_an_authenticated_mode(
    given: TlsRequirement,
    pins: tuple[bytes, ...],
    ca_file: str | None,
    mode: str,
    match: tuple[str, ...],
) -> None:
    result = for_credentials(given, "relay.example", ca_file=ca_file, fingerprints=pins)
    assert result.authenticated and result.starttls == "required"
    assert (result.mode, result.match) == (mode, match)
    if mode == "verify" and not given.authenticated:
        assert result.ca_file == ca_file
    if mode == "fingerprint" and not given.authenticated:
        assert result.fingerprints == pins


def test_fingerprint_forms() -> None:
    digest = hashlib.sha256(b"key").digest()
    b64 = base64.b64encode(digest).decode()
    hexed = digest.hex()
    colons = ":".join(f"{b:02X}" for b in digest)
    for text in (
        f"sha256:{b64}",
        f"sha256:{hexed}",
        f"SHA256:{colons}",
        f" sha256:{hexed.upper()} ",
    ):
        assert parse_fingerprint(text) == digest, text
    for bad in (b64, "sha1:" + b64, "sha256:" + b64[:-4], "sha256:" + hexed[:-2], "sha256:zz"):
        with pytest.raises(ValueError, match=r"sha256|SHA-256"):
            parse_fingerprint(bad)


def test_spki_sha256_is_the_public_key_pin() -> None:
    assert spki_sha256(GOOD[0]) == pin_of(GOOD[0])
    assert spki_sha256(b"garbage") is None
