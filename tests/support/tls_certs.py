"""Certificates for receiving test servers: CA-issued (trustme), self-signed
(the server's own maker), and the SPKI pin of a certificate."""

from __future__ import annotations

import base64
import hashlib
import ssl
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from postillon.inbound.tls import ensure_self_signed

__all__ = ["ca_issued", "pin", "self_signed"]


def self_signed(directory: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A server context with a self-signed certificate for ``name``, and the cert's path."""
    cert, key = ensure_self_signed(directory / f"self-{name}", name)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


def ca_issued(ca: trustme.CA, name: str) -> ssl.SSLContext:
    """A server context with a certificate for ``name`` issued by ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(ctx)
    return ctx


def pin(cert_pem: bytes) -> str:
    """sha256:<base64 of the SHA-256 of the SubjectPublicKeyInfo>."""
    spki = (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    return "sha256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
