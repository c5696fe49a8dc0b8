"""Building components from a Config: the part of the composition root that start and
reload share.

``app.App.start`` builds everything once with these; ``reload.Reloader`` builds the
reloadable parts again from a new config and hands them to the running components'
``reconfigure``. Nothing here starts a task or keeps state beyond what a builder
must share between builds (one AUTH failure budget, metrics per listener).
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from postillon.checks.authentication import DmarcObserver, InboundAuthentication
from postillon.checks.base import TraceSink
from postillon.checks.context import ListenerKind
from postillon.checks.parts import PipelineParts
from postillon.checks.pipeline import Pipeline, build_pipeline
from postillon.checks.rate_limit import SubmissionRateLimits
from postillon.checks.relay import RelayPolicy
from postillon.config.loader import ConfigError
from postillon.config.model import Config
from postillon.core.clock import SystemClock
from postillon.core.pins import parse_fingerprint
from postillon.delivery.retry import RetryPolicy
from postillon.dns.dnspython_resolver import DnsResolver
from postillon.dns.resolver import Resolver
from postillon.helpers.pool import HelperPool
from postillon.inbound.accounts import AccountStore, accounts_path
from postillon.inbound.auth import DEFAULT_MECHANISMS, Authenticator, AuthGuard
from postillon.inbound.listener import Listener
from postillon.inbound.session import SessionDeps
from postillon.inbound.tls import ServerCertificate, ensure_self_signed
from postillon.intake.intake import Intake
from postillon.local.maildir import MaildirDelivery
from postillon.local.transport import MaildirTransport
from postillon.observability.maillog import MailLog
from postillon.observability.metrics import ListenerMetrics, Metrics
from postillon.outbound.client_session import ClientTimeouts
from postillon.outbound.dane_policy import DaneHook
from postillon.outbound.egress import EgressSettings
from postillon.outbound.shaping import Shaper
from postillon.outbound.smtp_transport import OutboundSettings, SmtpTransport
from postillon.outbound.sts_policies import StsPolicies
from postillon.outbound.tls_observer import TlsObserver
from postillon.outbound.tls_policy import DefaultMode, PolicyRule, TlsMode, TlsPolicyTable
from postillon.paths import acme_dir, queue_path, tls_dir
from postillon.protocol.server import ServerSettings
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import QueueStore
from postillon.routing.aliases import load_aliases
from postillon.routing.local import LocalRecipients
from postillon.routing.router import NextHop, Router, TransportEntry, parse_smarthost
from postillon.signing.keys import key_store_from_config
from postillon.signing.signer import DkimSigner, build_signer
from postillon.tlsrpt.report import ReportSettings
from postillon.tlsrpt.reporter import ReporterSettings, ReportIntake, TlsReporter


def open_queue_store(config: Config) -> QueueStore:
    """The queue store the config names: the embedded SQLite file, or PostgreSQL at ``dsn``."""
    if config.queue.store == "postgresql":
        assert config.queue.dsn is not None  # the config model requires it
        # Imported here: asyncpg and the PostgreSQL store cost ~3 MiB that the default
        # (SQLite) store never needs. Called before privileges are dropped.
        from postillon.queue.postgres_store import PostgresStore

        return PostgresStore(config.queue.dsn)
    queue_path(config).parent.mkdir(parents=True, exist_ok=True)
    return SqliteStore(queue_path(config))


def queue_available(store: QueueStore) -> Callable[[], bool]:
    """How listeners learn that the queue cannot take mail (421 4.3.0): a shared
    queue's database unreachable, the embedded store's writer gone."""
    return lambda: store.health().ok


def build_local_recipients(config: Config) -> LocalRecipients:
    aliases: dict[str, tuple[str, ...]] = {}
    for file in config.aliases.files:
        loaded = load_aliases(file)
        aliases.update(loaded)
    aliases.update({k.lower(): v for k, v in config.aliases.map.items()})
    local = LocalRecipients(
        config.domain,
        aliases,
        recipient_delimiter=config.aliases.recipient_delimiter,
        hostname=config.hostname,
    )
    # A catch-all or alias naming nothing would lose mail quietly: refuse the config
    # (check-config, start and reload all build the table here).
    problems = local.unresolved_references(config.domain, config.aliases.map)
    if problems:
        raise ConfigError("\n".join(problems))
    return local


def retry_policy(config: Config) -> RetryPolicy:
    return RetryPolicy(
        first_delay=config.queue.first_retry,
        max_delay=config.queue.max_retry,
        max_lifetime=config.queue.lifetime,
    )


def router(config: Config, local: LocalRecipients) -> Router:
    return Router(
        local,
        [TransportEntry(rule.domain, rule.route) for rule in config.transport],
        smarthost=_smarthost(config),
        smtp_port=config.outbound.port,
    )


def _mode(policy: str) -> TlsMode:
    """A configured policy name as a mode ("required" is the old "encrypt")."""
    return cast(TlsMode, "encrypt" if policy == "required" else policy)


def tls_policy_table(config: Config) -> TlsPolicyTable:
    """``[outbound] tls`` and ``[[tls_policy]]`` as the transport's policy table."""
    return TlsPolicyTable(
        # The config refuses "dane" as the default (see Config._tls_policies).
        default=cast(DefaultMode, _mode(config.outbound.tls)),
        rules=tuple(
            PolicyRule(
                domain=rule.domain,
                mode=_mode(rule.policy),
                match=rule.match,
                ca_file=str(rule.ca_file) if rule.ca_file is not None else None,
                fingerprints=tuple(parse_fingerprint(pin) for pin in rule.fingerprints),
            )
            for rule in config.tls_policy
        ),
    )


