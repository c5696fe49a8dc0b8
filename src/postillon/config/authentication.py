"""``[authentication]``: SPF, DKIM, DMARC and ARC checks of inbound mail (checks/).

Split from ``model.py`` (one file per group of sections, each under 600 lines);
``model.AuthenticationConfig`` still names it."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AuthAction", "AuthenticationConfig"]

AuthAction = Literal["reject", "quarantine", "accept"]


class AuthenticationConfig(BaseModel):
    """Inbound SPF/DKIM/DMARC/ARC checks on SMTP (MX) listeners (RFC 7208, 6376,
    7489, 8617). Submission, authenticated and local mail is never checked.

    Actions: "reject" refuses at end of data (550 5.7.1, or 5.7.23 for SPF);
    "quarantine" accepts and adds ``quarantine_header``; "accept" only records
    the result in Authentication-Results. The defaults are a cautious
    operator's: honour the sender domain's own DMARC policy, never reject on
    SPF alone (forwarding breaks SPF), and answer a DNS failure with 451 so the
    sender retries instead of having mail refused or let through unchecked.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True  # check SMTP (MX) listeners at all
    # DMARC p=reject / p=quarantine failures (the domain owner asked for this).
    dmarc_reject: AuthAction = "reject"
    dmarc_quarantine: AuthAction = "quarantine"  # p=quarantine failures
    # SPF "fail" (-all) when DMARC did not pass (or the domain has no DMARC).
    spf_fail: AuthAction = "quarantine"
    # A DNS failure that leaves a verdict open: "defer" = 451 4.7.x, "accept".
    temperror: Literal["defer", "accept"] = "defer"
    # Clients in these networks, and mail whose MAIL FROM or From: domain is
    # listed (or a subdomain of one), are never rejected or quarantined; their
    # results are still recorded. Networks in CIDR, domains as names.
    allow_networks: tuple[str, ...] = ()
    allow_domains: tuple[str, ...] = ()  # never rejected or quarantined
    # Clients in [relay] trusted_networks are our own senders (they may relay):
    # their mail is not checked unless this is true.
    check_trusted_networks: bool = False
    # Forwarders (ARC sealing domains, RFC 8617 7.2) whose ARC chain may
    # override a local DMARC failure when their seal says dmarc=pass.
    arc_trusted_sealers: tuple[str, ...] = ()
    quarantine_header: str = "X-Postillon-Quarantine"  # added by "quarantine"
    # Messages larger than this get SPF only (DKIM is not verified: its body hash
    # is computed streaming, so this bounds CPU, not memory); DMARC then relies on
    # SPF and never acts on a failure.
    max_verify_size: int = Field(52_428_800, ge=0)
    # Messages up to this size are read into memory whole for verification, as ARC
    # (dkimpy) needs; larger ones are DKIM-verified streaming from the spool and get
    # no ARC verification (arc=none, "message too large for ARC") nor ARC seal.
    max_arc_size: int = Field(1024 * 1024, ge=0)
    # Messages verified at once (each may hold max_arc_size in memory: 16 x
    # 1 MiB by default). A message that finds every slot taken waits up to
    # verify_wait seconds (well within the 10 minutes a client waits for the
    # reply to its final dot, RFC 5321 4.5.3.2.6), then gets 451 4.3.2 and
    # nothing is queued; the client retries later.
    max_verify_concurrency: int = Field(16, ge=1)
    verify_wait: float = Field(60.0, gt=0)  # seconds to wait for a slot
    # Seal forwarded mail (aliases to other domains) with ARC (RFC 8617 5.1)
    # using the forwarding domain's DKIM RSA key, when it has one.
    arc_seal: bool = True

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "verify_processes" in data:
            raise ValueError(
                "authentication.verify_processes is now helper_processes, at the top "
                "level: the helper processes also make RSA signatures"
            )
        return data

    @field_validator("allow_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a network: {net!r} (use CIDR, e.g. 192.0.2.0/24)") from exc
        return value

    @field_validator("allow_domains", "arc_trusted_sealers")
    @classmethod
    def _lower_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d.strip().lower().rstrip(".") for d in value)

    @field_validator("quarantine_header")
    @classmethod
    def _check_header_name(cls, value: str) -> str:
        if not value or any(not (33 <= ord(c) <= 126) or c == ":" for c in value):
            raise ValueError(f"{value!r} is not a header field name (RFC 5322 2.2)")
        return value
