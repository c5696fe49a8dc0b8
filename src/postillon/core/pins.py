"""SPKI pins: ``sha256:`` + the SHA-256 digest of a certificate's public key.

One parser for the config check (errors name the key) and the server (the
pins it compares), so a pin that passes ``check-config`` is the pin used.
The digest covers the SubjectPublicKeyInfo, not the whole certificate, so a
renewed certificate with the same key keeps its pin (RFC 7469 §2.4). Print
one with::

    openssl x509 -in cert.pem -pubkey -noout | openssl pkey -pubin -outform der \
        | openssl dgst -sha256 -binary | base64
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["parse_fingerprint"]


def parse_fingerprint(text: str) -> bytes:
    """``sha256:`` + the SPKI SHA-256 digest in base64 (as HPKP and ``openssl
    ... | base64`` print it) or hex (colons allowed); the 32-byte digest.

    Raises ValueError naming the accepted forms.
    """
    algorithm, sep, value = text.strip().partition(":")
    if not sep or algorithm.lower() != "sha256":
        raise ValueError(
            f"fingerprint {text!r} must start with 'sha256:' (the SPKI SHA-256 digest, "
            "base64 or hex)"
        )
    hexed = value.replace(":", "")
    if len(hexed) == 64:
        try:
            return bytes.fromhex(hexed)
        except ValueError:
            pass
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 32:
        raise ValueError(
            f"fingerprint {text!r}: expected a SHA-256 digest (32 bytes) in base64 "
            "(44 characters) or hex (64 digits, colons allowed)"
        )
    return digest
