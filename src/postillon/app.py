"""The composition root: build every component from one frozen Config.

No other module reads configuration; each gets the values it needs here.
Start-up order matters: prepare data_dir, bind listeners (as root if need be),
drop privileges, open the queue, then start serving and delivering.
"""

from __future__ import annotations

import asyncio
import contextlib

# The idna codec imports punycode on first use. After dropping root the interpreter's own
# files may no longer be readable (a Python under /root, as on the bench machine), and the
# first IDN domain or public-suffix-list load then failed with "unknown encoding: punycode"
# (seen as 451s in make bench). Import it while still root.
import encodings.punycode  # noqa: F401
import gc
import logging
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from postillon.checks.authentication import InboundAuthentication, arc_sealing_keys
from postillon.checks.rate_limit import SubmissionRateLimits
from postillon.checks.relay import RelayPolicy
from postillon.config.changes import effective, restart_needed
from postillon.config.loader import ConfigError, load_config
from postillon.config.model import Config
from postillon.core.address import Address
from postillon.core.clock import SystemClock
from postillon.delivery.retry import RetryPolicy
from postillon.delivery.runner import Runner
from postillon.delivery.transport import Transport
from postillon.helpers.pool import HelperPool
from postillon.inbound.accounts import AccountError, AccountStore, accounts_path
from postillon.inbound.auth import DEFAULT_MECHANISMS, Authenticator, AuthGuard
from postillon.inbound.limits import ConnectionLimiter
from postillon.inbound.listener import Listener
from postillon.inbound.privileges import (
    chown_tree,
    drop_privileges,
    lookup_user,
    running_as_root,
)
from postillon.inbound.session import SessionDeps
from postillon.inbound.tls import ensure_self_signed, server_context
from postillon.intake.intake import Intake
from postillon.intake.maildrop import prepare_maildrop
from postillon.intake.pickup import Pickup
from postillon.local.discard import DiscardTransport, ErrorTransport
from postillon.local.maildir import MaildirDelivery
from postillon.local.transport import MaildirTransport
from postillon.observability.maillog import MailLog, configure_logging
from postillon.observability.metrics import ListenerMetrics, Metrics
from postillon.outbound.client_session import ClientTimeouts
from postillon.outbound.smtp_transport import OutboundSettings, SmtpTransport
from postillon.protocol.server import ServerSettings
from postillon.queue.health import wait_unrecoverable
from postillon.queue.history import HistoryRecorder
from postillon.queue.postgres_schema import SchemaError
from postillon.queue.postgres_store import PostgresStore
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import QueueStore, StoreError, StoreHealth
from postillon.routing.aliases import AliasesError, load_aliases
from postillon.routing.local import LocalRecipients, RecipientAccepted
from postillon.routing.resolver import DnsResolver
from postillon.routing.router import Router, TransportEntry, parse_smarthost
from postillon.signing.keys import key_store_from_config
from postillon.signing.remote_keys import shared_keys
from postillon.signing.signer import DkimSigner, build_signer

if TYPE_CHECKING:
    from postillon.admin.server import AdminServer

log = logging.getLogger("postillon")


def queue_path(config: Config) -> Path:
    return config.data_dir / "queue" / "queue.db"


def open_queue_store(config: Config) -> QueueStore:
    """The queue store the config names: the embedded SQLite file, or PostgreSQL at ``dsn``."""
    if config.queue.store == "postgresql":
        assert config.queue.dsn is not None  # the config model requires it
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
    return LocalRecipients(
        config.domain,
        aliases,
        recipient_delimiter=config.aliases.recipient_delimiter,
        hostname=config.hostname,
    )


