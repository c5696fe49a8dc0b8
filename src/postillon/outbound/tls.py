"""TLS for outbound connections: the client context and what the server's certificate proves.

Design note
-----------
``client_session.SmtpClientSession`` does the handshakes; ``tls_policy``
says what a connection must prove (a ``TlsRequirement``); this module holds
the X.509 decisions in between, so the asyncio driver only applies them:

* :func:`default_client_context` - the one client context. It never verifies
  during the handshake (``CERT_NONE``): every check happens afterwards in
  :func:`check_requirement`, so a failed check has a reason we can log, and
  pins and DANE use the same path. Sound because the handshake itself proves
  the server holds the private key of the certificate it sent (TLS 1.2/1.3
  CertificateVerify); AUTH and the message only follow a passed check.
* :func:`server_name` - the name for SNI and verification (None for an IP
  literal).
* :func:`check_requirement` - pure: a finished handshake's chain (DER, leaf
  first) against a requirement, the trust anchors and the time, to a
  :class:`TlsCheck` value (met or not, and why). The one post-handshake gate:
  web PKI (verify, and MTA-STS: an enforce match is a verify requirement),
  pins (fingerprint) and DANE (TLSA records, through ``dane.match_chain``)
  all pass through it, before AUTH or MAIL.
* :func:`load_anchors` - the trust anchors for a requirement: its ``ca_file``
  (read once per file version) or the system's CA bundle.

X.509 work uses ``cryptography``, imported lazily: a server that never
delivers over TLS never loads it.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import ipaddress
import os
import ssl
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from postillon.outbound.dane import DANE_TA, match_chain
from postillon.outbound.tls_policy import TlsRequirement

__all__ = [
    "AUTHENTICATED_RESULTS",
    "TlsCheck",
    "check_requirement",
    "default_client_context",
    "load_anchors",
    "peer_chain",
    "recording_check",
    "server_name",
    "spki_sha256",
]


@functools.lru_cache(maxsize=1)
def default_client_context() -> ssl.SSLContext:
    """No verification in the handshake; :func:`check_requirement` decides after it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_name(host: str) -> str | None:
    """The name for SNI and verification: None for an IP literal."""
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return None


# TlsCheck results that prove the server's identity (a password may follow):
# web PKI, a pin, or a DANE-TA / DANE-EE match (RFC 7672 §3.1).
AUTHENTICATED_RESULTS: frozenset[str] = frozenset({"verified", "pinned", "dane-ta", "dane-ee"})


@dataclass(frozen=True, slots=True)
class TlsCheck:
    """What a finished handshake proved against a requirement.

    ``ok``: the requirement is met (the session may go on). ``verified``: the
    chain verified for a required name (or, when the mode asks for no
    names, for the host connected to: recorded, as RFC 7435 allows; dane:
    a TLSA record matched). ``result``: a short label for metrics and logs:
    "verified", "pinned", "dane-ta", "dane-ee", "unverified" (allowed),
    "tlsa-unusable" (DANE without usable records: allowed, unauthenticated),
    "not-verified", "fingerprint-mismatch", "tlsa-mismatch",
    "no-certificate", "dane-unavailable"; for MTA-STS requirements RFC 8460's
    result types instead of "not-verified": "certificate-host-mismatch",
    "certificate-expired", "sts-webpki-invalid", "validation-failure" (kept for
    TLS reporting). ``reason``: why not (or, for DANE, which record matched;
    for MTA-STS testing, what enforce would have refused: ``ok`` stays True),
    for the log and the queue's last reply.
    """

    ok: bool
    verified: bool
    result: str
    reason: str = ""