def _smarthost(config: Config) -> NextHop | None:
    relay = config.relay
    if not relay.smarthost:
        return None
    ca_file = str(relay.smarthost_ca_file) if relay.smarthost_ca_file is not None else None
    return parse_smarthost(
        relay.smarthost, ca_file=ca_file, fingerprints=relay.smarthost_fingerprints
    )


def maildir_transport(config: Config, local: LocalRecipients) -> MaildirTransport:
    return MaildirTransport(
        MaildirDelivery(config.data_dir / "mail", hostname=config.hostname), local
    )


def configured_certificate(config: Config) -> ServerCertificate | None:
    """``[tls] certificate`` and ``private_key``, when both are set."""
    tls = config.tls
    if tls.certificate is not None and tls.private_key is not None:
        return ServerCertificate(tls.certificate, tls.private_key, tls.min_version)
    return None


def tls_certificate(config: Config) -> ServerCertificate | None:
    """The listeners' certificate: the configured one, else a self-signed pair (made in
    ``data_dir/tls`` when missing: call this as the server's user, never as root, since
    that directory is the user's), else none (no STARTTLS, no implicit TLS)."""
    tls = config.tls
    configured = configured_certificate(config)
    if configured is not None:
        return configured
    if tls.acme:
        # The ACME certificate once there is one; until then a self-signed stand-in, so
        # STARTTLS works while the first order runs (certs/manager.py).
        from postillon.certs.storage import AcmeFiles, usable

        files = AcmeFiles(acme_dir(config.data_dir))
        kept = files.load()
        if kept is not None and usable(*kept):
            return ServerCertificate(files.certificate, files.private_key, tls.min_version)
    if tls.self_signed or tls.acme:
        cert, key = ensure_self_signed(tls_dir(config.data_dir), config.hostname)
        return ServerCertificate(cert, key, tls.min_version, acme_stand_in=tls.acme)
    return None


@dataclass(frozen=True, slots=True)
class Policy:
    """The parts built from reloadable settings that sessions share."""

    local: LocalRecipients
    relay: RelayPolicy
    auth: Authenticator
    rate_limits: SubmissionRateLimits
    # DKIM signing of local/authenticated mail; None = no keys configured.
    signer: DkimSigner | None
    # SPF/DKIM/DMARC/ARC on the MX listeners; None = checks off.
    authentication: InboundAuthentication | None
    # What the checks are built from, and the pipeline of each listener kind (built
    # on first use, shared by the listeners of that kind).
    parts: PipelineParts
    pipelines: dict[str, Pipeline] = field(default_factory=dict)

    def pipeline(self, kind: ListenerKind, trace: TraceSink | None) -> Pipeline:
        built = self.pipelines.get(kind)
        if built is None:
            built = self.pipelines[kind] = build_pipeline(kind, self.parts, trace)
        return built


