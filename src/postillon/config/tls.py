"""``[tls]``: the listeners' certificate — configured files, a self-signed pair, or
certificates obtained and renewed automatically over ACME (RFC 8555).

Kept beside ``model.py`` (which imports it) to keep that file readable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from postillon.config.address import split_host_port

# Let's Encrypt's production directory: what `acme = true` talks to unless told otherwise.
LETS_ENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsConfig(_Frozen):
    """The certificate every TLS listener presents (STARTTLS on 25 and 587, implicit TLS on
    465, the MTA-STS policy server, the admin server with ``tls_from_server``): the
    configured ``certificate``, else one obtained over ACME (``acme = true``), else a
    self-signed one made in ``data_dir/tls``."""

    certificate: Path | None = Field(
        None, description="PEM certificate chain file (leaf first); set with private_key."
    )
    private_key: Path | None = Field(None, description="PEM private key of the certificate.")
    self_signed: bool = Field(
        True,
        description=(
            "Without a certificate, make a self-signed one in data_dir/tls so STARTTLS "
            "works out of the box (opportunistic TLS, RFC 7435). With acme = true it "
            "serves only until the first ACME certificate arrives."
        ),
    )
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        "TLSv1.2", description="The oldest TLS version the listeners accept."
    )
    acme: bool = Field(
        False,
        description=(
            "Obtain and renew the certificate automatically over ACME (RFC 8555) for the "
            "hostname and mta-sts.DOMAIN of every local domain; kept in data_dir/acme. "
            "Needs a challenge listener: [mta_sts] listen (TLS-ALPN-01, port 443) or "
            "acme_http_listen (HTTP-01, port 80)."
        ),
    )
    acme_directory: str = Field(
        LETS_ENCRYPT_DIRECTORY,
        description="The ACME server's directory URL (default: Let's Encrypt production).",
    )
    acme_email: str | None = Field(
        None,
        description=(
            "Contact address for the ACME account: the CA writes there about expiring "
            "certificates and incidents."
        ),
    )
    acme_http_listen: str | None = Field(
        None,
        description=(
            'Where to answer HTTP-01 challenges, e.g. "0.0.0.0:80" (the CA always '
            "connects to port 80); None = no HTTP-01 listener."
        ),
    )
    acme_renew_before: float | None = Field(
        None,
        gt=0,
        description=(
            "Renew when the certificate has less than this many seconds left; None = at "
            "two thirds of its lifetime (30 days before the end of a 90-day certificate)."
        ),
    )
    acme_ca_file: Path | None = Field(
        None,
        description=(
            "CA bundle to verify the ACME server's HTTPS with, instead of the system's "
            "(for a test CA such as Pebble; never needed for Let's Encrypt)."
        ),
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key must be set together")
        if self.acme and self.certificate is not None:
            raise ValueError(
                "tls.acme = true and tls.certificate are both set: choose one (ACME "
                "obtains and renews its own certificate in data_dir/acme)"
            )
        return self

    @field_validator("acme_directory")
    @classmethod
    def _https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError(f"{value!r} must be an https:// URL (RFC 8555 6.1)")
        return value

    @field_validator("acme_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and ("@" not in value or value.strip() != value or ":" in value):
            raise ValueError(f"{value!r} is not an email address, e.g. hostmaster@example.org")
        return value

    @field_validator("acme_http_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = split_host_port(value)
        if not host or not 0 < port < 65536:
            raise ValueError(f"{value!r} must be host:port, e.g. 0.0.0.0:80")
        return value


# Settings a reload applies; the others (the ACME account, its server, the challenge
# socket) are fixed for the life of the process.
RELOADABLE_TLS = frozenset(
    {"certificate", "private_key", "self_signed", "min_version", "acme_renew_before"}
)
