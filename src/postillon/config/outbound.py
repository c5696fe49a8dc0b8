"""The configuration of mail going out: ``[relay]``, ``[outbound]``,
``[[transport]]`` and ``[[tls_policy]]`` (split from ``model``, which
re-exports every name here)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from postillon.core.credentials import parse_smarthost_url
from postillon.core.pins import parse_fingerprint

__all__ = ["OutboundConfig", "RelayConfig", "TlsPolicyName", "TlsPolicyRule", "TransportRule"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RelayConfig(_Frozen):
    # Clients in these networks may relay to any domain. Default: nobody (no open relay).
    trusted_networks: tuple[str, ...] = ()
    # Send all non-local mail through this host instead of looking up MX records:
    # "smtp://[user:password@]host[:port]" (STARTTLS) or "smtps://..." (implicit
    # TLS, RFC 8314). With a password, the smarthost must prove who it is before
    # AUTH: its certificate verifies for its host name against the system CAs (or
    # smarthost_ca_file), or its key matches one of smarthost_fingerprints.
    # Otherwise nothing is sent and the mail is deferred (4.7.5).
    smarthost: str | None = None
    # PEM file with the CA certificate(s) to trust for the smarthost instead of
    # the system's (a private CA, or the smarthost's self-signed certificate).
    smarthost_ca_file: Path | None = None
    # Pins: "sha256:" + the SHA-256 of the smarthost certificate's public key
    # (SubjectPublicKeyInfo), base64 or hex. When set, a matching key is the proof
    # (names, CA and expiry are not checked).
    smarthost_fingerprints: tuple[str, ...] = ()

    @field_validator("smarthost_fingerprints")
    @classmethod
    def _check_pins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pin in value:
            parse_fingerprint(pin)
        return value

    @field_validator("smarthost")
    @classmethod
    def _check_smarthost(cls, value: str | None) -> str | None:
        if value is not None:
            # The parser the server uses at start: what passes here starts.
            parse_smarthost_url(value)
        return value

    @field_validator("trusted_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a network: {net!r} (use CIDR, e.g. 192.0.2.0/24)") from exc
        return value


class OutboundConfig(_Frozen):
    concurrency: int = Field(100, ge=1)  # SMTP connections out, in total
    per_destination: int = Field(10, ge=1)  # connections to one destination at once
    messages_per_connection: int = Field(100, ge=1)  # then QUIT and reconnect
    port: int = Field(25, gt=0, lt=65536)  # MX delivery port (tests use others)
    helo_name: str | None = None  # default: hostname
    prefer_ipv6: bool = False  # try an MX host's IPv6 addresses before its IPv4 ones
    ipv4: bool = True  # connect over IPv4
    ipv6: bool = True  # connect over IPv6
    # The TLS policy for destinations without a [[tls_policy]] rule:
    # "opportunistic": STARTTLS when offered, unverified certificates accepted and
    # logged (RFC 7435); "none": never; "encrypt": defer rather than send in clear;
    # "verify": the certificate must verify for the MX host name (system CAs);
    # "required" is the old name of "encrypt". "dane" is refused with a pointer:
    # DANE applies by itself with [dns] trust_ad, [[tls_policy]] makes it mandatory.
    tls: Literal["opportunistic", "none", "encrypt", "verify", "dane", "required"] = "opportunistic"
    # MTA-STS (RFC 8461): apply the policies recipient domains publish (enforce: only
    # to the MX hosts the policy lists, over STARTTLS with a certificate valid for the
    # MX name; testing: deliver anyway and log). Policies are cached in the queue store.
    # Precedence 4 of outbound/tls_policy.py: [[tls_policy]] rules and DANE come first.
    mta_sts: bool = True
    # The CA certificates (PEM) that MTA-STS trusts, for the policy host and the MX
    # hosts, instead of the system's; for tests and private PKIs.
    sts_ca_file: Path | None = None
    # Timeouts, RFC 5321 4.5.3.2.
    connect_timeout: float = Field(30.0, gt=0)
    greeting_timeout: float = Field(300.0, gt=0)  # the 220 greeting (4.5.3.2.1: 5 min)
    command_timeout: float = Field(300.0, gt=0)  # a reply to MAIL, RCPT, ... (5 min)
    data_block_timeout: float = Field(180.0, gt=0)  # each block of the body sent (3 min)
    data_end_timeout: float = Field(600.0, gt=0)  # the reply to the final dot (10 min)
    idle_reuse: float = Field(10.0, ge=0)  # keep an idle connection this long for reuse
    # Egress (outbound/egress.py): the local addresses mail leaves from, chosen per
    # new connection "round-robin" or by "hash" of the destination; each address
    # greets with its helo_names entry (which must match its PTR), else helo_name.
    # Empty: the kernel chooses. A shaping rule's source = [...] replaces the pool.
    source_addresses: tuple[str, ...] = ()
    source_selection: Literal["round-robin", "hash"] = "round-robin"  # how a source is picked
    helo_names: dict[str, str] = Field(default_factory=dict)  # source address -> HELO name
    # Happy Eyeballs (RFC 8305 §5): the stagger between connection attempts to a
    # host's addresses (IPv6 and IPv4 interleaved), in seconds.
    happy_eyeballs_delay: float = Field(0.25, gt=0, le=2.0)

    @field_validator("source_addresses")
    @classmethod
    def _check_sources(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_ip_address(a) for a in value)

    @field_validator("helo_names")
    @classmethod
    def _check_helo_names(cls, value: dict[str, str]) -> dict[str, str]:
        names = {}
        for address, name in value.items():
            if not name or any(c.isspace() for c in name):
                raise ValueError(f"helo_names[{address!r}]: {name!r} is not a host name")
            names[_ip_address(address)] = name
        return names


def _ip_address(text: str) -> str:
    """The canonical form of an IP address (so 2001:db8::10 matches 2001:DB8:0::10)."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError as exc:
        raise ValueError(f"not an IP address: {text!r}") from exc


