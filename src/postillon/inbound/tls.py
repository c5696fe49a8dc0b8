"""TLS contexts for listeners, and the self-signed certificate for first runs.

Without a configured certificate postillon still offers STARTTLS with a
self-signed certificate made once in ``data_dir/tls``: opportunistic TLS
(RFC 7435) protects against passive observers even when the certificate
cannot be verified, and SMTP senders do not verify by default.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

from postillon.osutil.safeio import write_file


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Return (certificate, key) paths, creating a self-signed pair if missing.

    The server calls this after dropping root (``app.App.start``): the directory is
    its user's, so root never writes there."""
    cert_path = directory / "selfsigned-cert.pem"
    key_path = directory / "selfsigned-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    # Only to make the pair (once): a server reading an existing one does not hold
    # cryptography for it (bench/README.md, "Memory").
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Fresh temporary names (O_EXCL|O_NOFOLLOW), then rename: a link planted under
    # either final name is replaced, never written through (osutil/safeio.py).
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file(key_path, key_pem, 0o600)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _minimum(min_version: str) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2


def server_context(
    certificate: Path, private_key: Path, min_version: str = "TLSv1.2"
) -> ssl.SSLContext:
    ctx = empty_server_context(min_version)
    ctx.load_cert_chain(certificate, private_key)
    return ctx


def empty_server_context(min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context without a certificate yet: a listener binds with it before the
    privilege drop, and the certificate made afterwards is loaded into it."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _minimum(min_version)
    # Session tickets and compression stay at the library's safe defaults.
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


@dataclass(frozen=True, slots=True)
class ServerCertificate:
    """The listeners' certificate and key files, and the oldest TLS version accepted."""

    certificate: Path
    private_key: Path
    min_version: str = "TLSv1.2"
    # A self-signed stand-in served while the first ACME order runs ([tls] acme): the
    # certificate that replaces it names every mta-sts.DOMAIN, so no warning about it.
    acme_stand_in: bool = False

    def context(self) -> ssl.SSLContext:
        return server_context(self.certificate, self.private_key, self.min_version)

    def load_into(self, ctx: ssl.SSLContext) -> None:
        """Put this certificate into a context a socket already holds (reload):
        handshakes from now on present it."""
        ctx.minimum_version = _minimum(self.min_version)
        ctx.load_cert_chain(self.certificate, self.private_key)


def describe(obj: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)`` for Received:."""
    if obj is None:
        return ""
    cipher = obj.cipher()
    version = obj.version() or "TLS"
    if not cipher:
        return version
    return f"{version} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
