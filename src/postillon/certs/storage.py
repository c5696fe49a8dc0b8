"""``data_dir/acme``: the ACME account key, the certificate and its key, and the status
of the last attempt. Every file is written whole (temporary name, fsync, rename) with
mode 0600: the keys are secrets, and the status names the CA's error messages."""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postillon.osutil.safeio import write_file

ACCOUNT_KEY = "account-key.pem"
CERTIFICATE = "cert.pem"  # the full chain, leaf first
PRIVATE_KEY = "key.pem"
STATUS = "status.json"


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What the server shows about a certificate (from the PEM itself)."""

    names: tuple[str, ...]
    not_before: float
    not_after: float
    issuer: str
    serial: str

    @classmethod
    def of(cls, chain_pem: bytes) -> CertificateInfo:
        cert = x509.load_pem_x509_certificate(chain_pem)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = tuple(sorted(san.value.get_values_for_type(x509.DNSName)))
        except x509.ExtensionNotFound:
            names = ()
        return cls(
            names,
            cert.not_valid_before_utc.timestamp(),
            cert.not_valid_after_utc.timestamp(),
            cert.issuer.rfc4514_string(),
            f"{cert.serial_number:x}",
        )

    def renew_at(self, renew_before: float | None) -> float:
        """When to renew: ``renew_before`` seconds before the end, else at two thirds of
        the lifetime (Let's Encrypt's advice: 30 days before the end of 90)."""
        if renew_before is not None:
            return self.not_after - renew_before
        return self.not_before + (self.not_after - self.not_before) * 2 / 3


@dataclass(slots=True)
class AcmeStatus:
    """The last attempt, for /healthz, the admin page, /metrics and ``postillon tls renew``."""

    # "none" (no ACME certificate yet), "ok", "renewing", "failing" (the old certificate
    # is served while the CA refuses or cannot be reached).
    state: str = "none"
    names: tuple[str, ...] = ()
    not_after: float | None = None
    issuer: str = ""
    last_attempt: float | None = None
    last_success: float | None = None
    last_error: str = ""
    failures: int = 0  # attempts failed in a row
    next_attempt: float | None = None
    attempts: int = 0  # every finished attempt, ok or not (``tls renew`` waits on it)
    renewals: int = 0  # certificates obtained by this process
    served_by: str = field(default="")  # "acme", "self-signed" (until the first arrives)

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["names"] = list(self.names)
        for key in ("not_after", "last_attempt", "last_success", "next_attempt"):
            value = data[key]
            if isinstance(value, float):
                data[key] = datetime.datetime.fromtimestamp(value, datetime.UTC).isoformat()
        return data


class AcmeFiles:
    """The files under ``data_dir/acme`` (made mode 0700 on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def certificate(self) -> Path:
        return self.directory / CERTIFICATE

    @property
    def private_key(self) -> Path:
        return self.directory / PRIVATE_KEY

    def _ensure(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def account_key(self) -> rsa.RSAPrivateKey:
        """The account's key, made on first use (RSA 2048: every CA takes RS256)."""
        path = self.directory / ACCOUNT_KEY
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError(f"{path}: not an RSA key")
            return key
        self._ensure()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_file(path, pem, 0o600)
        return key

    def load(self) -> tuple[bytes, bytes] | None:
        """(chain PEM, key PEM) of the certificate kept here, None if there is none."""
        try:
            return self.certificate.read_bytes(), self.private_key.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, chain_pem: bytes, key_pem: bytes) -> None:
        """Replace the certificate; the key first, so a crash between the two leaves a
        pair that does not match, which ``load`` callers check (``usable``)."""
        self._ensure()
        write_file(self.private_key, key_pem, 0o600)
        write_file(self.certificate, chain_pem, 0o600)

    def read_status(self) -> dict[str, object] | None:
        try:
            data = json.loads((self.directory / STATUS).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_status(self, status: AcmeStatus) -> None:
        self._ensure()
        write_file(self.directory / STATUS, json.dumps(status.as_dict(), indent=1).encode(), 0o600)


def usable(chain_pem: bytes, key_pem: bytes) -> bool:
    """The key belongs to the chain's first certificate (files written by a crashed save
    or copied by hand may not)."""
    try:
        cert = x509.load_pem_x509_certificate(chain_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    return bool(
        cert.public_key().public_bytes(encoding, public)
        == key.public_key().public_bytes(encoding, public)
    )