def check_requirement(
    requirement: TlsRequirement,
    chain: Sequence[bytes],
    *,
    host: str,
    anchors: Sequence[Any],
    now: datetime.datetime,
) -> TlsCheck:
    """Does the server's ``chain`` (DER, leaf first) meet ``requirement``?

    ``host`` is the name connected to (an MX or smarthost name, or an IP
    address); ``anchors`` are ``cryptography`` certificates (see
    :func:`load_anchors`). Pure: no I/O, the clock passed in.
    """
    mode = requirement.mode
    if mode == "dane":
        return _check_dane(requirement, chain, host, now)
    if requirement.sts == "enforce":
        return _check_sts(requirement, chain, host, anchors, now)
    if requirement.sts == "testing" and mode != "verify":
        # RFC 8461 §5: delivery goes on whatever the result; the result is reported.
        found = _check_sts(requirement, chain, host, anchors, now)
        return TlsCheck(True, found.verified, found.result, found.reason)
    if not chain:
        if mode in ("verify", "fingerprint"):
            return TlsCheck(False, False, "no-certificate", f"{host} sent no certificate")
        return TlsCheck(True, False, "unverified")
    if mode == "fingerprint":
        digest = spki_sha256(chain[0])
        if digest is not None and digest in requirement.fingerprints:
            return TlsCheck(True, False, "pinned")
        shown = base64.b64encode(digest).decode() if digest is not None else "unreadable"
        return TlsCheck(
            False,
            False,
            "fingerprint-mismatch",
            f"certificate of {host} matches no configured fingerprint (its key is sha256:{shown})",
        )
    names = requirement.match if mode == "verify" and requirement.match else (host,)
    error = ""
    for name in names:
        error = _verify_chain(chain, name, anchors, now)
        if not error:
            return TlsCheck(True, True, "verified")
    if mode == "verify":
        return TlsCheck(
            False,
            False,
            "not-verified",
            f"certificate for {' or '.join(names)} not verified: {error}",
        )
    return TlsCheck(True, False, "unverified")  # recorded only (RFC 7435)


def _check_sts(
    requirement: TlsRequirement,
    chain: Sequence[bytes],
    host: str,
    anchors: Sequence[Any],
    now: datetime.datetime,
) -> TlsCheck:
    """RFC 8461 §4.2: the certificate chains to a trusted root, is valid now and
    names the MX host (``match``); failures named as RFC 8460 §4.3 reports them."""
    if not requirement.match:  # testing only: the policy does not list the host (§4.1)
        reason = f"MTA-STS: {host} does not match the policy ({requirement.source})"
        return TlsCheck(False, False, "validation-failure", reason)
    if not chain:
        return TlsCheck(False, False, "sts-webpki-invalid", f"MTA-STS: {host} sent no certificate")
    error = ""
    for name in requirement.match:
        error = _verify_chain(chain, name, anchors, now)
        if not error:
            return TlsCheck(True, True, "verified")
    names = " or ".join(requirement.match)
    return TlsCheck(
        False, False, _sts_result(error), f"MTA-STS: certificate not valid for {names}: {error}"
    )


def _sts_result(error: str) -> str:
    """RFC 8460 §4.3 result type for a web PKI failure (from cryptography's message)."""
    if "subjectAltName" in error:
        return "certificate-host-mismatch"
    if "expired" in error or "validation time" in error:
        return "certificate-expired"
    return "sts-webpki-invalid"


def _check_dane(
    requirement: TlsRequirement, chain: Sequence[bytes], host: str, now: datetime.datetime
) -> TlsCheck:
    """RFC 7672 §3: the chain against the host's usable TLSA records.

    Web PKI plays no part (§3.1.3): a DANE-EE match needs no CA, name or date.
    """
    if requirement.tlsa is None:
        # A "dane" rule the transport did not resolve through DNS: it refuses such
        # a host before connecting, so reaching here is a wiring error. Fail closed.
        return TlsCheck(
            False, False, "dane-unavailable", f"policy dane for {host}: TLSA records not looked up"
        )
    if not requirement.tlsa:
        # §2.2: secure TLSA records, none usable: TLS is mandatory (the session got
        # this far), authentication is not possible.
        return TlsCheck(True, False, "tlsa-unusable")
    verdict = match_chain(requirement.tlsa, chain, requirement.match or (host,), now, host=host)
    if not verdict.authenticated or verdict.record is None:
        result = "no-certificate" if not chain else "tlsa-mismatch"
        return TlsCheck(False, False, result, verdict.reason)
    result = "dane-ta" if verdict.record.usage == DANE_TA else "dane-ee"
    return TlsCheck(True, True, result, verdict.reason)


def _verify_chain(chain: Sequence[bytes], name: str, anchors: Sequence[Any], now: Any) -> str:
    """ "" when ``chain`` verifies for ``name`` (web PKI rules), else why not.

    Relaxed where OpenSSL is: a critical subjectAltName or extendedKeyUsage
    is accepted; EKU, when present, must allow serverAuth; the leaf needs no
    authorityKeyIdentifier.
    """
    if not anchors:
        return "no trusted CA certificates"
    try:
        from cryptography import x509
        from cryptography.x509 import verification as v

        certs = [x509.load_der_x509_certificate(der) for der in chain]
        subject: Any
        try:
            subject = x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
        except ValueError:
            subject = x509.DNSName(name)
        ee_policy = (
            v.ExtensionPolicy.webpki_defaults_ee()
            .require_present(x509.SubjectAlternativeName, v.Criticality.AGNOSTIC, None)
            # OpenSSL does not require it either; without it a self-signed
            # certificate named in a CA file could never verify.
            .may_be_present(x509.AuthorityKeyIdentifier, v.Criticality.AGNOSTIC, None)
            .may_be_present(x509.ExtendedKeyUsage, v.Criticality.AGNOSTIC, _server_auth_eku)
        )
        verifier = (
            v.PolicyBuilder()
            .store(v.Store(list(anchors)))
            .time(now)
            .extension_policies(
                ca_policy=v.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy
            )
            .build_server_verifier(subject)
        )
        verifier.verify(certs[0], certs[1:])
    except Exception as exc:  # any failure to verify, for whatever reason, means "not verified"
        return _short(str(exc) or type(exc).__name__)
    return ""


