"""The DKIM key store: which private keys sign for which domain.

Where keys come from (both, merged):

1. The keys directory, ``[dkim] keys_dir`` (default ``<data_dir>/dkim``), laid out as
   ``<domain>/<selector>.key``, one PEM private key per file. ``postillon dkim keygen`` writes
   exactly this, so an operator needs no configuration at all: generate, publish, done.
2. ``[[dkim.key]]`` entries (``domain``, ``selector``, ``key_file``) for keys kept elsewhere,
   e.g. keys made by ``opendkim-genkey``.

The algorithm is read from the key itself (RSA or Ed25519, RFC 8463), so a file cannot claim
one algorithm and hold another. A domain may have several keys; each one signs (an RSA and an
Ed25519 key give the two signatures RFC 8463 §4 recommends during Ed25519's roll-out).

Anything else that signs (ARC sealing) uses :meth:`KeyStore.keys_for` and, for dkimpy,
:meth:`DkimKey.dkimpy_private_key`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from postillon.config.model import DkimConfig
from postillon.core.address import AddressError, domain_to_ascii
from postillon.osutil.safeio import NEW_FILE, open_dir, set_dir_owner
from postillon.signing.remote_keys import rsa_sign

log = logging.getLogger("postillon.dkim")

# cryptography and PyNaCl are imported where a key is read, made or used: a server without
# DKIM keys does not hold them (bench/README.md, "Memory").
if TYPE_CHECKING:
    import nacl.signing
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

Algorithm = Literal["rsa", "ed25519"]

KEY_SUFFIX = ".key"
# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits and SHOULD use 2048.
MIN_RSA_BITS = 1024
RSA_BITS = 2048
# A DNS TXT character-string holds at most 255 bytes (RFC 1035 §3.3.14); longer
# values (any RSA-2048 key) are split into several strings, which DKIM joins
# back (RFC 6376 §3.6.2.2).
TXT_STRING_MAX = 255


class KeyStoreError(Exception):
    """A key cannot be loaded or written; ``str()`` names the file and what to do."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key: ``d=domain``, ``s=selector``, and the private key."""

    domain: str  # lower-case A-label, no final dot
    selector: str
    private_key: PrivateKey
    path: Path
    algorithm: Algorithm = field(init=False)
    # Ed25519 signs through libsodium (PyNaCl): 20 us against OpenSSL's 32 us per signature.
    _ed25519: nacl.signing.SigningKey | None = field(init=False, repr=False, compare=False)
    # Names the key's material (helper processes hold keys by it): a hash of the public
    # key, so a reload that replaces a selector's key gets a new name.
    fingerprint: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        import nacl.signing
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        ed = isinstance(self.private_key, ed25519.Ed25519PrivateKey)
        object.__setattr__(self, "algorithm", "ed25519" if ed else "rsa")
        seed = (
            self.private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            if isinstance(self.private_key, ed25519.Ed25519PrivateKey)
            else None
        )
        object.__setattr__(self, "_ed25519", nacl.signing.SigningKey(seed) if seed else None)
        public = hashlib.sha256(self.public_key_base64().encode()).hexdigest()[:32]
        object.__setattr__(self, "fingerprint", public)

    def sign(self, digest: bytes) -> bytes:
        """The signature over a SHA-256 ``digest``: RSASSA-PKCS1-v1_5 (RFC 6376 §3.3.1), or
        PureEdDSA over the hash (RFC 8463 §3)."""
        if self._ed25519 is not None:
            return self._ed25519.sign(digest).signature
        return rsa_sign(self.private_key, digest)  # type: ignore[arg-type] # RSA: not Ed25519

    @property
    def signature_algorithm(self) -> bytes:
        """The ``a=`` tag (RFC 6376 §3.3, RFC 8463 §3)."""
        return b"ed25519-sha256" if self.algorithm == "ed25519" else b"rsa-sha256"

    @property
    def dns_name(self) -> str:
        """Where the public key is published (RFC 6376 §3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def public_key_base64(self) -> str:
        """``p=``: RSA as DER SubjectPublicKeyInfo, Ed25519 as the raw 32 bytes (RFC 8463 §4)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        public = self.private_key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    def txt_value(self) -> str:
        """The TXT record's value (RFC 6376 §3.6.1)."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_key_base64()}"

    def zone_record(self, ttl: int = 3600) -> str:
        """One zone-file line, ready to paste, with the value split into <=255-byte strings."""
        value = self.txt_value()
        strings = " ".join(
            f'"{value[i : i + TXT_STRING_MAX]}"' for i in range(0, len(value), TXT_STRING_MAX)
        )
        return f"{self.dns_name}. {ttl} IN TXT ( {strings} )"

    def dkimpy_private_key(self) -> bytes:
        """The key in the form ``dkimpy`` takes (for ARC sealing with ``dkim.arc_sign``):
        RSA as a PKCS#1 PEM, Ed25519 as the base64 of the 32-byte seed."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            seed = self.private_key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            return base64.b64encode(seed)
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )


