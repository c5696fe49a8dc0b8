"""DKIM-Signature for outgoing mail: who is signed, with which keys, and the header itself.

The contract, as one message's transaction (intake drives it)::

    signing = signer.start(header_section, client_ip=..., authenticated=...)  # None: unsigned
    signing.update(body_piece)          # every byte after the header section, as it streams
    ...
    fields = signing.finish(now)        # b"DKIM-Signature: ...\\r\\n" once per key, to prepend

Who is signed (RFC 6376 §1.1: the signer vouches for the mail): local senders (``sendmail``,
the maildrop, bounces: no client IP), authenticated submission clients, and, when
``[dkim] sign_trusted_networks`` is on, clients in ``[relay] trusted_networks``. Mail relayed
to us from anyone else is never signed: it is not ours to vouch for.

Which keys: those of the ``From:`` domain (or its nearest parent with keys), else of the
envelope sender's domain; every key of that domain signs, so an RSA and an Ed25519 key give
the two signatures RFC 8463 recommends. Canonicalisation is relaxed/relaxed (§3.4.2, §3.4.4),
the most robust against re-folding on the way; the hash is SHA-256 (RFC 8301).
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from postillon.config.model import Config, ConfigError
from postillon.dkimcore.canonical import (
    Field,
    HeaderFormatError,
    header_fields,
    relaxed_header,
    select_headers,
)
from postillon.signing.body_hash import RelaxedBodyHash
from postillon.signing.keys import DkimKey, KeyStore, KeyStoreError, key_store_from_config

log = logging.getLogger("postillon.dkim")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Client addresses whose trusted-network verdict is remembered (then the memo starts over).
TRUSTED_CACHE_SIZE = 4096
# Signature lines are folded to stay under this many characters (RFC 5322 §2.1.1's 78).
FOLD_AT = 76
# RFC 6376 §3.5 b=: base64 may be folded; these many characters per line.
B64_PER_LINE = 64


@dataclass(frozen=True, slots=True)
class SigningPolicy:
    """What is signed: header names (lower-case) and which get one extra, empty instance."""

    headers: tuple[str, ...]
    oversign: tuple[str, ...]
    trusted_networks: tuple[Network, ...] = ()

    @classmethod
    def create(
        cls, headers: Iterable[str], oversign: Iterable[str], trusted_networks: Iterable[str] = ()
    ) -> SigningPolicy:
        return cls(
            tuple(h.lower() for h in headers),
            tuple(h.lower() for h in oversign),
            tuple(ipaddress.ip_network(n, strict=False) for n in trusted_networks),
        )


class DkimSigner:
    """Shared by every transaction: the keys and the policy. Cheap to ask; holds no message."""

    def __init__(self, keys: KeyStore, policy: SigningPolicy) -> None:
        self.keys = keys
        self.policy = policy
        oversign = set(policy.oversign)
        # (name, extra instances) in the configured order, encoded once.
        self._trusted_ips: dict[str, bool] = {}
        self._wanted = tuple(
            (name.encode("ascii"), 1 if name in oversign else 0) for name in policy.headers
        )

    def eligible(self, client_ip: str, authenticated: bool) -> bool:
        """Local (no client IP), authenticated, or from a trusted network."""
        if not client_ip or authenticated:
            return True
        if not self.policy.trusted_networks:
            return False
        trusted = self._trusted_ips.get(client_ip)
        if trusted is None:
            # Parsing the address costs more than the rest of this check: remember the
            # answer per client address (few distinct ones send through trusted networks).
            if len(self._trusted_ips) >= TRUSTED_CACHE_SIZE:
                self._trusted_ips.clear()
            trusted = self._trusted_ips[client_ip] = self._in_trusted_network(client_ip)
        return trusted

    def _in_trusted_network(self, client_ip: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip in net for net in self.policy.trusted_networks)

    def start(
        self, header_section: bytes, sender: str, *, client_ip: str, authenticated: bool
    ) -> MessageSigning | None:
        """Begin signing a message whose header section (CRLF lines, without the empty line
        that ends it) is ``header_section``; None when it is not to be signed."""
        if len(self.keys) == 0 or not self.eligible(client_ip, authenticated):
            return None
        try:
            headers = header_fields(header_section)
        except HeaderFormatError as exc:
            log.info("not signing: unparseable header section (%s)", exc)
            return None
        keys = self._keys_for(headers, sender)
        if not keys:
            return None
        return MessageSigning(keys, headers, self._header_list(headers))

    def _keys_for(self, headers: Sequence[Field], sender: str) -> tuple[DkimKey, ...]:
        for name, value in headers:
            if name.lower() == b"from":
                domain = _author_domain(value)
                keys = self.keys.signing_keys(domain) if domain else ()
                if keys:
                    return keys
                break
        _, _, sender_domain = sender.rpartition("@")
        return self.keys.signing_keys(sender_domain) if sender_domain else ()

    def _header_list(self, headers: Sequence[Field]) -> tuple[bytes, ...]:
        """h=: each configured field as often as it occurs (bottom-up, RFC 6376 §5.4.2), plus
        once more for oversigned ones so a further instance cannot be added (§8.15)."""
        counts: dict[bytes, int] = {}
        for present, _ in headers:
            key = present.lower()
            counts[key] = counts.get(key, 0) + 1
        out: list[bytes] = []
        for field, extra in self._wanted:
            times = counts.get(field, 0) + extra
            if times:
                out.extend([field] * times)
        return tuple(out)


# The usual forms, "Name <user@domain>" and "user@domain", without the cost of the full
# RFC 5322 parser; anything else (groups, comments, several addresses) takes the slow path.
_SIMPLE_FROM = re.compile(
    rb"(?:[^<>@]*<[^<>@\s]+@([A-Za-z0-9.-]+)>|\s*[^<>@\s\"(),;:]+@([A-Za-z0-9.-]+))\s*"
)


def _author_domain(value: bytes) -> str | None:
    simple = _SIMPLE_FROM.fullmatch(value)
    if simple:
        return (simple.group(1) or simple.group(2)).decode("ascii").lower()
    text = value.decode("utf-8", errors="replace").replace("\r\n", "")
    for _, address in email.utils.getaddresses([text]):
        _, at, domain = address.rpartition("@")
        if at and domain:
            return domain.strip().rstrip(">").lower()
    return None


class MessageSigning:
    """One message being signed: hashes its body as it streams, then makes the fields."""

    def __init__(
        self, keys: tuple[DkimKey, ...], headers: list[Field], header_list: tuple[bytes, ...]
    ) -> None:
        self.keys = keys
        self._headers = headers
        self._header_list = header_list
        self._body = RelaxedBodyHash()
        self._folded_list: bytes | None = None

    def update(self, data: bytes) -> None:
        self._body.update(data)

    def describe(self) -> str:
        """For the mail log: ``example.org:rsa202611+ed202611`` (the domain, then selectors)."""
        return f"{self.keys[0].domain}:" + "+".join(k.selector for k in self.keys)

    def finish(self, now: float) -> bytes:
        """The ``DKIM-Signature:`` fields, one per key, CRLF-terminated, to put on top."""
        unsigned = self.prepare(now)
        return assemble(unsigned, [field.key.sign(field.digest) for field in unsigned])

    def prepare(self, now: float) -> list[UnsignedField]:
        """:meth:`finish` up to the private-key operations, which the caller performs
        (``field.key.sign(field.digest)``, where it likes) and hands to :func:`assemble`."""
        body_hash = base64.b64encode(self._body.digest())
        signed = b"".join(
            relaxed_header(name, value)
            for name, value in select_headers(self._headers, self._header_list)
        )
        return [self._field(key, body_hash, signed, int(now)) for key in self.keys]

    def _field(
        self, key: DkimKey, body_hash: bytes, signed: bytes, timestamp: int
    ) -> UnsignedField:
        # Fixed layout: short tags first, h= on lines of its own (folded after its colons,
        # computed once per message), bh=, then b= (FWS is allowed in all, RFC 6376 §3.5).
        if self._folded_list is None:
            self._folded_list = _fold_list(self._header_list)
        unsigned = b"".join(
            (
                b"DKIM-Signature: v=1; a=",
                key.signature_algorithm,
                b"; c=relaxed/relaxed; d=",
                key.domain.encode("ascii"),
                b";\r\n\ts=",
                key.selector.encode("ascii"),
                b"; t=",
                str(timestamp).encode("ascii"),
                b";\r\n\th=",
                self._folded_list,
                b";\r\n\tbh=",
                body_hash,
                b";\r\n\tb=",
            )
        )
        # The field itself is hashed last, with an empty b= and no CRLF (RFC 6376 §3.7).
        digest = hashlib.sha256(
            signed + relaxed_header(b"DKIM-Signature", unsigned[15:])[:-2]
        ).digest()
        return UnsignedField(key, unsigned, digest)


@dataclass(frozen=True, slots=True)
class UnsignedField:
    """A DKIM-Signature field up to its ``b=`` value, and what its key must sign."""

    key: DkimKey
    text: bytes  # ends with "b="
    digest: bytes  # SHA-256 of the signed header fields and this field (RFC 6376 §3.7)


def assemble(fields: Sequence[UnsignedField], signatures: Sequence[bytes]) -> bytes:
    """The finished fields: each one's signature in base64, folded, CRLF-terminated."""
    out = []
    for field, signature in zip(fields, signatures, strict=True):
        encoded = base64.b64encode(signature)
        folded = b"\r\n\t".join(
            encoded[i : i + B64_PER_LINE] for i in range(0, len(encoded), B64_PER_LINE)
        )
        out.append(field.text + folded + b"\r\n")
    return b"".join(out)


