"""Verifying every DKIM-Signature of a message (RFC 6376 §6, RFC 8463), sans-IO.

Two steps, so the key lookups can be asynchronous and run all at once::

    signatures = parse_signatures(header_fields)      # which keys are needed: .key_name
    results = verify_signatures(message, signatures, lookup)   # lookup(name) -> record

or, for a large message whose body should not be in memory, the body hashes first, from
the body's chunks (``BodyHashes(body_hash_keys(signatures))``), then
``verify_with_digests``.

``lookup`` returns the key record (the TXT strings joined), None when there is none, and
raises :class:`KeyUnavailable` when DNS could not say. Each signature gets one result
(RFC 8601 §2.7.1): ``pass``; ``fail`` (body hash or signature does not match);
``permerror`` (the signature or its key is unusable); ``temperror`` (the key could not be
fetched). The body is canonicalised and hashed once per (canonicalisation, hash, l=), not
once per signature.

Semantics follow dkimpy, the reference the tests compare against, where RFC 6376 leaves
room: the b= value is removed as dkimpy's ``RE_BTAG`` does, the signature field is hashed
with trailing whitespace removed, a From: field beyond those listed in h= makes the
signature fail (dkimpy bug #644046), and t=/x= get ten hours of clock slop. Stricter than
dkimpy where the RFC says MUST: h= has to include From (§6.1.1), the key record's h= and
t=s are honoured (§3.6.1), and the key type has to match a= .
"""

from __future__ import annotations

import binascii
import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from postillon.dkimcore.body_stream import DigestKey
from postillon.dkimcore.canonical import (
    Field,
    header_fields,
    relaxed_body,
    relaxed_header,
    select_headers,
    simple_body,
    simple_header,
    split_message,
)
from postillon.dkimcore.tags import (
    KeyRecordError,
    TagListError,
    decode_base64,
    parse_key_record,
    parse_tags,
)

# a= -> (hash, key type). rsa-sha1 is still accepted, as by dkimpy and OpenDKIM (RFC 8301
# §3.1 says no; a verdict of "fail" for mail that verifies would help no one).
ALGORITHMS: dict[bytes, tuple[str, str]] = {
    b"rsa-sha256": ("sha256", "rsa"),
    b"rsa-sha1": ("sha1", "rsa"),
    b"ed25519-sha256": ("sha256", "ed25519"),
}
# Mailers' clocks are often wrong: t= may be this far in the future, x= this far past.
CLOCK_SLOP_SECONDS = 36_000
REQUIRED_TAGS = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")

_FWS = rb"(?:(?:\s*\r?\n)?\s+)?"
# The b= tag's value, to be removed before hashing the signature field (RFC 6376 §3.7).
_B_VALUE = re.compile(rb"([;\s]b" + _FWS + rb"=)(?:[\sa-zA-Z0-9+/=]*[a-zA-Z0-9+/=])?")
_H_SEPARATOR = re.compile(rb"\s*:\s*")
_DOMAIN_SPECIALS = re.compile(rb"[()<>\[\]:;@\\,]")


class KeyUnavailable(Exception):
    """The key record could not be fetched now (DNS timeout, SERVFAIL): try again later."""


KeyLookup = Callable[[str], bytes | None]


@dataclass(slots=True)
class Signature:
    """One DKIM-Signature field, parsed and checked; ``problem`` set when it cannot be
    verified. The tag values the verifier needs are decoded here, once."""

    index: int  # position among the header fields
    header_field: Field  # the DKIM-Signature field itself
    tags: dict[bytes, bytes] = field(default_factory=dict)
    problem: str = ""
    domain: str = ""  # d=, lower-case
    selector: str = ""  # s=
    # The TXT name of the key; "" when the signature is unusable before any lookup.
    key_name: str = ""
    hash_name: str = ""  # from a=: "sha256" | "sha1"
    key_type: str = ""  # from a=: "rsa" | "ed25519"
    header_canon: str = ""  # from c=: "simple" | "relaxed"
    body_canon: str = ""
    body_length: int = -1  # l=, -1 without
    signed_names: list[bytes] = field(default_factory=list)  # h=, lower-case
    body_hash: bytes = b""  # bh=, decoded
    signature: bytes = b""  # b=, decoded

    def tag(self, name: bytes) -> str:
        return self.tags.get(name, b"").decode("ascii", errors="replace")


@dataclass(frozen=True, slots=True)
class Result:
    result: str  # pass | fail | permerror | temperror
    reason: str
    signature: Signature


_SIGNATURE_FIELD = re.compile(rb"(?im)^dkim-signature[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)")
_D_TAG = re.compile(rb"(?:^|;)d=([^;]*)")
_S_TAG = re.compile(rb"(?:^|;)s=([^;]*)")


