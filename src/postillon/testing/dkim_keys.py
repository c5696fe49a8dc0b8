"""DKIM test keys for tests and benchmarks: a new key and the record that publishes it."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def rsa_key_and_record(bits: int = 2048) -> tuple[bytes, bytes]:
    """A new RSA key as dkimpy signs with it (PKCS#1 PEM) and its DKIM key record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def txt_rdata(value: str) -> str:
    """A TXT value as zone-file rdata: <=255-byte quoted strings."""
    return " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