TlsPolicyName = Literal[
    "none", "opportunistic", "encrypt", "verify", "dane", "fingerprint", "required"
]


class TlsPolicyRule(_Frozen):
    """A per-destination TLS policy (Postfix smtp_tls_policy_maps): ``domain``
    is the next-hop destination (the recipient domain for MX delivery, the
    host of a smarthost or transport route), exact or ``.parent`` for every
    subdomain."""

    domain: str  # the destination: a domain, or ".parent" for every subdomain
    policy: TlsPolicyName  # none, opportunistic, encrypt, verify, fingerprint, dane
    # verify: names the certificate must match (any one); default the MX host name.
    match: tuple[str, ...] = ()
    # verify: PEM file with the CA certificates to trust instead of the system's.
    ca_file: Path | None = None
    # fingerprint: "sha256:" + the SPKI SHA-256 of the server's key, base64 or hex.
    fingerprints: tuple[str, ...] = ()

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        name = value.strip().lower().rstrip(".")
        labels = name.removeprefix(".").split(".")
        if not name or any(not label or " " in label for label in labels):
            raise ValueError(
                f"{value!r} is not a domain: write partner.example, or .example for every subdomain"
            )
        return name

    @field_validator("match")
    @classmethod
    def _lower_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().lower().rstrip(".") for v in value)

    @field_validator("fingerprints")
    @classmethod
    def _check_pins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pin in value:
            parse_fingerprint(pin)
        return value

    @model_validator(mode="after")
    def _keys_fit_the_policy(self) -> TlsPolicyRule:
        if self.policy == "fingerprint" and not self.fingerprints:
            raise ValueError('policy = "fingerprint" needs fingerprints = ["sha256:..."]')
        if self.fingerprints and self.policy != "fingerprint":
            raise ValueError(
                f'fingerprints are only used with policy = "fingerprint", not {self.policy!r}'
            )
        if (self.match or self.ca_file is not None) and self.policy != "verify":
            raise ValueError(
                f'match and ca_file are only used with policy = "verify", not {self.policy!r}'
            )
        return self


class TransportRule(_Frozen):
    """A per-domain route: ``domain = "example.net"`` (or ``"*"`` for all) and
    ``route`` one of ``smtp:[host]:port``, ``smtp:host`` (MX lookup of host),
    ``lmtp:host:port``, ``lmtp:unix:/path``, ``maildir``, ``discard``,
    ``error:5.x.y text``."""

    domain: str  # exact, ".parent" for subdomains, or "*"
    route: str  # where its mail goes (see above)

    @field_validator("domain")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower().rstrip(".")

    @field_validator("route")
    @classmethod
    def _check_route(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in ("smtp", "lmtp", "maildir", "discard", "error"):
            raise ValueError(
                f"route {value!r}: expected smtp:[host]:port, lmtp:host:port, lmtp:unix:/path, "
                "maildir, discard or error:5.x.y text"
            )
        if kind == "error":
            import re

            if not re.match(r"error:[45]\.\d{1,3}\.\d{1,3}( |$)", value):
                raise ValueError(
                    f"route {value!r}: write error:5.1.1 Some text (an enhanced status code)"
                )
        return value
