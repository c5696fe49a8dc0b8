"""RSA signing as a helper process does it (``postillon.helpers``).

One RSA-2048 private-key operation costs about 0.27 ms of CPU, as much as a third of
what accepting a message costs otherwise, and ``cryptography`` holds the GIL for part of
it, so in a thread it still competes with the server's event loop. A helper process
does it on another core. Ed25519 (0.02 ms) costs less than the trip and stays inline.

* state ``keys``: ``{fingerprint: PKCS#8 DER}``, the server's RSA signing keys (sent
  again, whole, when a reload changes them);
* request ``sign``: ``(fingerprint, sha256_digest)`` -> the signature, or None for a key
  this process does not hold (the server then signs itself).

The key material crosses a pipe between the server and its own child, which runs as the
same user and held nothing less: the server read the same keys from disk.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

# cryptography is imported where a key is used: a server without RSA keys does not hold it.
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

SignRequest = tuple[str, bytes]


class ServerKey(Protocol):
    """What the helpers need of one of the server's keys (``keys.DkimKey`` is one). Named
    here, not imported: keys.py imports this module for :func:`rsa_sign`, and the helper
    must not import keys.py (it pulls in the config model)."""

    @property
    def fingerprint(self) -> str: ...

    @property
    def private_key(self) -> object: ...


def rsa_sign(private_key: rsa.RSAPrivateKey, digest: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 over a SHA-256 ``digest`` (RFC 6376 §3.3.1)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    return private_key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def shared_keys(keys: Iterable[ServerKey]) -> dict[str, bytes]:
    """The ``keys`` state for the helpers: the RSA keys among ``keys``."""
    keys = list(keys)
    if not keys:
        return {}
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    return {
        key.fingerprint: key.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for key in keys
        if isinstance(key.private_key, rsa.RSAPrivateKey)
    }


class RemoteKeys:
    """The keys one helper holds, and signing with them."""

    def __init__(self) -> None:
        self._keys: dict[str, rsa.RSAPrivateKey] = {}

    def replace(self, keys: dict[str, bytes]) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        loaded: dict[str, rsa.RSAPrivateKey] = {}
        for fingerprint, der in keys.items():
            key = serialization.load_der_private_key(der, password=None)
            if isinstance(key, rsa.RSAPrivateKey):
                loaded[fingerprint] = key
        self._keys = loaded

    def sign(self, request: SignRequest) -> bytes | None:
        fingerprint, digest = request
        key = self._keys.get(fingerprint)
        if key is None:
            return None
        return rsa_sign(key, digest)
