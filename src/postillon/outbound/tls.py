"""TLS for outbound connections: the client context and what the server's certificate proves.

Design note
-----------
``client_session.SmtpClientSession`` does the handshakes; this module holds
the TLS decisions around them, so the TLS policy work (verified smarthost,
per-destination policy, DANE, MTA-STS, REQUIRETLS) lands here and not in the
asyncio driver:

* :func:`default_client_context` - opportunistic TLS (RFC 7435): encrypt, but
  do not require a valid certificate.
* :func:`server_name` - the name for SNI and verification (None for an IP
  literal).
* :func:`certificate_verified` - after an opportunistic handshake, whether the
  chain the server sent verifies for its name (recorded, not required).
* :func:`verify_chain`, :func:`load_anchors`, :func:`peer_chain` - the pieces, for
  checks that require a verified certificate (MTA-STS, ``mta_sts.py``).

X.509 work uses ``cryptography``, imported lazily: a server that never
delivers over TLS never loads it.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = [
    "certificate_verified",
    "default_client_context",
    "load_anchors",
    "peer_chain",
    "server_name",
    "verify_chain",
]


@functools.lru_cache(maxsize=1)
def default_client_context() -> ssl.SSLContext:
    """Opportunistic TLS (RFC 7435): encrypt, but do not require a valid certificate."""
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


def certificate_verified(obj: ssl.SSLObject, ctx: ssl.SSLContext, name: str | None) -> bool:
    """Did the server's certificate verify for ``name``?

    With a verifying context the handshake already proved it. Otherwise
    (opportunistic TLS) the chain the server sent is checked afterwards against
    the context's CA certificates, else the system's (:func:`verify_chain`).
    Only recorded: RFC 7435 does not require it.
    """
    if not name:
        return False
    if ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname:
        return True
    try:
        from cryptography import x509

        anchors = (
            tuple(x509.load_der_x509_certificate(der) for der in ctx.get_ca_certs(binary_form=True))
            or _system_anchors()
        )
    except Exception:  # unreadable CA certificates: nothing verifies
        return False
    now = datetime.datetime.now(datetime.UTC)
    return not verify_chain(peer_chain(obj), name, anchors, now)


def verify_chain(
    chain: Sequence[bytes], name: str, anchors: Sequence[Any], now: datetime.datetime
) -> str:
    """ "" when ``chain`` (DER, leaf first) verifies for ``name`` (web PKI rules) against
    ``anchors`` at ``now``, else why not (one line, bounded: it ends in a reply).

    Relaxed where OpenSSL is: a critical subjectAltName or extendedKeyUsage is
    accepted; EKU, when present, must allow serverAuth; the leaf needs no
    authorityKeyIdentifier. (The same function as ``_verify_chain`` on the tlsverify
    branch; MTA-STS (RFC 8461 §4.2) and the verify policy share it.)
    """
    if not chain:
        return "no certificate"
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
        text = (str(exc) or type(exc).__name__).removeprefix("validation failed: ")
        return " ".join(text.split())[:200]
    return ""


def _server_auth_eku(policy: Any, cert: Any, eku: Any) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID as Eku

    if eku is not None and Eku.SERVER_AUTH not in eku and Eku.ANY_EXTENDED_KEY_USAGE not in eku:
        raise ValueError("extendedKeyUsage does not allow serverAuth")


def peer_chain(obj: ssl.SSLObject) -> list[bytes]:
    """DER certificates as the server sent them (leaf first)."""
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

    Raises OSError or ValueError for a ``ca_file`` that cannot be read or holds no
    certificate. Read once per file version (path, size, mtime): a renewed file is
    picked up. (As on the tlsverify branch.)
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
