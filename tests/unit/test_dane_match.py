"""The pure TLSA matcher (outbound/dane.py), one row per rule of RFC 7672 / RFC 7671.

Certificates are real: a trustme root -> intermediate -> leaf chain (ECDSA and RSA), a
self-signed leaf made with cryptography, and an impostor CA that copies the real root's
name. Each row names the records, the chain sent, and what must come out.
"""

# ruff: noqa: E501  (the table below keeps one case per line, so it reads as a table)

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from postillon.dns.resolver import TlsaRecord
from postillon.outbound.dane import match_chain, names_match, usable_records

NOW = datetime.now(UTC)
MX = "mx.dane.test"


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def _spki(der: bytes) -> bytes:
    key = x509.load_der_x509_certificate(der).public_key()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tlsa(usage: int, selector: int, mtype: int, der: bytes) -> TlsaRecord:
    """The record a zone would publish for ``der`` (a certificate)."""
    data = der if selector == 0 else _spki(der)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TlsaRecord(usage, selector, mtype, data)


@dataclass(frozen=True)
class Pki:
    root: bytes
    inter: bytes
    leaf: bytes  # for mx.dane.test, issued by inter
    wild: bytes  # *.dane.test
    other_name: bytes  # mail.elsewhere.test
    expired: bytes  # mx.dane.test, expired yesterday
    cn_only: bytes  # CN=mx.dane.test, no subjectAltName
    selfsigned: bytes
    impostor_leaf: bytes  # issued by a CA with the root's name but another key
    impostor_root: bytes


def _self_signed(name: str, *, san: bool = True, issuer_name: x509.Name | None = None) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=400))  # DANE-EE ignores dates: make it old
        .not_valid_after(NOW - timedelta(days=1))
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _pki(key_type: trustme.KeyType) -> Pki:
    root = trustme.CA(key_type=key_type)
    inter = root.create_child_ca(key_type=key_type)

    def issue(*names: str, **kw: object) -> bytes:
        return _der(inter.issue_cert(*names, key_type=key_type, **kw).cert_chain_pems[0].bytes())  # type: ignore[arg-type]

    impostor = trustme.CA(key_type=key_type)
    real_root = x509.load_pem_x509_certificate(root.cert_pem.bytes())
    # An attacker's leaf that claims the real root as issuer but is signed by its own key.
    key = ec.generate_private_key(ec.SECP256R1())
    fake = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, MX)]))
        .issuer_name(real_root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(MX)]), False)
        .sign(key, hashes.SHA256())
    )
    return Pki(
        root=_der(root.cert_pem.bytes()),
        inter=_der(inter.cert_pem.bytes()),
        leaf=issue(MX),
        wild=issue("*.dane.test"),
        other_name=issue("mail.elsewhere.test"),
        expired=issue(MX, not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1)),
        cn_only=_self_signed(MX, san=False),
        selfsigned=_self_signed(MX),
        impostor_leaf=fake.public_bytes(serialization.Encoding.DER),
        impostor_root=_der(impostor.cert_pem.bytes()),
    )