def key_names(header: bytes) -> list[str]:
    """The key names the DKIM-Signature fields of a header section point to, found
    cheaply (regular expressions, no tag parsing), to look them up before verifying.
    For a well-formed signature this is its :attr:`Signature.key_name`."""
    names = []
    for match in _SIGNATURE_FIELD.finditer(header):
        value = b"".join(match.group(1).split())
        domain, selector = _D_TAG.search(value), _S_TAG.search(value)
        if domain and selector and domain.group(1) and selector.group(1):
            d = domain.group(1).decode("ascii", errors="replace").lower()
            names.append(f"{selector.group(1).decode('ascii', errors='replace')}._domainkey.{d}")
    return names


def parse_signatures(fields: Sequence[Field], now: float | None = None) -> list[Signature]:
    """Every DKIM-Signature field, top first, with its tags checked (§6.1.1)."""
    out = []
    clock = int(time.time() if now is None else now)
    for index, (name, value) in enumerate(fields):
        if name.lower() != b"dkim-signature":
            continue
        signature = Signature(index, (name, value))
        try:
            signature.tags = parse_tags(value)
        except TagListError as exc:
            signature.problem = str(exc)
        else:
            signature.domain = signature.tag(b"d").lower()
            signature.selector = signature.tag(b"s")
            signature.problem = _read_tags(signature, clock)
            if not signature.problem:
                signature.key_name = f"{signature.selector}._domainkey.{signature.domain}"
        out.append(signature)
    return out


def _read_tags(sig: Signature, now: int) -> str:
    """Fill ``sig`` from its tags; why they cannot be verified, or "" (RFC 6376 §3.5,
    §6.1.1)."""
    tags = sig.tags
    for name in REQUIRED_TAGS:
        if name not in tags:
            return f"signature has no {name.decode()}="
    if tags[b"v"] != b"1":
        return "v= is not 1"
    algorithm = ALGORITHMS.get(tags[b"a"])
    if algorithm is None:
        return f"unknown algorithm a={tags[b'a'][:30].decode('ascii', 'replace')}"
    sig.hash_name, sig.key_type = algorithm
    try:
        sig.signature = decode_base64(tags[b"b"])
    except binascii.Error:
        return "b= is not base64"
    try:
        sig.body_hash = decode_base64(tags[b"bh"])
    except binascii.Error:
        return "bh= is not base64"
    domain = tags[b"d"]
    if not domain or _DOMAIN_SPECIALS.search(domain):
        return "d= is not a domain"
    if b"i" in tags:
        identity = tags[b"i"].lower()
        d = domain.lower()
        if not identity.endswith(d) or identity[-len(d) - 1 : -len(d)] not in (b"@", b"."):
            return "i= is not in d= or a subdomain of it"
    sig.signed_names = [n.lower() for n in _H_SEPARATOR.split(tags[b"h"].strip())]
    if b"from" not in sig.signed_names:
        return "h= does not include From (RFC 6376 6.1.1)"
    if b"l" in tags:
        if not (tags[b"l"].isdigit() and len(tags[b"l"]) <= 76):
            return "l= is not a number"
        sig.body_length = int(tags[b"l"])
    if b"q" in tags and tags[b"q"] != b"dns/txt":
        return "q= is not dns/txt"
    sig.header_canon, sig.body_canon = _canonicalization(tags.get(b"c", b"simple/simple"))
    if not sig.header_canon:
        return "unknown canonicalization c="
    signed_at = None
    if b"t" in tags:
        if not tags[b"t"].isdigit():
            return "t= is not a number"
        signed_at = int(tags[b"t"])
        if signed_at > now + CLOCK_SLOP_SECONDS:
            return "t= is in the future"
    if b"x" in tags:
        if not tags[b"x"].isdigit():
            return "x= is not a number"
        expires = int(tags[b"x"])
        if expires < now - CLOCK_SLOP_SECONDS:
            return "signature expired (x=)"
        if signed_at is not None and expires < signed_at:
            return "x= is before t="
    return ""


def _canonicalization(value: bytes) -> tuple[str, str]:
    """c= as (header, body); ("", "") when unknown. The body defaults to simple."""
    header, _, body = value.strip().partition(b"/")
    names = (header.decode("ascii", "replace"), (body or b"simple").decode("ascii", "replace"))
    if names[0] not in ("simple", "relaxed") or names[1] not in ("simple", "relaxed"):
        return "", ""
    return names