class Builder:
    """Builds what needs the process's shared parts (metrics, helpers, the AUTH
    failure budget, the queue once it is open)."""

    def __init__(self, metrics: Metrics, maillog: MailLog, helpers: HelperPool) -> None:
        self.metrics = metrics
        self.maillog = maillog
        self.helpers = helpers
        # Set once the queue is open; sessions ask it whether a shared queue is reachable.
        self.store: QueueStore | None = None
        # One AUTH failure budget for the whole process, across reloads: it is per
        # client IP and user, and a reload must not forgive anyone.
        self._auth_guard = AuthGuard(SystemClock())
        self._listener_metrics: dict[str, ListenerMetrics] = {}
        # [tls_reports] (RFC 8460): told of every MX session's TLS result; kept
        # across reloads (a reload builds new transports with it).
        self.tls_observer: TlsObserver | None = None
        # [dmarc_reports] (RFC 7489 §7.2): told of each DMARC evaluation; kept across reloads.
        self.dmarc_observer: DmarcObserver | None = None
        # Where the checks' decisions go for ``postillon explain`` (set once the queue is open).
        self.trace: TraceSink | None = None

    def policy(
        self,
        config: Config,
        previous: tuple[Config, Policy] | None = None,
        signer: DkimSigner | None = None,
    ) -> Policy:
        """Aliases, relay rules, accounts, rate limits, DKIM keys and the inbound
        checks; raises when a file is broken. ``signer`` is the one read at start
        (before dropping root); a reload reads the keys again. ``previous`` (a
        reload's running config and policy) keeps the rate limits' counts when
        their settings did not change."""
        local = build_local_recipients(config)
        submit = config.submission
        accounts = AccountStore(accounts_path(config.data_dir, submit.accounts_file))
        limits = (submit.messages_per_hour, submit.recipients_per_hour, submit.ip_messages_per_hour)
        if previous is not None and limits == (
            previous[0].submission.messages_per_hour,
            previous[0].submission.recipients_per_hour,
            previous[0].submission.ip_messages_per_hour,
        ):
            rate_limits = previous[1].rate_limits  # keep the counts of the last hour
        else:
            rate_limits = SubmissionRateLimits(
                SystemClock(),
                messages_per_hour=submit.messages_per_hour,
                recipients_per_hour=submit.recipients_per_hour,
                ip_messages_per_hour=submit.ip_messages_per_hour,
            )
        relay = RelayPolicy(local, config.relay.trusted_networks)
        resolver = DnsResolver(
            list(config.dns.nameservers) or None,
            timeout=config.dns.timeout,
            attempts=config.dns.attempts,
            trust_ad=config.dns.trust_ad,
            on_lookup=self.metrics.dns_observer(),
        )
        authentication = self.authentication(config, resolver)
        return Policy(
            local=local,
            relay=relay,
            auth=Authenticator.create(accounts, self._auth_guard),
            rate_limits=rate_limits,
            signer=signer if signer is not None else build_signer(config),
            authentication=authentication,
            parts=PipelineParts(
                config=config,
                clock=SystemClock(),
                maillog=self.maillog,
                relay=relay,
                accounts=accounts.get,
                rate_limits=rate_limits,
                authentication=authentication,
                resolver=resolver,
                store=self.store,
            ),
        )

    def authentication(self, config: Config, resolver: Resolver) -> InboundAuthentication | None:
        """SPF/DKIM/DMARC/ARC for the MX listeners, through postillon's resolver."""
        if not config.authentication.enabled:
            return None
        return InboundAuthentication(
            config.authentication,
            resolver,
            config.hostname,
            local_domains=config.local_domains,
            sealing_keys=key_store_from_config(config.dkim, config.data_dir).arc_sealing_key,
            helpers=self.helpers if config.helper_process_count() else None,
            dmarc_observer=self.dmarc_observer,
        )

    def session_deps(
        self,
        config: Config,
        listener: Listener,
        intake: Intake,
        policy: Policy,
        tls_context: ssl.SSLContext | None,
    ) -> SessionDeps:
        kind = listener.config.kind
        submission = kind in ("submission", "submissions")
        settings = ServerSettings(
            hostname=config.hostname,
            max_message_size=config.limits.message_size,
            max_recipients=config.limits.recipients,
            max_transactions=config.limits.messages_per_connection,
            limits=True,  # RFC 9422: RCPTMAX (and MAILMAX when set) in EHLO
            max_errors=config.limits.errors,
            max_command_line=config.limits.command_line,
            starttls=tls_context is not None and kind != "submissions",
            tls_active=kind == "submissions",
            lmtp=kind == "lmtp",
            mt_priority=kind != "lmtp",  # RFC 6710; honoured per core/priority.py
            # AUTH only on submission listeners, and only after TLS (RFC 4954 4).
            auth_mechanisms=DEFAULT_MECHANISMS if submission else (),
            require_auth=submission,
        )
        label = listener.config.label
        metrics = self._listener_metrics.get(label)
        if metrics is None:
            metrics = self._listener_metrics[label] = ListenerMetrics(self.metrics, label)
        return SessionDeps(
            settings=settings,
            intake=intake,
            pipeline=policy.pipeline(kind, self.trace),
            maillog=self.maillog,
            limits=config.limits,
            listener=label,
            kind=kind,
            tls_context=tls_context,
            auth=policy.auth if submission else None,
            submission=submission,
            hide_client_ip=config.submission.hide_client_ip,
            trusted=policy.relay.is_trusted,
            metrics=metrics,
            queue_available=queue_available(self.store) if self.store is not None else None,
            greet_pause=config.client_checks.greet_pause if kind == "smtp" else 0.0,
        )

    def smtp_transports(self, config: Config) -> tuple[SmtpTransport, SmtpTransport]:
        """SMTP and LMTP transports sharing one resolver; raises ValueError
        for unusable [dns] settings."""
        resolver = dns_resolver(config, self.metrics)
        return (
            smtp_transport(
                config, resolver, self.store, metrics=self.metrics, tls_observer=self.tls_observer
            ),
            SmtpTransport(resolver, outbound_settings(config), lmtp=True, metrics=self.metrics),
        )


