"""``[tls_reports]``: SMTP TLS reporting (RFC 8460), split from ``model`` (which
re-exports it)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["TlsReportsConfig"]


class TlsReportsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    # Record each outbound MX session's TLS result and send daily reports to the
    # domains that ask for them (_smtp._tls TXT, rua=). Off by default.
    enabled: bool = False
    # organization-name in the report (RFC 8460 §4.4); default: the hostname.
    organization: str = ""
    # contact-info in the report (§4.4): an address or URL; default: the sender.
    contact: str = ""
    # From: (and envelope sender) of report mail; default noreply-tlsrpt@<hostname>.
    # Its domain is the submitter (§5.3 TLS-Report-Submitter) and is DKIM-signed
    # when [dkim] has a key for it.
    sender: str = Field(default="", alias="from")
    # The UTC hour at which the previous UTC day is reported (§4.1: UTC days).
    hour: int = 1
    # Seconds between writes of the in-memory counters to the queue store (a crash
    # loses at most this much; a stop loses nothing).
    flush_interval: float = 30.0
    # https: collectors: total seconds for one POST, and the CA file to trust
    # instead of the system's (a private collector).
    http_timeout: float = 30.0
    ca_file: Path | None = None  # PEM CA bundle for https: collectors
    # Counters older than this many days are dropped after each daily run.
    keep_days: int = 7

    @field_validator("hour")
    @classmethod
    def _hour(cls, value: int) -> int:
        if not 0 <= value <= 23:
            raise ValueError("must be an hour of the day, 0 to 23 (UTC)")
        return value

    @field_validator("flush_interval", "http_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not 0 < value <= 3600:
            raise ValueError("must be more than 0 and at most 3600 seconds")
        return value

    @field_validator("keep_days")
    @classmethod
    def _keep(cls, value: int) -> int:
        if not 2 <= value <= 366:
            raise ValueError("must be between 2 and 366 days")
        return value

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        if value and ("@" not in value or any(c.isspace() or c in "<>" for c in value)):
            raise ValueError(f"{value!r} is not an address (local@domain)")
        return value

    def sender_for(self, hostname: str) -> str:
        return self.sender or f"noreply-tlsrpt@{hostname}"