def verify_signatures(
    fields: Sequence[Field], body: bytes, signatures: Sequence[Signature], lookup: KeyLookup
) -> list[Result]:
    """One result per signature, in order. Pure CPU apart from ``lookup``."""
    message = _Message(fields, body)
    return [_verify(message, s, lookup) for s in signatures]


def body_hash_keys(signatures: Sequence[Signature]) -> list[DigestKey]:
    """The body hashes the usable signatures need (for :class:`BodyHashes`)."""
    keys = {(s.body_canon, s.hash_name, s.body_length) for s in signatures if not s.problem}
    return sorted(keys)


def verify_with_digests(
    fields: Sequence[Field],
    signatures: Sequence[Signature],
    digests: Mapping[DigestKey, bytes],
    lookup: KeyLookup,
) -> list[Result]:
    """As :func:`verify_signatures`, with the body hashes computed beforehand from the
    streamed body (``BodyHashes`` over ``body_hash_keys(signatures)``): a large message
    is verified without its body in memory."""
    message = _Message(fields, b"", digests)
    return [_verify(message, s, lookup) for s in signatures]


def verify_message(message: bytes, lookup: KeyLookup, now: float | None = None) -> list[Result]:
    """Both steps for a whole message (CRLF line ends), with a synchronous ``lookup``."""
    header, body = split_message(message)
    fields = header_fields(header)
    return verify_signatures(fields, body, parse_signatures(fields, now), lookup)


class _Message:
    """What every signature of one message shares, each part computed once: the body
    hashes, and the header fields indexed by name for each canonicalisation."""

    def __init__(
        self,
        fields: Sequence[Field],
        body: bytes,
        digests: Mapping[DigestKey, bytes] | None = None,
    ) -> None:
        self.fields = fields
        self._body = body
        self._canonical: dict[str, bytes] = {}
        self._digests: dict[DigestKey, bytes] = dict(digests or {})
        self._relaxed_fields: list[Field] | None = None

    def body_digest(self, canonicalization: str, hash_name: str, length: int) -> bytes:
        key = (canonicalization, hash_name, length)
        found = self._digests.get(key)
        if found is None:
            canonical = self._canonical.get(canonicalization)
            if canonical is None:
                canon = relaxed_body if canonicalization == "relaxed" else simple_body
                canonical = self._canonical[canonicalization] = canon(self._body)
            data = canonical if length < 0 else memoryview(canonical)[:length]
            found = self._digests[key] = hashlib.new(hash_name, data).digest()
        return found

    def fields_for(self, relaxed: bool) -> Sequence[Field]:
        """Relaxed names are compared without the blanks before the colon (§3.4.2)."""
        if not relaxed:
            return self.fields
        if self._relaxed_fields is None:
            self._relaxed_fields = [(n.rstrip(), v) for n, v in self.fields]
        return self._relaxed_fields


def _verify(message: _Message, sig: Signature, lookup: KeyLookup) -> Result:
    if sig.problem:
        return Result("permerror", sig.problem, sig)
    tags = sig.tags
    try:
        record = lookup(sig.key_name)
    except KeyUnavailable as exc:
        return Result("temperror", f"key lookup failed: {exc}"[:120], sig)
    if record is None:
        return Result("permerror", "no key for signature", sig)
    try:
        key = parse_key_record(record)
    except KeyRecordError as exc:
        return Result("permerror", str(exc), sig)
    if key.key_type != sig.key_type:
        return Result("permerror", f"a= needs a {sig.key_type} key, k={key.key_type}", sig)
    if key.hashes and sig.hash_name not in key.hashes:
        return Result("permerror", f"key record does not allow {sig.hash_name} (h=)", sig)
    identity_domain = tags.get(b"i", b"").rpartition(b"@")[2].lower()
    if key.strict_identity and identity_domain and identity_domain != tags[b"d"].lower():
        return Result("permerror", "key record has t=s and i= is a subdomain", sig)

    if message.body_digest(sig.body_canon, sig.hash_name, sig.body_length) != sig.body_hash:
        return Result("fail", "body hash did not verify", sig)

    relaxed = sig.header_canon == "relaxed"
    canon = relaxed_header if relaxed else simple_header
    # A From: beyond the signed ones breaks the signature (see the module docstring).
    names = [*sig.signed_names, b"from"]
    hasher = hashlib.new(sig.hash_name)
    for name, value in select_headers(message.fields_for(relaxed), names):
        hasher.update(canon(name, value))
    name, value = sig.header_field
    hasher.update(canon(name, _B_VALUE.sub(rb"\1", value)).rstrip())
    if not key.verifies(sig.signature, hasher.digest(), sig.hash_name):
        return Result("fail", "signature did not verify", sig)
    return Result("pass", "", sig)