def _short(text: str) -> str:
    """cryptography's message without its wrapping, one line, bounded (it ends in a reply)."""
    text = text.removeprefix("validation failed: ")
    return " ".join(text.split())[:200]


def _server_auth_eku(policy: Any, cert: Any, eku: Any) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID as Eku

    if eku is not None and Eku.SERVER_AUTH not in eku and Eku.ANY_EXTENDED_KEY_USAGE not in eku:
        raise ValueError("extendedKeyUsage does not allow serverAuth")


def recording_check(ctx: ssl.SSLContext, name: str | None) -> Callable[[list[bytes]], TlsCheck]:
    """Without a policy: record whether the certificate verified for ``name``
    (RFC 7435 opportunistic TLS), against the context's CAs, else the system's."""
    if ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname:
        # The handshake already proved it.
        return lambda chain: TlsCheck(True, bool(name), "verified" if name else "unverified")

    def check(chain: list[bytes]) -> TlsCheck:
        if not name:
            return TlsCheck(True, False, "unverified")
        from cryptography import x509

        configured = ctx.get_ca_certs(binary_form=True)
        anchors = tuple(x509.load_der_x509_certificate(d) for d in configured) or load_anchors(None)
        return check_requirement(
            TlsRequirement("opportunistic"),
            chain,
            host=name,
            anchors=anchors,
            now=datetime.datetime.now(datetime.UTC),
        )

    return check


def spki_sha256(der: bytes) -> bytes | None:
    """SHA-256 of the certificate's SubjectPublicKeyInfo (the pin), None if unreadable."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        key = x509.load_der_x509_certificate(der).public_key()
        spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    except Exception:  # a certificate we cannot parse matches no pin
        return None
    return hashlib.sha256(spki).digest()


def peer_chain(obj: ssl.SSLObject) -> list[bytes]:
    """DER certificates as the server sent them (leaf first).

    Python 3.13 has ``SSLObject.get_unverified_chain()``; 3.10-3.12 have the same method
    on the private ``_ssl._SSLSocket`` (``obj._sslobj``), which is what 3.13's public one
    calls, so the whole chain is available on every supported Python without a new
    dependency (DANE-TA needs the intermediates, RFC 7672 §3.1.2). Only if both are
    missing (another implementation) does this fall back to the leaf alone.
    """
    public = getattr(obj, "get_unverified_chain", None)  # Python 3.13+
    if public is not None:
        return [bytes(c) for c in public()]
    private = getattr(getattr(obj, "_sslobj", None), "get_unverified_chain", None)  # 3.10-3.12
    if private is not None:
        certs = private() or []
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in certs]  # type: ignore[attr-defined]
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def load_anchors(ca_file: str | None) -> tuple[Any, ...]:
    """The trust anchors: the certificates in ``ca_file`` (PEM), else the system's.

    Raises OSError or ValueError for a ``ca_file`` that cannot be read or
    holds no certificate (the caller defers with that reason). Read once per
    file version (path, size, mtime), so a renewed CA file is picked up.
    """
    if ca_file is None:
        return _system_anchors()
    st = os.stat(ca_file)
    return _file_anchors(ca_file, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_anchors(path: str, size: int, mtime_ns: int) -> tuple[Any, ...]:
    from cryptography import x509

    with open(path, "rb") as f:
        certs = tuple(x509.load_pem_x509_certificates(f.read()))
    if not certs:
        raise ValueError(f"{path}: no PEM certificate in it")
    return certs


@functools.lru_cache(maxsize=1)
def _system_anchors() -> tuple[Any, ...]:
    from cryptography import x509

    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if not path:
            continue
        try:
            with open(path, "rb") as f, warnings.catch_warnings():
                # Some system roots have a non-positive serial: cryptography warns
                # about each; they are the operator's CAs, not ours to judge.
                warnings.simplefilter("ignore")
                return tuple(x509.load_pem_x509_certificates(f.read()))
        except (OSError, ValueError):
            continue
    return ()
