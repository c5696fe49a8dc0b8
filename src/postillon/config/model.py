"""The configuration model: one frozen object, built once, passed to app.py.

Every field has a safe default and, where it limits something a client
controls, a comment naming the RFC rule or the reason. No module reads global
configuration; ``app.py`` hands each component the part it needs.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from postillon.config import inbound_filters as filters
from postillon.config.address import split_host_port
from postillon.config.authentication import AuthAction, AuthenticationConfig
from postillon.config.filtering import (
    ClientChecksConfig,
    DnsblConfig,
    ExplainConfig,
    UnknownClientAction,
)
from postillon.config.milter import MilterConfig, Milters, parse_milter_address
from postillon.config.mta_sts import MtaStsConfig
from postillon.config.outbound import (
    OutboundConfig,
    RelayConfig,
    TlsPolicyName,
    TlsPolicyRule,
    TransportRule,
)
from postillon.config.shaping import BackoffConfig as BackoffConfig  # re-exported
from postillon.config.shaping import ShapingRule as ShapingRule
from postillon.config.tls import TlsConfig
from postillon.config.tls_reports import TlsReportsConfig
from postillon.core.credentials import check_postgresql_url

__all__ = [
    "AuthAction",
    "AuthenticationConfig",
    "ClientChecksConfig",
    "Config",
    "DnsblConfig",
    "ExplainConfig",
    "MilterConfig",
    "MtaStsConfig",
    "OutboundConfig",
    "RelayConfig",
    "TlsConfig",
    "TlsPolicyName",
    "TlsPolicyRule",
    "TransportRule",
    "UnknownClientAction",
    "parse_milter_address",
    "split_host_port",
]


ListenerKind = Literal["smtp", "submission", "submissions", "lmtp"]


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` is a message for the operator.

    Defined beside the model (not in the loader) so that every room may raise it
    while importing only the config's model types (DESIGN.md)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ListenConfig(_Frozen):
    kind: ListenerKind = "smtp"  # smtp (MX, 25), submission (587), submissions (465), lmtp
    # "host:port", "[v6]:port", or "unix:/path" (lmtp only).
    address: str
    name: str = ""  # shown in logs; defaults to "<kind>:<address>"
    # PROXY protocol etc. come later; keep listeners minimal and explicit.

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        if value.startswith("unix:"):
            return value
        host, port = split_host_port(value)
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {value!r}")
        if not host:
            raise ValueError(f"address {value!r} needs a host, e.g. 127.0.0.1:25")
        return value

    @property
    def label(self) -> str:
        return self.name or f"{self.kind}:{self.address}"


class LimitsConfig(_Frozen):
    message_size: int = Field(52_428_800, ge=0)  # RFC 1870 SIZE; 0 = unlimited
    recipients: int = Field(1000, ge=100)  # RFC 5321 4.5.3.1.8: accept at least 100
    # Transactions per connection (RFC 9422 MAILMAX, advertised with RCPTMAX); 0 = no limit.
    messages_per_connection: int = Field(0, ge=0)
    connections: int = Field(1000, ge=1)  # total inbound sessions at once
    connections_per_ip: int = Field(50, ge=1)  # inbound sessions from one client address at once
    errors: int = Field(20, ge=1)  # 4xx/5xx replies before 421 and close
    command_line: int = Field(2048, ge=512)  # RFC 5321 4.5.3.1.4 says 512; extensions add more
    # RFC 5321 4.5.3.2: server timeout should be at least 5 minutes.
    command_timeout: float = Field(300.0, gt=0)
    data_timeout: float = Field(600.0, gt=0)  # one read during DATA/BDAT (4.5.3.2.7 asks 10 min)
    session_timeout: float = Field(3600.0, gt=0)  # whole connection, against slow-drip clients
    # More Received: headers than this means a mail loop (RFC 5321 6.3); the
    # message is refused at end of data with 554 5.4.6 (Postfix: hopcount_limit).
    max_hops: int = Field(50, ge=10)


class DomainConfig(_Frozen):
    name: str  # the domain (mail to any address @name is local)
    catch_all: str | None = None  # local part that receives unknown local parts
    # Existing local parts. postmaster is always accepted (RFC 5321 4.5.1).
    mailboxes: tuple[str, ...] = ()
    aliases: dict[str, tuple[str, ...]] = Field(default_factory=dict)  # local part -> targets

    @field_validator("name")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower().rstrip(".")


class AliasesConfig(_Frozen):
    # Files in /etc/aliases format ("name: target, target"); applied to every local domain.
    files: tuple[Path, ...] = ()
    # Extra entries, same meaning: {"root" = ["alice"]}.
    map: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    recipient_delimiter: str = "+"  # sub-addressing: alice+tag@ delivers to alice


class QueueConfig(_Frozen):
    # "sqlite": the embedded queue in data_dir; "postgresql": one queue shared by
    # several nodes, at ``dsn`` (docs/cluster.md).
    store: Literal["sqlite", "postgresql"] = "sqlite"
    dsn: str | None = None  # postgresql://user:password@host:port/database
    first_retry: float = Field(300.0, gt=0)  # seconds before the first retry
    max_retry: float = Field(3600.0, gt=0)  # longest wait between retries (backoff)
    lifetime: float = Field(5 * 86400.0, gt=0)  # then bounce (Postfix maximal_queue_lifetime)
    concurrency: int = Field(50, ge=1)  # deliveries in flight at once
    lease: float = Field(300.0, gt=0)  # claimed work returns to the queue after this
    # A runner whose heartbeat is older than this is dead: the other nodes (or this
    # node's next process) take over its leases at once, not after ``lease``.
    node_timeout: float = Field(30.0, gt=0)
    # Tell the sender once when a message has waited this long (0 = never).
    delay_warning: float = Field(4 * 3600.0, ge=0)

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> QueueConfig:
        if self.store == "postgresql" and not self.dsn:
            raise ValueError('dsn is required when store = "postgresql" (postgresql://...)')
        if self.dsn:
            check_postgresql_url(self.dsn)
        if self.dsn and self.store != "postgresql":
            raise ValueError('dsn is set but store is not "postgresql"')
        return self


class LogConfig(_Frozen):
    format: Literal["text", "json"] = "text"  # one line per event: text or JSON
    file: Path | None = None  # None = stderr; same as target = "file:/path"
    level: Literal["debug", "info", "warning", "error"] = "info"  # least severe level logged
    # Where the log goes: "stderr", "file:/path" (reopened on SIGHUP for
    # logrotate), "syslog" (the local syslog socket /dev/log) or
    # "syslog:/path/to/socket". Unset: `file` if given, else stderr.
    target: str | None = None
    # Syslog message framing: RFC 5424 (structured, ISO timestamps) or the
    # traditional BSD format of RFC 3164 that every syslogd understands.
    syslog_format: Literal["rfc5424", "rfc3164"] = "rfc3164"
    syslog_facility: Literal[  # the syslog facility of every line
        "mail",
        "daemon",
        "user",
        "local0",
        "local1",
        "local2",
        "local3",
        "local4",
        "local5",
        "local6",
        "local7",
    ] = "mail"

    @field_validator("target")
    @classmethod
    def _check_target(cls, value: str | None) -> str | None:
        if value is None or value in ("stderr", "syslog"):
            return value
        kind, _, rest = value.partition(":")
        if kind in ("file", "syslog") and rest:
            return value
        raise ValueError(
            f'log.target {value!r}: use "stderr", "file:/path", "syslog" '
            'or "syslog:/path/to/socket"'
        )

    @property
    def destination(self) -> tuple[Literal["stderr", "file", "syslog"], Path | None]:
        """Where to write: ("stderr", None), ("file", path) or ("syslog", socket path)."""
        target = self.target
        if target is None:
            return ("file", self.file) if self.file is not None else ("stderr", None)
        if target == "stderr":
            return ("stderr", None)
        if target == "syslog":
            return ("syslog", Path("/dev/log"))
        kind, _, rest = target.partition(":")
        return ("file" if kind == "file" else "syslog", Path(rest))


class ShutdownConfig(_Frozen):
    """SIGTERM: stop accepting, let sessions in DATA and deliveries in flight
    finish, hand the rest back to the queue, exit."""

    # How long sessions in a transaction and deliveries in flight may take
    # to finish (each) before they are cut off; cut-off mail stays queued.
    grace: float = Field(30.0, ge=0)


class DnsConfig(_Frozen):
    nameservers: tuple[str, ...] = ()  # "127.0.0.1:5353"; empty = the system's resolver
    timeout: float = Field(5.0, gt=0)  # per try and server
    attempts: int = Field(2, ge=1)  # tries per query and nameserver
    # The nameservers validate DNSSEC and the path to them cannot be tampered with (a
    # resolver on this machine), so the AD bit of their replies is believed. It turns DANE
    # (RFC 7672) on for outbound mail. Never for a resolver across the network: anyone on
    # the path can set AD (RFC 7672 §2.1.1, RFC 6698 §4.1).
    trust_ad: bool = False


class SubmissionConfig(_Frozen):
    """Mail from authenticated users (RFC 6409 message submission)."""

    # May an authenticated user use addresses it does not own in MAIL FROM and
    # From:? "enforce" refuses (553 5.7.1 at MAIL, 550 5.7.1 at end of data),
    # "warn" accepts and logs, "off" does not check.
    sender_policy: Literal["off", "warn", "enforce"] = "enforce"
    # Per user, so a stolen password cannot turn the server into a spam
    # cannon; over the limit: 450 4.7.1 at MAIL, 452 4.5.3 at RCPT. 0 = unlimited.
    messages_per_hour: int = Field(500, ge=0)
    recipients_per_hour: int = Field(2000, ge=0)  # per user
    # Per client IP (IPv6 counted per /64) on submission listeners; 0 = unlimited.
    ip_messages_per_hour: int = Field(1000, ge=0)
    # Received: of submitted mail names no client IP (the user's home address
    # is nobody's business; the Received: line keeps the HELO name and auth).
    hide_client_ip: bool = True
    # The accounts file (`postillon user ...`); None = <data_dir>/accounts.json.
    accounts_file: Path | None = None


class DkimKeyConfig(_Frozen):
    """A signing key kept outside the keys directory (e.g. made by opendkim-genkey)."""

    domain: str  # the signing domain (d=)
    selector: str  # the DNS name: <selector>._domainkey.<domain>
    key_file: Path  # PEM, RSA (>= 1024 bits, 2048 advised) or Ed25519; the type is read from it

    @field_validator("domain")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower().rstrip(".")


# RFC 6376 §5.4.1's list, minus what breaks on the way (nothing here is rewritten by
# mailing lists more than the body is).
DKIM_SIGNED_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post", "list-owner",
    "list-archive", "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc",
    "resent-message-id",
)  # fmt: skip
# Signed once more than they occur (RFC 6376 §8.15), so nobody can add a second From:,
# Subject:, ... on the way without breaking the signature.
DKIM_OVERSIGNED_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "to", "cc", "message-id",
    "mime-version", "content-type", "content-transfer-encoding",
)  # fmt: skip


class DkimConfig(_Frozen):
    """DKIM signing of outgoing mail (RFC 6376, RFC 8463)."""

    # Sign mail from local and authenticated senders whose From: domain has a key.
    sign: bool = True
    # Where `postillon dkim keygen` writes and the server finds keys:
    # <keys_dir>/<domain>/<selector>.key. None = <data_dir>/dkim; relative = under data_dir.
    keys_dir: Path | None = None
    # Keys kept elsewhere, in addition to the keys directory.
    key: tuple[DkimKeyConfig, ...] = ()
    # Also sign mail relayed for [relay] trusted_networks (web apps, printers on
    # the LAN: OpenDKIM's InternalHosts). Mail from anyone else on port 25 is never signed.
    sign_trusted_networks: bool = True
    headers: tuple[str, ...] = DKIM_SIGNED_HEADERS  # header fields signed
    oversign: tuple[str, ...] = DKIM_OVERSIGNED_HEADERS  # signed once more than they occur

    @field_validator("headers", "oversign")
    @classmethod
    def _header_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = tuple(v.strip().lower() for v in value)
        for name in names:
            if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
                raise ValueError(f"{name!r} is not a header field name (RFC 5322 2.2)")
            if name in ("received", "return-path", "dkim-signature", "bcc"):
                raise ValueError(f"{name!r} must not be signed (RFC 6376 5.4)")
        return names

    @model_validator(mode="after")
    def _from_signed(self) -> DkimConfig:
        if "from" not in self.headers:
            raise ValueError("dkim.headers must include 'from' (RFC 6376 5.4)")
        return self


class AdminConfig(_Frozen):
    """The admin HTTP server (JSON API, web page, metrics). Off unless ``listen`` is set."""

    # "127.0.0.1:8025"; None = no admin server. A non-loopback address needs TLS:
    # the token travels in every request.
    listen: str | None = None
    # TLS for the admin server: its own certificate and key, or (tls_from_server)
    # the mail server's [tls] certificate (or its self-signed one).
    tls_cert: Path | None = None
    tls_key: Path | None = None  # its private key
    tls_from_server: bool = False  # use the [tls] certificate
    # Per-message history (received, each delivery attempt) is kept this long.
    history_days: float = Field(7.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = split_host_port(value)
        if not host or not 0 < port < 65536:
            raise ValueError(f"admin.listen {value!r} must be host:port, e.g. 127.0.0.1:8025")
        return value

    @model_validator(mode="after")
    def _tls_for_remote(self) -> AdminConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("admin.tls_cert and admin.tls_key must be set together")
        if self.listen is None or self.tls_enabled:
            return self
        host = split_host_port(self.listen)[0]
        if not _is_loopback(host):
            raise ValueError(
                f"admin.listen = {self.listen!r} is not a loopback address and the admin "
                "server has no TLS: set admin.tls_cert and admin.tls_key, or "
                "admin.tls_from_server = true (the token must not cross a network in clear)"
            )
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None or self.tls_from_server


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


class Config(_Frozen):
    hostname: str = "localhost"  # this server's name: EHLO, Received:, DSNs, the MX
    data_dir: Path = Path("./var")  # queue, mail, keys, certificates
    # Drop to this user after binding ports when started as root.
    user: str = "postillon"
    # Processes beside the server for its CPU-bound cryptography (postillon.helpers):
    # verifying inbound DKIM signatures and making RSA signatures for outgoing mail.
    # The server's event loop is its limit, and that work costs more than the rest of
    # accepting a message. "auto": one on a machine with more than one CPU, else none
    # (0: the server does the work itself).
    helper_processes: int | Literal["auto"] = "auto"
    listen: tuple[ListenConfig, ...] = (ListenConfig(kind="smtp", address="127.0.0.1:2525"),)
    tls: TlsConfig = TlsConfig()
    relay: RelayConfig = RelayConfig()
    limits: LimitsConfig = LimitsConfig()
    domain: tuple[DomainConfig, ...] = ()
    aliases: AliasesConfig = AliasesConfig()
    queue: QueueConfig = QueueConfig()
    log: LogConfig = LogConfig()
    dns: DnsConfig = DnsConfig()
    outbound: OutboundConfig = OutboundConfig()
    transport: tuple[TransportRule, ...] = ()
    tls_policy: tuple[TlsPolicyRule, ...] = ()
    submission: SubmissionConfig = SubmissionConfig()
    authentication: AuthenticationConfig = AuthenticationConfig()
    dkim: DkimConfig = DkimConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    admin: AdminConfig = AdminConfig()
    mta_sts: MtaStsConfig = MtaStsConfig()
    tls_reports: TlsReportsConfig = TlsReportsConfig()
    # Port-25 protection and the decision trace (config/filtering.py, docs/filtering.md).
    dnsbl: DnsblConfig = DnsblConfig()
    client_checks: ClientChecksConfig = ClientChecksConfig()
    explain: ExplainConfig = ExplainConfig()
    milter: Milters = ()  # [[milter]], in order (config/milter.py, docs/milter.md)
    greylist: filters.GreylistConfig = filters.GreylistConfig()
    smtp_rate_limits: filters.SmtpRateLimitsConfig = filters.SmtpRateLimitsConfig()
    policy_service: filters.PolicyServices = ()
    dmarc_reports: filters.DmarcReportsConfig = filters.DmarcReportsConfig()
    shaping: tuple[ShapingRule, ...] = ()  # [[shaping]], config/shaping.py
    backoff: BackoffConfig = BackoffConfig()

    @field_validator("helper_processes")
    @classmethod
    def _processes(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 64:
            raise ValueError('must be between 0 and 64, or "auto"')
        return value

    def helper_process_count(self) -> int:
        """``helper_processes`` with "auto" resolved for this machine."""
        if self.helper_processes == "auto":
            return 1 if (os.cpu_count() or 1) > 1 else 0
        return self.helper_processes

    @model_validator(mode="after")
    def _unique_domains(self) -> Config:
        seen: set[str] = set()
        for d in self.domain:
            if d.name in seen:
                raise ValueError(f"domain {d.name!r} is configured twice")
            seen.add(d.name)
        return self

    @model_validator(mode="after")
    def _tls_policies(self) -> Config:
        seen: set[str] = set()
        for i, rule in enumerate(self.tls_policy):
            if rule.domain in seen:
                raise ValueError(f"tls_policy[{i}]: domain {rule.domain!r} has two rules")
            seen.add(rule.domain)
        if self.outbound.tls == "dane":
            # DANE is not a default: with trust_ad it applies by itself to every MX
            # destination that publishes it (outbound/tls_policy.py, precedence 3);
            # "dane for everyone" would defer all mail to unsigned domains.
            raise ValueError(
                'outbound.tls: "dane" is not a default: with [dns] trust_ad = true DANE '
                "applies to every destination that publishes it; to require it for one, "
                'add [[tls_policy]] domain = "..." policy = "dane"'
            )
        # DANE rests on DNSSEC: only a validating resolver's AD bit may be
        # trusted ([dns] trust_ad); never by default (RFC 7672 §2.1.1).
        for i, r in enumerate(self.tls_policy):
            if r.policy == "dane" and self.dns.trust_ad is not True:
                raise ValueError(
                    f"tls_policy[{i}] ({r.domain}): policy dane needs [dns] trust_ad = true"
                )
        return self

    def deprecations(self) -> list[str]:
        """Old spellings still accepted, each with its key and the new value
        (printed by check-config, logged at start)."""
        notes = []
        if self.outbound.tls == "required":
            notes.append(
                'outbound.tls = "required" is deprecated: write tls = "encrypt" '
                "(same meaning: TLS or no delivery, any certificate)"
            )
        for i, rule in enumerate(self.tls_policy):
            if rule.policy == "required":
                notes.append(
                    f'tls_policy[{i}] ({rule.domain}): policy = "required" is deprecated: '
                    'write policy = "encrypt"'
                )
        return notes

    @model_validator(mode="after")
    def _admin_tls_source(self) -> Config:
        if self.admin.tls_from_server and self.tls.certificate is None and not self.tls.self_signed:
            raise ValueError(
                "admin.tls_from_server = true needs a server certificate: set tls.certificate "
                "and tls.private_key, or tls.self_signed = true"
            )
        return self

    @model_validator(mode="after")
    def _acme_challenge(self) -> Config:
        if not self.tls.acme:
            return self
        if self.mta_sts.listen is None and self.tls.acme_http_listen is None:
            raise ValueError(
                "tls.acme = true needs a challenge listener: set mta_sts.listen (TLS-ALPN-01 "
                'on port 443, e.g. "0.0.0.0:443") or tls.acme_http_listen (HTTP-01 on port 80)'
            )
        if "." not in self.hostname.strip(".") or self.hostname.endswith(".localhost"):
            raise ValueError(
                f"tls.acme = true needs hostname to be the server's public DNS name "
                f"(it is {self.hostname!r}): a CA issues certificates for public names only"
            )
        return self

    @model_validator(mode="after")
    def _mta_sts_certificate(self) -> Config:
        if (
            self.mta_sts.listen is not None
            and self.tls.certificate is None
            and not (self.tls.self_signed)
        ):
            raise ValueError(
                "mta_sts.listen is set but the server has no certificate to serve the "
                "policy with (RFC 8461 3.3: HTTPS only): set tls.certificate and "
                "tls.private_key, or tls.self_signed = true"
            )
        return self

    @property
    def mta_sts_mx(self) -> tuple[str, ...]:
        """The policy's MX patterns: ``[mta_sts] mx``, else this server's hostname."""
        if self.mta_sts.mx is not None:
            return self.mta_sts.mx
        return (self.hostname.strip().lower().rstrip("."),)

    @property
    def local_domains(self) -> frozenset[str]:
        return frozenset(d.name for d in self.domain)
