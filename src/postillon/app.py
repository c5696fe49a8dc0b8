"""The composition root: build every component from one frozen Config.

No other module reads configuration; each gets the values it needs here.
Start-up order matters: prepare data_dir, bind listeners (as root if need be),
drop privileges, open the queue, then start serving and delivering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

from postillon.checks.rate_limit import SubmissionRateLimits
from postillon.checks.relay import RelayPolicy
from postillon.config.model import Config
from postillon.core.address import Address
from postillon.core.clock import SystemClock
from postillon.inbound.accounts import AccountStore, accounts_path
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
from postillon.local.maildir import MaildirDelivery
from postillon.local.transport import MaildirTransport
from postillon.observability.maillog import MailLog, setup_logging
from postillon.outbound.client_session import ClientTimeouts
from postillon.outbound.simple import DiscardTransport, ErrorTransport
from postillon.outbound.smtp_transport import OutboundSettings, SmtpTransport
from postillon.protocol.server import ServerSettings
from postillon.queue.postgres_schema import SchemaError
from postillon.queue.postgres_store import PostgresStore
from postillon.queue.retry import RetryPolicy
from postillon.queue.runner import Runner, Transport
from postillon.queue.sqlite_store import SqliteStore
from postillon.queue.store import QueueStore, StoreError
from postillon.routing.aliases import load_aliases
from postillon.routing.local import LocalRecipients, RecipientAccepted
from postillon.routing.resolver import DnsResolver
from postillon.routing.router import Router, TransportEntry, parse_smarthost

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


def queue_available(store: QueueStore) -> Callable[[], bool] | None:
    """How listeners learn that a shared queue's database is unreachable (421 4.3.0)."""
    if isinstance(store, PostgresStore):
        return lambda: store.available
    return None  # an embedded store is as available as the local disk


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