def outbound_settings(config: Config) -> OutboundSettings:
    out = config.outbound
    return OutboundSettings(
        helo_name=out.helo_name or config.hostname,
        port=out.port,
        tls_policy=tls_policy_table(config),
        prefer_ipv6=out.prefer_ipv6,
        concurrency=out.concurrency,
        per_destination=out.per_destination,
        messages_per_connection=out.messages_per_connection,
        idle_reuse=out.idle_reuse,
        egress=EgressSettings(out.source_addresses, out.helo_names, out.source_selection),
        happy_eyeballs_delay=out.happy_eyeballs_delay,
        timeouts=ClientTimeouts(
            connect=out.connect_timeout,
            greeting=out.greeting_timeout,
            command=out.command_timeout,
            data_block=out.data_block_timeout,
            data_end=out.data_end_timeout,
        ),
    )


def smtp_transport(
    config: Config,
    resolver: DnsResolver,
    store: QueueStore | None,
    *,
    metrics: Metrics | None = None,
    tls_observer: TlsObserver | None = None,
) -> SmtpTransport:
    """The SMTP transport of ``config`` (also what ``postillon tls check`` looks through)."""
    out = config.outbound
    # DANE (RFC 7672) only when the nameservers are trusted to validate DNSSEC.
    dane = DaneHook(resolver) if config.dns.trust_ad else None
    # MTA-STS (RFC 8461), its policy cache in the queue store (shared by restarts
    # and nodes); refreshed in the background while the transport lives.
    mta_sts = None
    if out.mta_sts:
        ca_file = str(out.sts_ca_file) if out.sts_ca_file is not None else None
        mta_sts = StsPolicies(resolver, store, ca_file=ca_file)
    # [[shaping]] and [backoff]; suspensions and rate buckets in the queue store.
    shaper = Shaper(
        config.shaping,
        config.backoff,
        store.shaping if store else None,
        dead_for=config.queue.first_retry,  # Postfix: a dead site for minimal_backoff_time
    )
    return SmtpTransport(
        resolver,
        outbound_settings(config),
        metrics=metrics,
        dane=dane,
        mta_sts=mta_sts,
        tls_observer=tls_observer,
        source_rules=shaper.sources,  # a rule's source = [...] replaces the global pool
        shaper=shaper,
    )


def dns_resolver(config: Config, metrics: Metrics | None = None) -> DnsResolver:
    """The resolver of ``[dns]`` (and ``[outbound] ipv4/ipv6`` for addresses)."""
    return DnsResolver(
        list(config.dns.nameservers) or None,
        timeout=config.dns.timeout,
        attempts=config.dns.attempts,
        trust_ad=config.dns.trust_ad,
        ipv4=config.outbound.ipv4,
        ipv6=config.outbound.ipv6,
        on_lookup=metrics.dns_observer() if metrics is not None else None,
    )


def tls_reporter(
    config: Config, store: QueueStore, resolver: Resolver, intake: ReportIntake | None
) -> TlsReporter:
    """The RFC 8460 reporter of ``[tls_reports]`` (the daily task and ``postillon tls
    report`` share it)."""
    cfg = config.tls_reports
    sender = cfg.sender_for(config.hostname)
    settings = ReporterSettings(
        ReportSettings(
            organization=cfg.organization or config.hostname,
            contact=cfg.contact or sender,
            submitter=sender.rpartition("@")[2].lower(),
        ),
        sender=sender,
        http_timeout=cfg.http_timeout,
        ca_file=str(cfg.ca_file) if cfg.ca_file is not None else None,
        owner=f"{socket.gethostname()}:{os.getpid()}",
    )
    return TlsReporter(store.tls_reports, resolver, intake, settings, SystemClock())
