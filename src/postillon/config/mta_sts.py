"""``[mta_sts]``: serving this server's own MTA-STS policy (RFC 8461 §3.2, §3.3).

Kept beside ``model.py`` (which imports it) to keep that file readable.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from postillon.config.address import split_host_port


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# RFC 8461 §3.2: max_age is at most 31557600 seconds (a year).
MTA_STS_MAX_AGE_LIMIT = 31_557_600
# An MX pattern of a policy (RFC 8461 §3.2, §4.1): a host name, or "*." and a name.
_MX_PATTERN = re.compile(
    r"(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
)


class MtaStsConfig(_Frozen):
    """Serving this server's own MTA-STS policy (RFC 8461 §3.2, §3.3) for its local
    domains at ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``. Off unless
    ``listen`` is set; the certificate is the mail server's ([tls] or the self-signed
    one), so it must also name ``mta-sts.DOMAIN`` for senders to accept the policy
    (with [tls] acme = true it does: the ACME order names every ``mta-sts.DOMAIN``)."""

    # "0.0.0.0:443"; None = not served. Port 443 is bound before dropping root.
    listen: str | None = None
    # RFC 8461 §5: start with "testing" (failures are reported, not enforced), then
    # "enforce"; "none" withdraws a policy (§8.3).
    mode: Literal["enforce", "testing", "none"] = "testing"
    # How long senders cache the policy (§3.2); a week, as the RFC's examples use.
    max_age: int = 604_800
    # The MX host patterns (§3.2 "mx:"); None = this server's hostname, the MX that
    # `postillon dns records` publishes. Add a backup MX or "*.example.org" here.
    mx: tuple[str, ...] | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = split_host_port(value)
        if not host or not 0 < port < 65536:
            raise ValueError(f"{value!r} must be host:port, e.g. 0.0.0.0:443")
        return value

    @field_validator("max_age")
    @classmethod
    def _check_max_age(cls, value: int) -> int:
        if not 0 <= value <= MTA_STS_MAX_AGE_LIMIT:
            raise ValueError(
                f"{value} is not 0 to {MTA_STS_MAX_AGE_LIMIT} seconds "
                "(RFC 8461 3.2; a week, 604800, is usual)"
            )
        return value

    @field_validator("mx")
    @classmethod
    def _check_mx(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        patterns = tuple(v.strip().lower().rstrip(".") for v in value)
        for pattern in patterns:
            if not _MX_PATTERN.fullmatch(pattern):
                raise ValueError(
                    f"{pattern!r} is not a host name or '*.' and a name (RFC 8461 3.2)"
                )
        return patterns

    @model_validator(mode="after")
    def _mx_for_mode(self) -> MtaStsConfig:
        if self.mx is not None and not self.mx and self.mode != "none":
            raise ValueError(
                f"mta_sts.mx is empty: mode {self.mode} needs at least one MX pattern "
                "(RFC 8461 3.2); leave mx out for this server's hostname"
            )
        return self