class App:
    def __init__(self, config: Config, maillog: MailLog | None = None) -> None:
        self.config = config
        self.maillog = maillog or setup_logging(
            config.log.format, config.log.file, config.log.level
        )
        self.listeners: list[Listener] = []
        self.store: QueueStore | None = None
        self.runner: Runner | None = None
        self.pickup: Pickup | None = None
        self._smtp: SmtpTransport | None = None
        self._lmtp: SmtpTransport | None = None
        self._stopped = asyncio.Event()

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls.certificate is not None and tls.private_key is not None:
            return server_context(tls.certificate, tls.private_key, tls.min_version)
        if tls.self_signed:
            cert, key = ensure_self_signed(self.config.data_dir / "tls", self.config.hostname)
            return server_context(cert, key, tls.min_version)
        return None

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
        for listen in config.listen:
            listener = Listener(
                listen,
                limiter,
                implicit_tls=tls_context if listen.kind == "submissions" else None,
            )
            await listener.bind()
            self.listeners.append(listener)
        if drop_to is not None:
            drop_privileges(drop_to)
            log.info("dropped privileges to user %s", drop_to)

        self.store = open_queue_store(config)
        if isinstance(self.store, PostgresStore):
            # Connect and check the schema version now: a node with an unreachable or
            # unmigrated database refuses to start instead of refusing every message.
            await self.store.open()
        intake = Intake(
            self.store,
            config.hostname,
            data_dir / "spool",
            clock=clock,
            maillog=self.maillog,
            max_hops=config.limits.max_hops,
        )
        local = build_local_recipients(config)
        relay = RelayPolicy(local, config.relay.trusted_networks)
        submit = config.submission
        # One account store, one AUTH failure budget and one set of rate
        # limits for the whole process: the budgets are per client IP and user.
        accounts = AccountStore(accounts_path(config.data_dir, submit.accounts_file))
        auth = Authenticator.create(accounts, AuthGuard(clock))
        rate_limits = SubmissionRateLimits(
            clock,
            messages_per_hour=submit.messages_per_hour,
            recipients_per_hour=submit.recipients_per_hour,
            ip_messages_per_hour=submit.ip_messages_per_hour,
        )
        serving: list[tuple[Listener, SessionDeps]] = []
        for listener in self.listeners:
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
            deps = SessionDeps(
                settings=settings,
                intake=intake,
                relay=relay,
                maillog=self.maillog,
                limits=config.limits,
                listener=listener.config.label,
                tls_context=tls_context,
                auth=auth if submission else None,
                submission=submission,
                sender_policy=submit.sender_policy,
                rate_limits=rate_limits,
                hide_client_ip=submit.hide_client_ip,
                recipient_delimiter=config.aliases.recipient_delimiter,
                queue_available=queue_available(self.store),
            )
            serving.append((listener, deps))
        transports = self._transports(local)
        self.runner = Runner(
            self.store,
            Router(
                local,
                [TransportEntry(rule.domain, rule.route) for rule in config.transport],
                smarthost=parse_smarthost(config.relay.smarthost)
                if config.relay.smarthost
                else None,
                smtp_port=config.outbound.port,
            ),
            transports,
            intake,
            RetryPolicy(
                first_delay=config.queue.first_retry,
                max_delay=config.queue.max_retry,
                max_lifetime=config.queue.lifetime,
            ),
            self.maillog,
            config.hostname,
            concurrency=config.queue.concurrency,
            lease_seconds=config.queue.lease,
            clock=clock,
            delay_warning=config.queue.delay_warning,
        )
        await self.runner.recover_dead_leases()
        self.runner.start()

        def expand(address: Address) -> tuple[str, ...]:
            # Local submission is trusted: relay allowed, aliases expand; an
            # unknown local recipient is queued and bounces like any other.
            decision = relay.check_recipient(address, "", authenticated=True)
            if isinstance(decision, RecipientAccepted):
                return decision.targets
            return (str(address),)

        self.pickup = Pickup(
            maildrop, intake, config.hostname, clock, expand=expand, trusted_uids=server_uids
        )
        self.pickup.start()
        for listener, deps in serving:
            await listener.start(deps)
        log.info("postillon started: %s", ", ".join(lst.config.label for lst in self.listeners))

    def _transports(self, local: LocalRecipients) -> dict[str, Transport]:
        config = self.config
        out = config.outbound
        resolver = DnsResolver(
            list(config.dns.nameservers) or None,
            timeout=config.dns.timeout,
            attempts=config.dns.attempts,
            ipv4=out.ipv4,
            ipv6=out.ipv6,
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
        self._smtp = SmtpTransport(resolver, settings)
        self._lmtp = SmtpTransport(resolver, settings, lmtp=True)
        return {
            "maildir": MaildirTransport(
                MaildirDelivery(config.data_dir / "mail", hostname=config.hostname), local
            ),
            "smtp": self._smtp,
            "lmtp": self._lmtp,
            "discard": DiscardTransport(),
            "error": ErrorTransport(),
        }

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let sessions finish (bounded), return leases, close the queue."""
        for listener in self.listeners:
            listener.stop_accepting()
        await asyncio.gather(*(lst.wait_sessions(grace) for lst in self.listeners))
        log.debug("stop: sessions done")
        if self.pickup is not None:
            await self.pickup.stop()
        if self.runner is not None:
            await self.runner.stop(grace)
        log.debug("stop: runner done")
        for transport in (self._smtp, self._lmtp):
            if transport is not None:
                await transport.close()
        log.debug("stop: transports done")
        if self.store is not None:
            await self.store.close()
        log.info("postillon stopped")
        self._stopped.set()


async def serve(config: Config) -> None:
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
    except (StoreError, SchemaError) as exc:  # the queue database: unreachable, unmigrated
        log.error("cannot start: %s", exc)
        with contextlib.suppress(Exception):
            await app.stop()
        raise SystemExit(f"postillon: {exc}") from None
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await app.stop()


def run(config: Config) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on exotic platforms
        asyncio.run(serve(config))
    else:
        uvloop.run(serve(config))
