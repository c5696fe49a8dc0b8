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

X.509 work uses ``cryptography``, imported lazily: a server that never
delivers over TLS never loads it.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
from typing import Any

__all__ = ["certificate_verified", "default_client_context", "peer_chain", "server_name"]


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
    the context's CA certificates, else the system's, with ``cryptography``'s
    web PKI verifier - relaxed where OpenSSL is (a critical subjectAltName or
    extendedKeyUsage is accepted; EKU, when present, must allow serverAuth).
    Only recorded: RFC 7435 does not require it.
    """
    if not name:
        return False
    if ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname:
        return True
    try:
        from cryptography import x509
        from cryptography.x509 import verification as v

        chain = [x509.load_der_x509_certificate(der) for der in peer_chain(obj)]
        if not chain:
            return False
        anchors = [
            x509.load_der_x509_certificate(der) for der in ctx.get_ca_certs(binary_form=True)
        ] or _system_anchors()
        if not anchors:
            return False
        subject: Any
        try:
            subject = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            subject = x509.DNSName(name)
        ee_policy = (
            v.ExtensionPolicy.webpki_defaults_ee()
            .require_present(x509.SubjectAlternativeName, v.Criticality.AGNOSTIC, None)
            .may_be_present(x509.ExtendedKeyUsage, v.Criticality.AGNOSTIC, _server_auth_eku)
        )
        verifier = (
            v.PolicyBuilder()
            .store(v.Store(anchors))
            .extension_policies(
                ca_policy=v.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy
            )
            .build_server_verifier(subject)
        )
        verifier.verify(chain[0], chain[1:])
    except Exception:  # any failure to verify, for whatever reason, means "not verified"
        return False
    return True


def _server_auth_eku(policy: Any, cert: Any, eku: Any) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID as Eku

    if eku is not None and Eku.SERVER_AUTH not in eku and Eku.ANY_EXTENDED_KEY_USAGE not in eku:
        raise ValueError("extendedKeyUsage does not allow serverAuth")


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


@functools.lru_cache(maxsize=1)
def _system_anchors() -> list[Any]:
    from cryptography import x509

    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if not path:
            continue
        try:
            with open(path, "rb") as f:
                return list(x509.load_pem_x509_certificates(f.read()))
        except (OSError, ValueError):
            continue
    return []