@pytest.fixture(scope="module", params=[trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def pki(request: pytest.FixtureRequest) -> Pki:
    return _pki(request.param)


Records = Callable[[Pki], list[TlsaRecord]]
Chain = Callable[[Pki], list[bytes]]

# (id, records, chain, names, authenticated, words the reason must contain)
CASES: list[tuple[str, Records, Chain, list[str], bool, str]] = [
    # -- DANE-EE(3): the leaf, any selector and matching type; no names, no dates ----------
    ("ee-spki-sha256", lambda p: [tlsa(3, 1, 1, p.leaf)], lambda p: [p.leaf], [MX], True, "DANE-EE 3 1 1"),
    ("ee-cert-sha256", lambda p: [tlsa(3, 0, 1, p.leaf)], lambda p: [p.leaf], [MX], True, "3 0 1"),
    ("ee-cert-full", lambda p: [tlsa(3, 0, 0, p.leaf)], lambda p: [p.leaf], [MX], True, "3 0 0"),
    ("ee-spki-full", lambda p: [tlsa(3, 1, 0, p.leaf)], lambda p: [p.leaf, p.inter], [MX], True, "3 1 0"),
    ("ee-spki-sha512", lambda p: [tlsa(3, 1, 2, p.leaf)], lambda p: [p.leaf], [MX], True, "3 1 2"),
    ("ee-cert-sha512", lambda p: [tlsa(3, 0, 2, p.leaf)], lambda p: [p.leaf], [MX], True, "3 0 2"),
    ("ee-ignores-name", lambda p: [tlsa(3, 1, 1, p.other_name)], lambda p: [p.other_name], [MX], True, "DANE-EE"),
    ("ee-ignores-expiry", lambda p: [tlsa(3, 1, 1, p.selfsigned)], lambda p: [p.selfsigned], [MX], True, "DANE-EE"),
    ("ee-other-key", lambda p: [tlsa(3, 1, 1, p.selfsigned)], lambda p: [p.leaf], [MX], False, "no TLSA record of mx.dane.test matched"),
    ("ee-not-the-issuer", lambda p: [tlsa(3, 1, 1, p.inter)], lambda p: [p.leaf, p.inter], [MX], False, "matched the certificate"),
    ("ee-one-of-several", lambda p: [tlsa(3, 1, 1, p.selfsigned), tlsa(3, 1, 1, p.leaf)], lambda p: [p.leaf], [MX], True, "DANE-EE"),
    # -- DANE-TA(2): a trust anchor in the chain, signatures and names checked --------------
    ("ta-root-cert", lambda p: [tlsa(2, 0, 1, p.root)], lambda p: [p.leaf, p.inter, p.root], [MX], True, "DANE-TA 2 0 1"),
    ("ta-root-spki-sha512", lambda p: [tlsa(2, 1, 2, p.root)], lambda p: [p.leaf, p.inter, p.root], [MX], True, "2 1 2"),
    ("ta-root-cert-full", lambda p: [tlsa(2, 0, 0, p.root)], lambda p: [p.leaf, p.inter, p.root], [MX], True, "2 0 0"),
    ("ta-intermediate", lambda p: [tlsa(2, 1, 1, p.inter)], lambda p: [p.leaf, p.inter], [MX], True, "2 1 1"),
    ("ta-out-of-order", lambda p: [tlsa(2, 0, 1, p.root)], lambda p: [p.leaf, p.root, p.inter], [MX], True, "DANE-TA"),
    ("ta-not-sent", lambda p: [tlsa(2, 0, 1, p.root)], lambda p: [p.leaf, p.inter], [MX], False, "no trust anchor"),
    ("ta-bare-key-not-sent", lambda p: [tlsa(2, 1, 0, p.root)], lambda p: [p.leaf, p.inter], [MX], True, "2 1 0"),
    ("ta-wrong-name", lambda p: [tlsa(2, 0, 1, p.root)], lambda p: [p.other_name, p.inter, p.root], [MX], False, "matches none of mx.dane.test"),
    ("ta-base-domain-name", lambda p: [tlsa(2, 0, 1, p.root)], lambda p: [p.other_name, p.inter, p.root], [MX, "mail.elsewhere.test"], True, "DANE-TA"),
    ("ta-wildcard", lambda p: [tlsa(2, 1, 1, p.inter)], lambda p: [p.wild, p.inter], [MX], True, "DANE-TA"),
    ("ta-wildcard-one-label", lambda p: [tlsa(2, 1, 1, p.inter)], lambda p: [p.wild, p.inter], ["a.mx.dane.test"], False, "matches none"),
    ("ta-expired-leaf", lambda p: [tlsa(2, 0, 1, p.root)], lambda p: [p.expired, p.inter, p.root], [MX], False, "validity dates"),
    ("ta-impostor-same-name", lambda p: [tlsa(2, 0, 1, p.root)], lambda p: [p.impostor_leaf, p.root], [MX], False, "no trust anchor"),
    ("ta-unrelated-anchor-sent", lambda p: [tlsa(2, 0, 1, p.impostor_root)], lambda p: [p.leaf, p.inter, p.impostor_root], [MX], False, "no trust anchor"),
    ("ta-leaf-is-not-an-anchor", lambda p: [tlsa(2, 0, 1, p.leaf)], lambda p: [p.leaf, p.inter], [MX], False, "no trust anchor"),
    ("ta-or-ee", lambda p: [tlsa(2, 0, 1, p.impostor_root), tlsa(3, 1, 1, p.leaf)], lambda p: [p.leaf], [MX], True, "DANE-EE"),
    # -- unusable records are ignored (RFC 7672 §3.1.3, RFC 7671 §4, §9) --------------------
    ("pkix-ee-unusable", lambda p: [tlsa(1, 1, 1, p.leaf)], lambda p: [p.leaf], [MX], False, "no usable TLSA record"),
    ("pkix-ta-unusable", lambda p: [tlsa(0, 0, 1, p.root)], lambda p: [p.leaf, p.inter, p.root], [MX], False, "no usable"),
    ("unknown-usage", lambda p: [TlsaRecord(4, 1, 1, tlsa(3, 1, 1, p.leaf).data)], lambda p: [p.leaf], [MX], False, "no usable"),
    ("unknown-selector", lambda p: [TlsaRecord(3, 2, 1, tlsa(3, 1, 1, p.leaf).data)], lambda p: [p.leaf], [MX], False, "no usable"),
    ("unknown-mtype", lambda p: [TlsaRecord(3, 1, 3, tlsa(3, 1, 1, p.leaf).data)], lambda p: [p.leaf], [MX], False, "no usable"),
    ("short-digest", lambda p: [TlsaRecord(3, 1, 1, tlsa(3, 1, 1, p.leaf).data[:20])], lambda p: [p.leaf], [MX], False, "no usable"),
    ("garbage-full-cert", lambda p: [TlsaRecord(3, 0, 0, b"not a certificate")], lambda p: [p.leaf], [MX], False, "no usable"),
    ("garbage-full-key", lambda p: [TlsaRecord(2, 1, 0, b"\x30\x03\x02\x01\x00")], lambda p: [p.leaf], [MX], False, "no usable"),
    ("empty-data", lambda p: [TlsaRecord(3, 1, 0, b"")], lambda p: [p.leaf], [MX], False, "no usable"),
    ("malformed-beside-good", lambda p: [TlsaRecord(3, 1, 1, b"\x00" * 7), tlsa(3, 1, 1, p.leaf)], lambda p: [p.leaf], [MX], True, "DANE-EE"),
    # RFC 7671 §9: with SHA2-512 published, SHA2-256 records of the same kind are not used.
    ("agility-sha512-wins", lambda p: [tlsa(3, 1, 2, p.selfsigned), tlsa(3, 1, 1, p.leaf)], lambda p: [p.leaf], [MX], False, "matched the certificate"),
    # -- what the server sent ------------------------------------------------------------------
    ("no-chain", lambda p: [tlsa(3, 1, 1, p.leaf)], lambda p: [], [MX], False, "sent no certificate"),
    ("garbage-leaf", lambda p: [tlsa(3, 1, 1, p.leaf)], lambda p: [b"junk"], [MX], False, "matched the certificate"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("records", "chain", "names", "authenticated", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_match_chain(
    pki: Pki,
    records: Records,
    chain: Chain,
    names: list[str],
    authenticated: bool,
    reason: str,
) -> None:
    verdict = match_chain(records(pki), chain(pki), names, NOW, host=MX)
    assert verdict.authenticated is authenticated, verdict.reason
    assert reason in verdict.reason
    assert (verdict.record is not None) is authenticated


def test_usable_records_keeps_order_and_drops_duplicates(pki: Pki) -> None:
    ee = tlsa(3, 1, 1, pki.leaf)
    ta = tlsa(2, 0, 2, pki.root)
    bad = TlsaRecord(1, 1, 1, ee.data)
    assert usable_records([bad, ta, ee, ee]) == (ta, ee)


def test_cn_is_used_only_without_a_subject_alt_name(pki: Pki) -> None:
    cn_only = x509.load_der_x509_certificate(pki.cn_only)
    assert names_match(cn_only, [MX])
    with_san = x509.load_der_x509_certificate(pki.other_name)
    assert not names_match(with_san, [MX])  # its CN is ignored: it has dNSNames


@pytest.mark.parametrize(
    ("presented", "reference", "ok"),
    [
        ("mx.dane.test", "MX.Dane.Test.", True),
        ("*.dane.test", "mx.dane.test", True),
        ("*.dane.test", "dane.test", False),
        ("*.dane.test", "a.b.dane.test", False),
        ("m*.dane.test", "mx.dane.test", False),  # partial wildcards are not honoured
        ("mx.*.test", "mx.dane.test", False),
    ],
)
def test_reference_names(presented: str, reference: str, ok: bool) -> None:
    cert = x509.load_der_x509_certificate(_self_signed(presented))
    assert names_match(cert, [reference]) is ok
