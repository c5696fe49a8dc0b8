"""Tag=value lists (RFC 6376 §3.2) and DKIM key records (§3.6.1, RFC 8463 §4).

Parsed key records are memoised by their text: a bulk sender's mail carries the same few
keys, and parsing an RSA key costs more than verifying with it.

Ed25519 keys verify through libsodium (PyNaCl, already needed by dkimpy): 0.06 ms per
signature against OpenSSL's 0.13 ms on the benchmark machine. RSA goes through OpenSSL
(``cryptography``), 0.02 ms.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

# cryptography and PyNaCl are imported where a key is parsed or a signature checked: a
# server whose helper process verifies holds neither (bench/README.md, "Memory"). The
# standard library modules they need are imported by then (tests/unit/test_helper_memory.py).
if TYPE_CHECKING:
    import nacl.signing
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    PublicKey = rsa.RSAPublicKey | nacl.signing.VerifyKey

# RFC 8301 §3.2: verifiers MUST NOT consider keys shorter than 1024 bits valid.
MIN_RSA_BITS = 1024

_TAG_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_]*")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")


class TagListError(ValueError):
    """A tag-list that RFC 6376 §3.2 makes invalid as a whole."""


def parse_tags(tag_list: bytes) -> dict[bytes, bytes]:
    """``{name: value}``: names as written (they are case-sensitive), values without the
    whitespace around them; a trailing semicolon is allowed, a repeated name is not."""
    tags: dict[bytes, bytes] = {}
    specs = tag_list.split(b";")
    if not specs[-1].strip():
        specs.pop()
    for spec in specs:
        name, equals, value = spec.partition(b"=")
        name = name.strip()
        if not equals or not _TAG_NAME.fullmatch(name):
            raise TagListError(f"not a tag=value pair: {spec.strip()[:40]!r}")
        if name in tags:
            raise TagListError(f"tag {name.decode('ascii')}= appears twice")
        tags[name] = value.strip()
    return tags


def decode_base64(value: bytes) -> bytes:
    """base64 with FWS anywhere (RFC 6376 §2.6); ``binascii.Error`` when it is not."""
    compact = b"".join(value.split())
    if len(compact) % 4 or not _BASE64.fullmatch(compact):
        raise binascii.Error("not base64")
    return base64.b64decode(compact)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_type: str  # "rsa" | "ed25519"
    public_key: PublicKey
    hashes: frozenset[str]  # h=: acceptable hash algorithms; empty = any
    strict_identity: bool  # t=s: i= must be in exactly d=, not a subdomain
    testing: bool  # t=y

    def verifies(self, signature: bytes, digest: bytes, hash_name: str) -> bool:
        """Whether ``signature`` is this key's over ``digest`` (the header hash): PKCS#1
        v1.5 for RSA, PureEdDSA over the hash for Ed25519 (RFC 8463 §3)."""
        import nacl.exceptions
        import nacl.signing
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import padding

        key = self.public_key
        try:
            if isinstance(key, nacl.signing.VerifyKey):
                key.verify(digest, signature)
            else:
                key.verify(signature, digest, padding.PKCS1v15(), _prehashed(hash_name))
        except (InvalidSignature, nacl.exceptions.BadSignatureError, ValueError):
            return False
        return True


@functools.lru_cache(maxsize=2)
def _prehashed(hash_name: str) -> Prehashed:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    algorithm = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}[hash_name]
    return Prehashed(algorithm())


class KeyRecordError(ValueError):
    """A key record that cannot be used; ``revoked`` when p= is empty (§3.6.1)."""

    def __init__(self, reason: str, revoked: bool = False) -> None:
        super().__init__(reason)
        self.revoked = revoked


def parse_key_record(record: bytes) -> KeyRecord:
    """The key in a ``_domainkey`` TXT record; KeyRecordError when unusable."""
    result = _parse_key_record(record)
    if isinstance(result, KeyRecordError):
        raise result
    return result


@functools.lru_cache(maxsize=1024)
def _parse_key_record(record: bytes) -> KeyRecord | KeyRecordError:
    try:
        tags = parse_tags(record)
    except TagListError as exc:
        return KeyRecordError(f"key record: {exc}")
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return KeyRecordError("key record: v= is not DKIM1")
    if b"p" not in tags:
        return KeyRecordError("key record has no p=")
    key_type = tags.get(b"k", b"rsa").decode("ascii", errors="replace")
    services = {s.strip() for s in tags.get(b"s", b"*").split(b":")}
    if not services & {b"*", b"email"}:
        return KeyRecordError("key record is not for email (s=)")
    try:
        raw = decode_base64(tags[b"p"])
    except binascii.Error:
        return KeyRecordError("key record: p= is not base64")
    if not raw:
        return KeyRecordError("key revoked (empty p=)", revoked=True)
    import nacl.exceptions
    import nacl.signing
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    public_key: PublicKey
    try:
        if key_type == "rsa":
            loaded = load_der_public_key(raw)
            if not isinstance(loaded, rsa.RSAPublicKey):
                return KeyRecordError("k=rsa but p= holds another kind of key")
            if loaded.key_size < MIN_RSA_BITS:
                return KeyRecordError(f"RSA key of {loaded.key_size} bits (RFC 8301: >= 1024)")
            public_key = loaded
        elif key_type == "ed25519":
            if len(raw) != 32:
                return KeyRecordError(f"Ed25519 key of {len(raw)} bytes, not 32")
            public_key = nacl.signing.VerifyKey(raw)
        else:
            return KeyRecordError(f"unknown key type k={key_type}")
    except (ValueError, nacl.exceptions.CryptoError) as exc:
        return KeyRecordError(f"unusable {key_type} key in p=: {exc}"[:120])
    hashes = frozenset(
        h.strip().decode("ascii", errors="replace")
        for h in tags.get(b"h", b"").split(b":")
        if h.strip()
    )
    flags = {f.strip() for f in tags.get(b"t", b"").split(b":")}
    return KeyRecord(key_type, public_key, hashes, b"s" in flags, b"y" in flags)
