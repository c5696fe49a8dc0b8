"""``[greylist]``, ``[smtp_rate_limits]``, ``[[policy_service]]`` and ``[dmarc_reports]``:
port-25 filters and DMARC aggregate reports, split from ``model`` (which re-exports them).

Durations are seconds. Every limit is enforced with state in the queue store, so a
restart keeps it and every node of a cluster shares it (docs/greylisting.md,
docs/dmarc-reports.md).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DmarcReportsConfig",
    "GreylistConfig",
    "PolicyServiceConfig",
    "PolicyServices",
    "SmtpRateLimitsConfig",
]

DAY = 86400


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class GreylistConfig(_Frozen):
    # Answer the first attempt of an unknown (client network, sender, recipient) with
    # 450 4.7.1 and accept a retry after `delay` seconds (port 25 only). Off by default.
    enabled: bool = False
    delay: float = Field(300.0, ge=0, le=DAY)  # seconds before a retry is accepted
    # A triplet (or an auto-allowed client) not seen for this long is forgotten; 35
    # days covers a monthly newsletter (postgrey's max-age).
    expiry: float = Field(35 * DAY, gt=0, le=366 * DAY)
    # A client network that passed this many triplets skips greylisting (it has shown
    # it retries); 0 = never.
    auto_allow_after: int = Field(5, ge=0)
    # The client network a triplet names: a pool of outbound servers retries from
    # another address of the same /24 (IPv4) or /64 (IPv6).
    ipv4_prefix: int = Field(24, ge=8, le=32)
    ipv6_prefix: int = Field(64, ge=16, le=128)  # the IPv6 client network a triplet names


class SmtpRateLimitsConfig(_Frozen):
    """Port-25 rate limits ([submission] has its own, per user)."""

    # The counting window: each limit is "at most N per `window` seconds" (fixed
    # windows aligned to the epoch). 0 below = no such limit.
    window: int = Field(3600, ge=10, le=7 * DAY)
    # Per client network (IPv4 per `ipv4_prefix`, IPv6 per `ipv6_prefix`).
    client_messages: int = Field(0, ge=0)
    client_recipients: int = Field(0, ge=0)  # recipients per client network per window
    # Per envelope sender domain (the null sender counts as "<>").
    sender_domain_messages: int = Field(0, ge=0)
    sender_domain_recipients: int = Field(0, ge=0)  # recipients per sender domain per window
    ipv4_prefix: int = Field(32, ge=8, le=32)  # the IPv4 client network counted as one
    ipv6_prefix: int = Field(64, ge=16, le=128)  # the IPv6 client network counted as one

    @property
    def enabled(self) -> bool:
        return any(
            (
                self.client_messages,
                self.client_recipients,
                self.sender_domain_messages,
                self.sender_domain_recipients,
            )
        )


PolicyPhase = Literal["mail", "rcpt", "data", "end_of_data"]


class PolicyServiceConfig(_Frozen):
    """One Postfix-style policy server (SMTPD_POLICY_README: postgrey, policyd-spf, ...)."""

    name: str  # shown in the log, the explain trace and metrics
    # "inet:HOST:PORT" (an IPv6 host in brackets) or "unix:/path/to/socket".
    address: str
    # The listener kinds whose sessions ask this server (port 25 by default).
    listeners: tuple[Literal["smtp", "submission", "submissions", "lmtp"], ...] = ("smtp",)
    # When the server is asked (Postfix protocol_state): "rcpt" (RCPT, the usual
    # place, as check_policy_service in smtpd_recipient_restrictions), "mail",
    # "data", "end_of_data" (END-OF-MESSAGE, with the size).
    phase: PolicyPhase = "rcpt"
    # Seconds for one request/answer (connect included).
    timeout: float = Field(10.0, gt=0, le=300)
    # What happens when the server is down, slow, or answers garbage (as [[milter]]):
    # tempfail = 451 4.3.0, accept = go on, reject = 550 5.7.1.
    default_action: Literal["tempfail", "accept", "reject"] = "tempfail"

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        kind, _, rest = value.partition(":")
        if kind == "unix" and rest.startswith("/"):
            return value
        if kind == "inet":
            host, _, port = rest.rpartition(":")
            if host and port.isdigit() and 0 < int(port) < 65536:
                return value
        raise ValueError(f'{value!r}: expected "inet:HOST:PORT" or "unix:/path"')


def _unique_names(services: tuple[PolicyServiceConfig, ...]) -> tuple[PolicyServiceConfig, ...]:
    names = [s.name for s in services]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"policy service name {name!r} is used twice")
    return services


# [[policy_service]]: each name once (it names the check in logs and explain traces).
PolicyServices = Annotated[tuple[PolicyServiceConfig, ...], AfterValidator(_unique_names)]


class DmarcReportsConfig(_Frozen):
    """DMARC aggregate reports (RFC 7489 §7.2) about the mail this server received."""

    # Record each DMARC evaluation of a domain that asks for reports (rua=) and send
    # each such domain its daily report. Off by default.
    enabled: bool = False
    # <org_name> in the report; default: the hostname.
    organization: str = ""
    # <email> in the report (a contact address); default: the sender.
    contact: str = ""
    # From: and envelope sender of report mail; default noreply-dmarc@<hostname>.
    # DKIM-signed when [dkim] has a key for its domain.
    sender: str = Field(default="", alias="from")
    # The UTC hour at which the previous UTC day is reported.
    hour: int = Field(1, ge=0, le=23)
    # Seconds between writes of the in-memory counters to the queue store.
    flush_interval: float = Field(30.0, gt=0, le=3600)
    # Counters older than this many days are dropped after each daily run.
    keep_days: int = Field(7, ge=2, le=366)
    # A report bigger than this (gzipped) is not mailed to a rua= destination whose
    # "!size" limit is smaller (RFC 7489 §6.2); this is the cap when none is given.
    max_report_size: int = Field(10 * 1024 * 1024, ge=1024)

    @field_validator("sender")
    @classmethod
    def _sender(cls, value: str) -> str:
        if value and ("@" not in value or any(c.isspace() or c in "<>" for c in value)):
            raise ValueError(f"{value!r} is not an address (local@domain)")
        return value

    def sender_for(self, hostname: str) -> str:
        return self.sender or f"noreply-dmarc@{hostname}"