def pid_path(data_dir: Path) -> Path:
    """The running server's pid file (``postillon reload`` signals it)."""
    return data_dir / "postillon.pid"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: applied or refused (``error`` says why), and the
    changed settings that only a restart applies."""

    applied: bool
    error: str = ""
    restart_needed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Policy:
    """The parts built from reloadable settings that sessions share."""

    local: LocalRecipients
    relay: RelayPolicy
    auth: Authenticator
    rate_limits: SubmissionRateLimits
    # DKIM signing of local/authenticated mail; None = no keys configured.
    signer: DkimSigner | None
    # SPF/DKIM/DMARC/ARC on the MX listeners; None = checks off.
    authentication: InboundAuthentication | None


class App:
    def __init__(
        self, config: Config, maillog: MailLog | None = None, config_path: Path | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.maillog = maillog or configure_logging(config.log, hostname=config.hostname)
        self.listeners: list[Listener] = []
        self.store: QueueStore | None = None
        self.runner: Runner | None = None
        self.pickup: Pickup | None = None
        self._smtp: SmtpTransport | None = None
        self._lmtp: SmtpTransport | None = None
        self.history: HistoryRecorder | None = None
        self.admin: AdminServer | None = None
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        self._auth_guard: AuthGuard | None = None
        # Helper processes (DKIM verification, RSA signing), started just before
        # privileges are dropped; kept across reloads (a reload only changes their number).
        self._helpers = HelperPool(
            config.helper_process_count(), on_answer=self.metrics.helper_observer()
        )
        self._policy: _Policy | None = None
        self._intake: Intake | None = None
        self._limiter: ConnectionLimiter | None = None
        self._listener_metrics: dict[str, ListenerMetrics] = {}
        # SMTP transports replaced by a reload, closed again at stop.
        self._retired: list[SmtpTransport] = []
        self._background: set[asyncio.Task[None]] = set()
        # Done when the queue store has failed for good (the server then exits).
        self.store_failure: asyncio.Task[StoreHealth] | None = None

    def _tls_context(self, config: Config | None = None) -> ssl.SSLContext | None:
        config = config or self.config
        tls = config.tls
        if tls.certificate is not None and tls.private_key is not None:
            return server_context(tls.certificate, tls.private_key, tls.min_version)
        if tls.self_signed:
            cert, key = ensure_self_signed(config.data_dir / "tls", config.hostname)
            return server_context(cert, key, tls.min_version)
        return None

    def _build_policy(
        self, config: Config, previous: _Policy | None, signer: DkimSigner | None = None
    ) -> _Policy:
        """Aliases, relay rules, accounts, rate limits, DKIM keys and the inbound
        checks; raises when a file is broken. ``signer`` is the one read at start
        (before dropping root); a reload reads the keys again."""
        local = build_local_recipients(config)
        submit = config.submission
        # One account store, one AUTH failure budget and one set of rate
        # limits for the whole process: the budgets are per client IP and user.
        accounts = AccountStore(accounts_path(config.data_dir, submit.accounts_file))
        if self._auth_guard is None:
            self._auth_guard = AuthGuard(SystemClock())
        rate_limits = SubmissionRateLimits(
            SystemClock(),
            messages_per_hour=submit.messages_per_hour,
            recipients_per_hour=submit.recipients_per_hour,
            ip_messages_per_hour=submit.ip_messages_per_hour,
        )
        if previous is not None and (
            self.config.submission.messages_per_hour,
            self.config.submission.recipients_per_hour,
            self.config.submission.ip_messages_per_hour,
        ) == (submit.messages_per_hour, submit.recipients_per_hour, submit.ip_messages_per_hour):
            rate_limits = previous.rate_limits  # keep the counts of the last hour
        return _Policy(
            local=local,
            relay=RelayPolicy(local, config.relay.trusted_networks),
            auth=Authenticator.create(accounts, self._auth_guard),
            rate_limits=rate_limits,
            signer=signer if signer is not None else build_signer(config),
            authentication=self._authentication(config),
        )

    def _session_deps(
        self,
        config: Config,
        listener: Listener,
        intake: Intake,
        policy: _Policy,
        tls_context: ssl.SSLContext | None,
    ) -> SessionDeps:
        kind = listener.config.kind
        submission = kind in ("submission", "submissions")
        settings = ServerSettings(
            hostname=config.hostname,
            max_message_size=config.limits.message_size,
            max_recipients=config.limits.recipients,
            max_errors=config.limits.errors,
            max_command_line=config.limits.command_line,
            starttls=tls_context is not None and kind != "submissions",
            tls_active=kind == "submissions",
            lmtp=kind == "lmtp",
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
            relay=policy.relay,
            maillog=self.maillog,
            limits=config.limits,
            listener=label,
            tls_context=tls_context,
            auth=policy.auth if submission else None,
            submission=submission,
            sender_policy=config.submission.sender_policy,
            rate_limits=policy.rate_limits,
            hide_client_ip=config.submission.hide_client_ip,
            recipient_delimiter=config.aliases.recipient_delimiter,
            metrics=metrics,
            # Inbound checks on MX (smtp) listeners only, never submission or LMTP.
            authentication=policy.authentication if kind == "smtp" else None,
            queue_available=queue_available(self.store) if self.store is not None else None,
        )

    def _router(self, config: Config, local: LocalRecipients) -> Router:
        return Router(
            local,
            [TransportEntry(rule.domain, rule.route) for rule in config.transport],
            smarthost=parse_smarthost(config.relay.smarthost) if config.relay.smarthost else None,
            smtp_port=config.outbound.port,
        )

    def _retry_policy(self, config: Config) -> RetryPolicy:
        return RetryPolicy(
            first_delay=config.queue.first_retry,
            max_delay=config.queue.max_retry,
            max_lifetime=config.queue.lifetime,
        )

    async def start(self) -> None:
        config = self.config
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        tls_context = self._tls_context()
        clock = SystemClock()
        drop_to = config.user if running_as_root() and config.user else None
        # Maildrop files owned by these uids may set their envelope sender (-f).
        server_uids = {0, os.geteuid()}
        maildrop = data_dir / "maildrop"
        if drop_to is None:
            prepare_maildrop(maildrop)
        else:
            entry = lookup_user(drop_to)
            for sub in ("queue", "spool", "mail"):
                (data_dir / sub).mkdir(exist_ok=True)
            chown_tree(data_dir, entry.pw_uid, entry.pw_gid, skip=(maildrop,))
            prepare_maildrop(maildrop, entry.pw_uid, entry.pw_gid)
            server_uids.add(entry.pw_uid)

        limiter = ConnectionLimiter(config.limits.connections, config.limits.connections_per_ip)
        self._limiter = limiter
        for listen in config.listen:
            listener = Listener(
                listen,
                limiter,
                implicit_tls=tls_context if listen.kind == "submissions" else None,
            )
            await listener.bind()
            self.listeners.append(listener)
        # Keys are read before dropping root, as OpenDKIM does: they may be readable by root only.
        signer: DkimSigner | None = build_signer(config)
        if drop_to is not None:
            # Everything imported from here on must be readable by the server's user; the
            # interpreter's own library may not be (a Python under /root). Import now what
            # is otherwise imported late, and start the helper processes now: each drops
            # to the same user itself once it has imported what it needs.
            if config.admin.listen is not None:
                import postillon.observability.routes  # noqa: F401
                from postillon.admin.server import static_dir

                static_dir()
            await self._start_helpers(config, signer, drop_to)
            drop_privileges(drop_to)
            log.info("dropped privileges to user %s", drop_to)
        else:
            await self._start_helpers(config, signer, None)

        self.store = open_queue_store(config)
        if isinstance(self.store, PostgresStore):
            # Connect and check the schema version now: a node with an unreachable or
            # unmigrated database refuses to start instead of refusing every message.
            await self.store.open()
        self.metrics.queue.attach(self.store.count_by_state)
        # Every mail log event with a queue id becomes a step of that message's history.
        self.history = HistoryRecorder(self.store, clock, config.admin.history_days * 86400)
        self.maillog.subscribe(self.history.on_event)
        self.history.start()
        intake = Intake(
            self.store,
            config.hostname,
            data_dir / "spool",
            clock=clock,
            maillog=self.maillog,
            max_hops=config.limits.max_hops,
            signer=signer,
            helpers=self._helpers if self._helpers.processes else None,
            metrics=self.metrics,
        )
        self._intake = intake
        policy = self._policy = self._build_policy(config, None, signer)
        serving = [
            (listener, self._session_deps(config, listener, intake, policy, tls_context))
            for listener in self.listeners
        ]
        transports = self._transports(policy.local)
        self.runner = Runner(
            self.store,
            self._router(config, policy.local),
            transports,
            intake,
            self._retry_policy(config),
            self.maillog,
            config.hostname,
            concurrency=config.queue.concurrency,
            lease_seconds=config.queue.lease,
            clock=clock,
            delay_warning=config.queue.delay_warning,
            metrics=self.metrics,
            recent=intake.recent,
            node_timeout=config.queue.node_timeout,
        )
        intake.on_commit(self.runner.wake)
        self.store_failure = asyncio.create_task(wait_unrecoverable(self.store))
        await self.runner.recover_dead_leases()
        self.runner.start()

        def expand(address: Address) -> tuple[str, ...]:
            # Local submission is trusted: relay allowed, aliases expand; an
            # unknown local recipient is queued and bounces like any other.
            # (The policy of the moment: a reload may have replaced it.)
            assert self._policy is not None
            decision = self._policy.relay.check_recipient(address, "", authenticated=True)
            if isinstance(decision, RecipientAccepted):
                return decision.targets
            return (str(address),)

        self.pickup = Pickup(
            maildrop, intake, config.hostname, clock, expand=expand, trusted_uids=server_uids
        )
        self.pickup.start()
        for listener, deps in serving:
            await listener.start(deps)
        if config.admin.listen is not None:
            # Imported here: aiohttp takes a while to import, and the CLI
            # commands that import this module never serve HTTP.
            from postillon.admin.queue_ops import QueueOps
            from postillon.admin.server import AdminContext, AdminServer, build_app
            from postillon.admin.tls import admin_tls_context
            from postillon.admin.token import TokenVerifier, token_path
            from postillon.observability.routes import add_ops_routes

            runner = self.runner
            admin_app = build_app(
                AdminContext(
                    ops=QueueOps(
                        self.store,
                        clock,
                        intake=intake,
                        hostname=config.hostname,
                        maillog=self.maillog,
                        history=self.history,
                        wake_runner=runner.wake,
                        actor="api",
                    ),
                    token=TokenVerifier(token_path(data_dir)),
                    hostname=config.hostname,
                    listeners=self.listeners,
                    limiter=limiter,
                    in_flight=lambda: runner.in_flight,
                    queue_health=self.store.health,
                )
            )
            # Further admin routes (e.g. /metrics) are added to admin_app here.
            add_ops_routes(admin_app, self.metrics, self.reload)
            self.admin = AdminServer(
                admin_app,
                config.admin.listen,
                admin_tls_context(config.admin, config.tls, tls_context),
            )
            await self.admin.start()
        pid_path(data_dir).write_text(f"{os.getpid()}\n")
        log.info("postillon started: %s", ", ".join(lst.config.label for lst in self.listeners))

    async def _start_helpers(
        self, config: Config, signer: DkimSigner | None, user: str | None
    ) -> None:
        """The helper processes, when they have work: an MX listener that checks mail,
        or RSA keys to sign with."""
        self._share_keys(signer)
        checks_mail = config.authentication.enabled and any(
            listen.kind == "smtp" for listen in config.listen
        )
        signs_rsa = signer is not None and any(k.algorithm == "rsa" for k in signer.keys)
        if self._helpers.processes and (checks_mail or signs_rsa):
            self._helpers.user = user
            await self._helpers.start()

    def _share_keys(self, signer: DkimSigner | None) -> None:
        """The helpers sign with the signer's RSA keys (and no others: a reload replaces)."""
        self._helpers.share("keys", shared_keys(list(signer.keys) if signer else []))

    def _authentication(self, config: Config) -> InboundAuthentication | None:
        """SPF/DKIM/DMARC/ARC for the MX listeners, through postillon's resolver."""
        if not config.authentication.enabled:
            return None
        resolver = DnsResolver(
            list(config.dns.nameservers) or None,
            timeout=config.dns.timeout,
            attempts=config.dns.attempts,
            on_lookup=self.metrics.dns_observer(),
        )
        return InboundAuthentication(
            config.authentication,
            resolver,
            config.hostname,
            local_domains=config.local_domains,
            sealing_keys=arc_sealing_keys(key_store_from_config(config.dkim, config.data_dir)),
            helpers=self._helpers if config.helper_process_count() else None,
        )

    def _transports(self, local: LocalRecipients) -> dict[str, Transport]:
        self._smtp, self._lmtp = self._smtp_transports(self.config)
        return {
            "maildir": self._maildir_transport(self.config, local),
            "smtp": self._smtp,
            "lmtp": self._lmtp,
            "discard": DiscardTransport(),
            "error": ErrorTransport(),
        }

    def _smtp_transports(self, config: Config) -> tuple[SmtpTransport, SmtpTransport]:
        """SMTP and LMTP transports sharing one resolver; raises ValueError
        for unusable [dns] settings."""
        out = config.outbound
        resolver = DnsResolver(
            list(config.dns.nameservers) or None,
            timeout=config.dns.timeout,
            attempts=config.dns.attempts,
            ipv4=out.ipv4,
            ipv6=out.ipv6,
            on_lookup=self.metrics.dns_observer(),
        )
        settings = OutboundSettings(
            helo_name=out.helo_name or config.hostname,
            port=out.port,
            tls=out.tls,
            prefer_ipv6=out.prefer_ipv6,
            concurrency=out.concurrency,
            per_destination=out.per_destination,
            messages_per_connection=out.messages_per_connection,
            idle_reuse=out.idle_reuse,
            timeouts=ClientTimeouts(
                connect=out.connect_timeout,
                greeting=out.greeting_timeout,
                command=out.command_timeout,
                data_block=out.data_block_timeout,
                data_end=out.data_end_timeout,
            ),
        )
        return (
            SmtpTransport(resolver, settings, metrics=self.metrics),
            SmtpTransport(resolver, settings, lmtp=True, metrics=self.metrics),
        )

    @staticmethod
    def _maildir_transport(config: Config, local: LocalRecipients) -> MaildirTransport:
        return MaildirTransport(
            MaildirDelivery(config.data_dir / "mail", hostname=config.hostname), local
        )

    async def reload(self) -> ReloadResult:
        """Reopen the log, re-read the config file, certificates, aliases and
        accounts, and apply them without closing a connection.

        Sessions already running finish with the settings they started with;
        new sessions and the next deliveries get the new ones. Anything that
        fails (a config error, a missing certificate, a broken aliases or
        accounts file) refuses the whole reload: the errors are logged and
        the running configuration stays.
        """
        async with self._reload_lock:
            if self._stopping or self._intake is None or self.runner is None:
                log.warning("reload ignored: the server is starting or stopping")
                return ReloadResult(False, "the server is starting or stopping")
            # First reopen the log under the running config (logrotate's
            # postrotate runs `postillon reload`): whatever follows, the log
            # goes to the new file.
            with contextlib.suppress(ConfigError):  # e.g. syslog away: keep the old handler
                configure_logging(self.config.log, self.maillog, self.config.hostname)
            try:
                new = load_config(self.config_path) if self.config_path else self.config
                restart = restart_needed(self.config, new)
                new = effective(self.config, new)
                tls_context = self._tls_context(new)
                policy = self._build_policy(new, self._policy)
                smtp = None
                if (new.outbound, new.dns, new.hostname) != (
                    self.config.outbound,
                    self.config.dns,
                    self.config.hostname,
                ):
                    smtp = self._smtp_transports(new)
                # Last: from here on the log is written as the new config says.
                configure_logging(new.log, self.maillog, new.hostname)
            except (ConfigError, AccountError, AliasesError, OSError, ValueError) as exc:
                self.metrics.reloads.labels("refused").inc()
                log.error("reload refused, the running configuration stays:\n%s", exc)
                return ReloadResult(False, str(exc))
            except Exception as exc:
                self.metrics.reloads.labels("refused").inc()
                log.exception("reload refused, the running configuration stays")
                return ReloadResult(False, f"{type(exc).__name__}: {exc}")
            self._apply(new, policy, tls_context, smtp)
            self.metrics.reloads.labels("ok").inc()
            if restart:
                log.warning(
                    "reload: these settings changed but need a restart to take effect: %s",
                    ", ".join(restart),
                )
            log.info(
                "configuration reloaded%s", f" from {self.config_path}" if self.config_path else ""
            )
            return ReloadResult(True, restart_needed=tuple(restart))

    def _apply(
        self,
        config: Config,
        policy: _Policy,
        tls_context: ssl.SSLContext | None,
        smtp: tuple[SmtpTransport, SmtpTransport] | None,
    ) -> None:
        """Swap the new parts in; nothing here may fail half-way (no I/O)."""
        assert self._intake is not None and self.runner is not None
        self.config = config
        self._policy = policy
        intake = self._intake
        intake.hostname = config.hostname
        intake.max_hops = config.limits.max_hops
        intake.signer = policy.signer
        helpers = config.helper_process_count()
        if helpers != self._helpers.processes:
            self._helpers.resize(helpers)
        self._share_keys(policy.signer)
        intake.helpers = self._helpers if helpers else None
        if self._limiter is not None:
            self._limiter.total = config.limits.connections
            self._limiter.per_ip = config.limits.connections_per_ip
        for listener in self.listeners:
            if listener.implicit_tls is not None and tls_context is not None:
                # The listening socket keeps its context object; load the new
                # certificate into it so new handshakes present it.
                _reload_context(listener.implicit_tls, config)
            listener.deps = self._session_deps(config, listener, intake, policy, tls_context)
        runner = self.runner
        runner.router = self._router(config, policy.local)
        runner.retry = self._retry_policy(config)
        runner.hostname = config.hostname
        runner.concurrency = config.queue.concurrency
        runner.lease_seconds = config.queue.lease
        runner.delay_warning = config.queue.delay_warning
        runner.node_timeout = config.queue.node_timeout
        runner.transports["maildir"] = self._maildir_transport(config, policy.local)
        if smtp is not None:
            # Deliveries in flight finish on the old transports; their pools
            # close idle connections now and reap the rest as they come back.
            for old in (self._smtp, self._lmtp):
                if old is not None:
                    self._retired.append(old)
                    task = asyncio.create_task(old.close())
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)
            self._smtp, self._lmtp = smtp
            runner.transports["smtp"], runner.transports["lmtp"] = smtp
        if self.pickup is not None:
            self.pickup.hostname = config.hostname
        runner.wake()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let sessions finish (bounded), return leases, close the queue."""
        self._stopping = True
        if grace is None:
            grace = self.config.shutdown.grace
        if self.admin is not None:
            await self.admin.stop()
        for listener in self.listeners:
            listener.stop_accepting()
        await asyncio.gather(*(lst.wait_sessions(grace) for lst in self.listeners))
        log.debug("stop: sessions done")
        if self.pickup is not None:
            await self.pickup.stop()
        if self.runner is not None:
            await self.runner.stop(grace)
        log.debug("stop: runner done")
        for transport in (self._smtp, self._lmtp, *self._retired):
            if transport is not None:
                await transport.close()
        log.debug("stop: transports done")
        if self.store_failure is not None:
            self.store_failure.cancel()
        if self.history is not None:
            await self.history.stop()
        await self._helpers.close()
        if self.store is not None:
            await self.store.close()
        with contextlib.suppress(OSError):
            pid_path(self.config.data_dir).unlink()
        log.info("postillon stopped")
        self._stopped.set()


def _reload_context(ctx: ssl.SSLContext, config: Config) -> None:
    tls = config.tls
    if tls.certificate is not None and tls.private_key is not None:
        cert, key = tls.certificate, tls.private_key
    else:
        cert, key = ensure_self_signed(config.data_dir / "tls", config.hostname)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.load_cert_chain(cert, key)


async def serve(config: Config, config_path: Path | None = None) -> None:
    app = App(config, config_path=config_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[ReloadResult]] = set()

    def on_hangup() -> None:
        task = loop.create_task(app.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Before start too: SIGHUP's default action would kill a starting server
    # (the reload itself is declined until everything is built).
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await app.start()
    except (StoreError, SchemaError) as exc:  # the queue database: unreachable, unmigrated
        log.error("cannot start: %s", exc)
        loop.remove_signal_handler(signal.SIGHUP)
        with contextlib.suppress(Exception):
            await app.stop()
        raise SystemExit(f"postillon: {exc}") from None
    # Everything built at start-up (modules, config, policy tables, TLS contexts) lives as
    # long as the process: move it out of the collector's sight. Every full collection
    # otherwise walks it again; measured, that was 0.1-0.25 ms of CPU per message under
    # load (bench/README.md, "Garbage collection").
    gc.collect()
    gc.freeze()
    failure: StoreHealth | None = None
    stopping = asyncio.ensure_future(stop.wait())
    waits: set[asyncio.Future[Any]] = {stopping}
    if app.store_failure is not None:
        waits.add(app.store_failure)
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if app.store_failure is not None and app.store_failure.done():
            failure = app.store_failure.result()
            log.critical(
                "the queue store cannot recover (%s): stopping, for a supervisor to restart"
                " postillon",
                failure.reason,
            )
    finally:
        stopping.cancel()
        loop.remove_signal_handler(signal.SIGHUP)
        with contextlib.suppress(Exception):
            await app.stop()
    if failure is not None:
        raise SystemExit(f"postillon: the queue store failed: {failure.reason}")


def run(config: Config, config_path: Path | None = None) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        asyncio.run(serve(config, config_path))
    else:
        uvloop.run(serve(config, config_path))
