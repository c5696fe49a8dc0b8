"""DANE for SMTP: which TLSA records are usable, and whether a certificate chain matches them.

Design note
-----------
Pure: TLSA records and the DER chain the server sent in, a verdict out; no DNS, no
sockets, no clock (``now`` is an argument). ``dane_policy.py`` decides *whether* DANE
applies to a host (its DNS answers must be DNSSEC-secure) and looks the records up; the
transport calls :func:`match_chain` after the TLS handshake. The rules, RFC 7672 (SMTP
with DANE) on RFC 6698 / RFC 7671 (TLSA):

* **Usable records** (:func:`usable_records`, RFC 7672 §3.1.3, RFC 7671 §4): usage
  DANE-TA(2) or DANE-EE(3); selector Cert(0) or SPKI(1); matching type Full(0),
  SHA2-256(1) or SHA2-512(2), with data of the right shape (a digest of the right length,
  a certificate or key that parses). PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (RFC
  7672 §3.1.3: a sender has no way to know which public CAs the receiver meant). Anything
  else is ignored, never an error. Of records differing only in matching type, the
  strongest digest wins (RFC 7671 §9, digest algorithm agility: SHA2-512 over SHA2-256).
  No usable record at all means "DANE with no usable TLSA": TLS is still mandatory, but
  unauthenticated (RFC 7672 §2.2) - the caller's business, not this module's.
* **DANE-EE(3)** (RFC 7672 §3.1.1): the leaf certificate (or its key) matches; names and
  validity dates are not checked.
* **DANE-TA(2)** (RFC 7672 §3.1.2, RFC 7671 §5.2): a certificate in the chain the server
  sent matches and is a trust anchor for the leaf: the leaf is signed by it, directly or
  through issuers in the same presented chain (each signature verified with
  ``cryptography``, each issuer a CA, every certificate on the path within its validity
  dates). A published full public key (2 1 0) may sign the last certificate of the path
  itself, as RFC 7671 §5.2.3 allows, so that trust anchor need not be sent. The leaf must
  then match one of the reference names: the MX host name and the TLSA base domain (RFC
  7672 §3.2.2), by subjectAltName dNSName, or the subject CN when there is none, with a
  wildcard only as the whole leftmost label matching exactly one label (§3.2.3).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from postillon.dns.resolver import TlsaRecord

__all__ = [
    "DANE_EE",
    "DANE_TA",
    "DaneVerdict",
    "match_chain",
    "names_match",
    "usable_records",
]

# RFC 6698 §7.2-7.4 registries.
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
SEL_CERT, SEL_SPKI = 0, 1
MT_FULL, MT_SHA256, MT_SHA512 = 0, 1, 2
_DIGEST_SIZE = {MT_SHA256: 32, MT_SHA512: 64}
# RFC 7671 §9: among matching types of one usage and selector, the stronger digest is used.
_STRENGTH = {MT_SHA512: 2, MT_SHA256: 1}
# Issuers followed from the leaf towards a DANE-TA trust anchor; real chains are 2-4 deep.
MAX_PATH = 8


@dataclass(frozen=True, slots=True)
class DaneVerdict:
    """Whether the chain authenticated the server, and why (for the log and the reply)."""

    authenticated: bool
    reason: str
    record: TlsaRecord | None = None  # the record that matched


def usable_records(records: Iterable[TlsaRecord]) -> tuple[TlsaRecord, ...]:
    """The records RFC 7672 lets an SMTP client use (see the module note), in input order."""
    shaped = [r for r in records if _usable(r)]
    best: dict[tuple[int, int], int] = {}
    for r in shaped:
        key = (r.usage, r.selector)
        best[key] = max(best.get(key, 0), _STRENGTH.get(r.mtype, 0))
    return tuple(
        r
        for r in dict.fromkeys(shaped)
        if r.mtype == MT_FULL or _STRENGTH[r.mtype] == best[(r.usage, r.selector)]
    )


def _usable(r: TlsaRecord) -> bool:
    if r.usage not in (DANE_TA, DANE_EE) or r.selector not in (SEL_CERT, SEL_SPKI):
        return False  # PKIX-TA/PKIX-EE are unusable in SMTP (RFC 7672 §3.1.3)
    if r.mtype in _DIGEST_SIZE:
        return len(r.data) == _DIGEST_SIZE[r.mtype]
    if r.mtype != MT_FULL or not r.data:
        return False
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:  # full data must be what its selector says it is
        if r.selector == SEL_CERT:
            x509.load_der_x509_certificate(r.data)
        else:
            load_der_public_key(r.data)
    except Exception:
        return False
    return True


def match_chain(
    records: Sequence[TlsaRecord],
    chain: Sequence[bytes],
    names: Sequence[str],
    now: datetime,
    *,
    host: str = "",
) -> DaneVerdict:
    """Does the server's ``chain`` (DER, leaf first, as sent) match a usable record?

    ``names`` are the reference identifiers for DANE-TA (the MX host name and the TLSA base
    domain, RFC 7672 §3.2.2); ``now`` (timezone-aware) is for DANE-TA validity dates;
    ``host`` only words the reason.
    """
    who = host or (names[0] if names else "the server")
    usable = usable_records(records)
    if not usable:
        return DaneVerdict(False, f"DANE: no usable TLSA record for {who}")
    if not chain:
        return DaneVerdict(False, f"DANE: {who} sent no certificate")
    from cryptography import x509

    certs: list[Any] = []
    for der in chain:
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except Exception:
            certs.append(None)  # kept in place: DANE-EE 3 0 x can still match the bytes
    ta_failure = ""
    for record in usable:
        if record.usage == DANE_EE:
            if _matches(record, chain[0], certs[0]):
                return DaneVerdict(True, f"DANE-EE {_label(record)} matched {who}", record)
            continue
        problem = _trust_anchor(record, chain, certs, names, now)
        if problem is None:
            return DaneVerdict(True, f"DANE-TA {_label(record)} matched {who}", record)
        ta_failure = ta_failure or problem
    detail = f" ({ta_failure})" if ta_failure else ""
    return DaneVerdict(False, f"DANE: no TLSA record of {who} matched the certificate{detail}")


def _label(r: TlsaRecord) -> str:
    return f"{r.usage} {r.selector} {r.mtype}"


def _selected(record: TlsaRecord, der: bytes, cert: Any) -> bytes | None:
    """RFC 6698 §2.1.2: the full certificate, or its SubjectPublicKeyInfo."""
    if record.selector == SEL_CERT:
        return der
    if cert is None:
        return None
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    try:
        key = cert.public_key()
        return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
    except Exception:  # a key type cryptography cannot load matches no SPKI record
        return None


def _matches(record: TlsaRecord, der: bytes, cert: Any) -> bool:
    data = _selected(record, der, cert)
    if data is None:
        return False
    if record.mtype == MT_SHA256:
        data = hashlib.sha256(data).digest()
    elif record.mtype == MT_SHA512:
        data = hashlib.sha512(data).digest()
    return data == record.data


def _trust_anchor(
    record: TlsaRecord,
    chain: Sequence[bytes],
    certs: Sequence[Any],
    names: Sequence[str],
    now: datetime,
) -> str | None:
    """None when ``record`` (DANE-TA) anchors the leaf; else what went wrong."""
    leaf = certs[0]
    if leaf is None:
        return "the server certificate does not parse"
    bare_key = _bare_key(record)
    path = [0]
    current = leaf
    anchored = False
    while len(path) <= MAX_PATH:
        if bare_key is not None and _signed_by(current, bare_key):
            anchored = True  # RFC 7671 §5.2.3: the published key itself is the anchor
            break
        issuer_at = next(
            (
                i
                for i, c in enumerate(certs)
                if i not in path
                and c is not None
                and c.subject == current.issuer
                and _is_ca(c)
                and _signed_by(current, c.public_key())
            ),
            None,
        )
        if issuer_at is None:
            break
        path.append(issuer_at)
        current = certs[issuer_at]
        if _matches(record, chain[issuer_at], current):
            anchored = True
            break
    if not anchored:
        return "no trust anchor of a DANE-TA record signs the chain"
    for i in path:
        c = certs[i]
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            return f"certificate {c.subject.rfc4514_string()} is outside its validity dates"
    if not names_match(leaf, names):
        return "the certificate matches none of " + ", ".join(names)
    return None


def _bare_key(record: TlsaRecord) -> Any:
    if record.selector != SEL_SPKI or record.mtype != MT_FULL:
        return None
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    try:
        return load_der_public_key(record.data)
    except Exception:
        return None


def _is_ca(cert: Any) -> bool:
    from cryptography import x509

    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except Exception:  # no basicConstraints (or unparsable): not a CA (RFC 5280 §4.2.1.9)
        return False


def _signed_by(cert: Any, key: Any) -> bool:
    """Is ``cert``'s signature made by ``key``? (RSA PKCS#1 v1.5 or PSS, ECDSA, EdDSA.)"""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                cert.signature_algorithm_parameters,
                cert.signature_hash_algorithm,
            )
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(
                cert.signature, cert.tbs_certificate_bytes, cert.signature_algorithm_parameters
            )
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except Exception:
        return False
    return True


def names_match(cert: Any, names: Sequence[str]) -> bool:
    """RFC 7672 §3.2.3: a subjectAltName dNSName (else the subject CN) matches a name."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        presented = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        presented = []
    except Exception:
        return False
    if not presented:
        presented = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    wanted = [_norm(n) for n in names if n]
    return any(_name_matches(_norm(p), w) for p in presented for w in wanted)


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _name_matches(presented: str, reference: str) -> bool:
    if not presented or not reference:
        return False
    if presented.startswith("*."):
        # §3.2.3: "*" only as the complete leftmost label, standing for exactly one label.
        head, _, tail = reference.partition(".")
        return bool(head) and tail == presented[2:] and "*" not in tail
    return "*" not in presented and presented == reference