@functools.lru_cache(maxsize=256)
def _fold_list(names: tuple[bytes, ...]) -> bytes:
    """h='s names joined by colons, a fold after a colon before a line gets too long. Most
    mail from one program has the same header fields, hence the cache."""
    lines: list[bytes] = []
    current = b""
    for name in names:
        piece = name if not current else b":" + name
        if current and len(current) + len(piece) > FOLD_AT - 8:
            lines.append(current + b":")
            current = name
        else:
            current += piece
    lines.append(current)
    return b"\r\n\t".join(lines)


class SigningSetupError(ConfigError):
    """The configured keys cannot be loaded; ``str()`` names the file and the config key."""


def build_signer(config: Config) -> DkimSigner | None:
    """The signer the configuration asks for, or None when ``[dkim] sign`` is off or there are
    no keys. Raises SigningSetupError for a key that cannot be loaded."""
    dkim = config.dkim
    if not dkim.sign:
        return None
    try:
        keys = key_store_from_config(dkim, config.data_dir)
    except KeyStoreError as exc:
        raise SigningSetupError(f"[dkim]: {exc}") from exc
    if len(keys) == 0:
        return None
    for key in keys:
        log.info("DKIM: signing for %s with %s (%s)", key.domain, key.selector, key.algorithm)
    trusted = config.relay.trusted_networks if dkim.sign_trusted_networks else ()
    return DkimSigner(keys, SigningPolicy.create(dkim.headers, dkim.oversign, trusted))