class KeyStore:
    """The loaded keys, by domain. Immutable after construction."""

    def __init__(self, keys: Iterable[DkimKey] = ()) -> None:
        by_domain: dict[str, list[DkimKey]] = {}
        seen: set[tuple[str, str]] = set()
        for key in keys:
            ident = (key.domain, key.selector)
            if ident in seen:
                raise KeyStoreError(
                    f"two keys for selector {key.selector!r} of {key.domain} "
                    f"(the second is {key.path}); a selector names exactly one key"
                )
            seen.add(ident)
            by_domain.setdefault(key.domain, []).append(key)
        self._by_domain = {d: tuple(ks) for d, ks in sorted(by_domain.items())}

    def __iter__(self) -> Iterator[DkimKey]:
        for keys in self._by_domain.values():
            yield from keys

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._by_domain.values())

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(self._by_domain)

    def keys_for(self, domain: str) -> tuple[DkimKey, ...]:
        """The keys of exactly this domain (empty if none)."""
        return self._by_domain.get(_normalise_domain(domain) or "", ())

    def arc_sealing_key(self, domain: str) -> tuple[str, bytes] | None:
        """(selector, PEM private key) ARC seals with for ``domain``: its first RSA key.
        dkimpy seals with rsa-sha256 only (RFC 8617 §4.1.3 allows no other algorithm yet)."""
        for key in self.keys_for(domain):
            if key.algorithm == "rsa":
                return key.selector, key.dkimpy_private_key()
        return None

    def signing_keys(self, domain: str) -> tuple[DkimKey, ...]:
        """Keys for ``domain`` or, failing that, its nearest parent that has keys: mail from
        ``news.example.org`` signed with ``d=example.org`` still aligns under DMARC's relaxed
        alignment (RFC 7489 §3.1.1)."""
        name = _normalise_domain(domain)
        while name and "." in name:
            keys = self._by_domain.get(name)
            if keys:
                return keys
            name = name.split(".", 1)[1]
        return ()


def _normalise_domain(domain: str) -> str | None:
    try:
        return domain_to_ascii(domain.strip().rstrip(".")).lower()
    except (AddressError, UnicodeError, ValueError):
        return None


# -- loading ---------------------------------------------------------------------------------


def default_keys_dir(data_dir: Path, keys_dir: Path | None = None) -> Path:
    """``[dkim] keys_dir``, relative to data_dir when relative; default ``<data_dir>/dkim``."""
    if keys_dir is None:
        return data_dir / "dkim"
    return keys_dir if keys_dir.is_absolute() else data_dir / keys_dir


def load_private_key(path: Path) -> PrivateKey:
    """Read a PEM private key (PKCS#8 or PKCS#1); RSA of >= 1024 bits, or Ed25519."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyStoreError(f"{path}: cannot read the DKIM key: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyStoreError(
            f"{path}: not an unencrypted PEM private key ({exc}); "
            "make one with `postillon dkim keygen DOMAIN`"
        ) from exc
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyStoreError(
                f"{path}: RSA key of {key.key_size} bits; RFC 8301 §3.2 requires at least "
                f"{MIN_RSA_BITS} (use {RSA_BITS})"
            )
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise KeyStoreError(
        f"{path}: a {type(key).__name__}; DKIM signs with RSA or Ed25519 keys only (RFC 8463)"
    )


def load_key(domain: str, selector: str, path: Path) -> DkimKey:
    name = _normalise_domain(domain)
    if not name or "." not in name:
        raise KeyStoreError(f"{path}: {domain!r} is not a domain name")
    if not _valid_selector(selector):
        raise KeyStoreError(
            f"{path}: selector {selector!r} must be DNS labels (letters, digits, '-', '.')"
        )
    _warn_if_readable_by_others(path)
    return DkimKey(name, selector, load_private_key(path), path)


def discover_keys(keys_dir: Path) -> list[DkimKey]:
    """Every ``<keys_dir>/<domain>/<selector>.key``; a missing directory means no keys."""
    if not keys_dir.is_dir():
        return []
    keys: list[DkimKey] = []
    for domain_dir in sorted(keys_dir.iterdir()):
        if not domain_dir.is_dir():
            continue
        for path in sorted(domain_dir.glob("*" + KEY_SUFFIX)):
            keys.append(load_key(domain_dir.name, path.name[: -len(KEY_SUFFIX)], path))
    return keys


def load_key_store(keys_dir: Path, configured: Iterable[tuple[str, str, Path]] = ()) -> KeyStore:
    """The keys directory plus ``[[dkim.key]]`` entries ``(domain, selector, key_file)``."""
    keys = discover_keys(keys_dir)
    keys.extend(load_key(domain, selector, path) for domain, selector, path in configured)
    return KeyStore(keys)


def _valid_selector(selector: str) -> bool:
    labels = selector.split(".")
    return all(
        0 < len(label) <= 63
        and label.replace("-", "").isalnum()
        and label.isascii()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )


def _warn_if_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # load_private_key reports it
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("DKIM key %s is readable by other users; chmod 600 it", path)


# -- generating ------------------------------------------------------------------------------


def generate_private_key(algorithm: Algorithm) -> PrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)


def default_selector(algorithm: Algorithm, year: int, month: int) -> str:
    """A dated selector (``rsa202611``, ``ed202611``): rotating a key is then a new
    selector, and the old record can stay published until mail signed with it is delivered."""
    return f"{'ed' if algorithm == 'ed25519' else 'rsa'}{year:04d}{month:02d}"


def write_new_key(
    keys_dir: Path,
    domain: str,
    selector: str,
    algorithm: Algorithm,
    owner: tuple[int, int] | None = None,
) -> DkimKey:
    """Generate a key and write ``<keys_dir>/<domain>/<selector>.key`` (mode 0600, directory
    0700), owned by ``owner`` (uid, gid) when given so the server can read it after dropping
    root. Refuses to overwrite: a published selector must keep its key."""
    name = _normalise_domain(domain)
    if not name or "." not in name:
        raise KeyStoreError(f"{domain!r} is not a domain name")
    if not _valid_selector(selector):
        raise KeyStoreError(f"selector {selector!r} must be DNS labels (letters, digits, '-')")
    directory = keys_dir / name
    path = directory / (selector + KEY_SUFFIX)
    # Run as root in the server user's data_dir: every step goes through directory
    # descriptors opened without following links (osutil/safeio.py), so a link the user
    # put in place of a directory or of the temporary file is refused, never followed.
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.ExitStack() as fds:
        keys_fd = _open_own_dir(keys_dir, None, fds)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=keys_fd)
        dir_fd = _open_own_dir(directory, keys_fd, fds)
        try:
            os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            raise KeyStoreError(
                f"{path} exists: selector {selector!r} of {name} already has a key "
                "(choose another --selector to rotate)"
            )
        if owner is not None:
            set_dir_owner(keys_dir, owner, fd=keys_fd)
            set_dir_owner(directory, owner, fd=dir_fd)
        from cryptography.hazmat.primitives import serialization

        key = generate_private_key(algorithm)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tmp = f".{selector}.key.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, NEW_FILE, 0o600, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
        os.rename(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    return DkimKey(name, selector, key, path)


def _open_own_dir(directory: Path, parent_fd: int | None, fds: contextlib.ExitStack) -> int:
    """A no-follow descriptor of ``directory`` (its last component, relative to
    ``parent_fd`` when given), closed with ``fds``."""
    try:
        fd = open_dir(Path(directory.name) if parent_fd is not None else directory, parent_fd)
    except OSError as exc:
        raise KeyStoreError(f"{directory}: not a directory of its own ({exc.strerror})") from None
    fds.callback(os.close, fd)
    return fd


def key_store_from_config(dkim: DkimConfig, data_dir: Path) -> KeyStore:
    """The key store a configuration describes (what the server and the CLI load)."""
    return load_key_store(
        default_keys_dir(data_dir, dkim.keys_dir),
        ((k.domain, k.selector, k.key_file) for k in dkim.key),
    )
