"""The composition root: build every component from one frozen Config.

No other module reads configuration; each gets the values it needs here (the
builders are in ``build.py``, shared with ``reload.py``). Start-up order matters:
prepare data_dir, bind listeners (as root if need be), drop privileges, open the
queue, then start serving and delivering.
"""

from __future__ import annotations

import asyncio
import contextlib

# IDNA (core/address.py) imports punycode and its UTS 46 table on first use. After dropping
# root the interpreter's own files may no longer be readable (a Python under /root, as on
# the bench machine), and the first IDN domain or public-suffix-list load then failed with
# "unknown encoding: punycode" (seen as 451s in make bench). Import them while still root.
import encodings.punycode  # noqa: F401
import logging
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

# idna's own modules too (they import unicodedata); its UTS 46 table (idna.uts46data, 0.6 MiB,
# nothing from the standard library) loads from site-packages with the first IDN domain.
import idna  # noqa: F401 (see encodings.punycode above)

from postillon.build import (
    Builder,
    configured_certificate,
    dns_resolver,
    maildir_transport,
    open_queue_store,
    retry_policy,
    router,
    tls_certificate,
    tls_reporter,
)
from postillon.checks.state_pruning import StatePruner
from postillon.checks.trace import TraceRecorder
from postillon.config.model import Config
from postillon.core.address import Address
from postillon.core.clock import Clock, SystemClock
from postillon.core.recipient import RecipientAccepted
from postillon.core.sts import format_policy
from postillon.delivery.runner import Runner
from postillon.delivery.transport import Transport
from postillon.dnsrecords.records import served_policy
from postillon.helpers.pool import HelperPool
from postillon.inbound.limits import ConnectionLimiter
from postillon.inbound.listener import Listener
from postillon.inbound.privileges import (
    drop_privileges,
    prepare_data_dir,
    running_as_root,
)
from postillon.inbound.tls import ServerCertificate, empty_server_context
from postillon.intake.intake import Intake
from postillon.intake.pickup import Pickup
from postillon.local.discard import DiscardTransport, ErrorTransport
from postillon.observability.maillog import MailLog, configure_logging
from postillon.observability.metrics import Metrics
from postillon.outbound.smtp_transport import SmtpTransport
from postillon.paths import pid_path
from postillon.queue.health import wait_unrecoverable
from postillon.queue.history import HistoryRecorder
from postillon.queue.store import QueueStore, StoreHealth
from postillon.reload import Reloader, ReloadResult, share_keys
from postillon.signing.signer import DkimSigner, build_signer

if TYPE_CHECKING:
    from postillon.acme_service import AcmeService
    from postillon.admin.server import AdminServer
    from postillon.dmarcrpt.recorder import DmarcReportRecorder
    from postillon.dnsrecords.sts_server import StsServer
    from postillon.tlsrpt.recorder import TlsReportRecorder
    from postillon.tlsrpt.schedule import DailyReports

log = logging.getLogger("postillon")


class App:
    def __init__(
        self, config: Config, maillog: MailLog | None = None, config_path: Path | None = None
    ) -> None:
        self._config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.maillog = maillog or configure_logging(config.log, hostname=config.hostname)
        self.listeners: list[Listener] = []
        self.store: QueueStore | None = None
        self.runner: Runner | None = None
        self.pickup: Pickup | None = None
        self.history: HistoryRecorder | None = None
        self.trace: TraceRecorder | None = None
        self.admin: AdminServer | None = None
        # The MTA-STS policy server ([mta_sts] listen), when configured.
        self.mta_sts: StsServer | None = None
        # Automatic certificates ([tls] acme = true): challenges and renewal.
        self.acme: AcmeService | None = None
        self._tls_context: ssl.SSLContext | None = None
        # [tls_reports] (RFC 8460): the session recorder and the daily report task.
        self.tls_recorder: TlsReportRecorder | None = None
        self.tls_daily: DailyReports | None = None
        # [dmarc_reports] (RFC 7489 §7.2): the evaluation recorder and the daily task.
        self.dmarc_recorder: DmarcReportRecorder | None = None
        self.dmarc_daily: DailyReports | None = None
        self.state_pruner: StatePruner | None = None
        self._stopped = asyncio.Event()
        self._stopping = False
        # Helper processes (DKIM verification, RSA signing), started just before
        # privileges are dropped; kept across reloads (a reload only changes their number).
        self._helpers = HelperPool(
            config.helper_process_count(), on_answer=self.metrics.helper_observer()
        )
        self._builder = Builder(self.metrics, self.maillog, self._helpers)
        # Made once everything is built: from then on it owns the reloadable settings
        # (and the SMTP transports: a reload may replace them).
        self._reloader: Reloader | None = None
        self._smtp: tuple[SmtpTransport, SmtpTransport] | None = None
        # Done when the queue store has failed for good (the server then exits).
        self.store_failure: asyncio.Task[StoreHealth] | None = None

    @property
    def config(self) -> Config:
        """The config in effect: the one started with, or the last reload's."""
        return self._reloader.config if self._reloader is not None else self._config

    async def start(self) -> None:
        config = self.config
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        # A configured certificate is read now: its files may be root's only. A
        # self-signed one is made (and read) after the drop, by the server's user in
        # its own data_dir/tls: root never writes where that user could plant a link.
        certificate = configured_certificate(config)
        if certificate is not None:
            tls_context: ssl.SSLContext | None = certificate.context()
        elif config.tls.self_signed or config.tls.acme:
            tls_context = empty_server_context(config.tls.min_version)
        else:
            tls_context = None
        clock = SystemClock()
        drop_to = config.user if running_as_root() and config.user else None
        maildrop = data_dir / "maildrop"
        # Maildrop files owned by these uids may set their envelope sender (-f).
        server_uids = prepare_data_dir(data_dir, maildrop, drop_to)

        limiter = ConnectionLimiter(config.limits.connections, config.limits.connections_per_ip)
        for listen in config.listen:
            listener = Listener(
                listen,
                limiter,
                implicit_tls=tls_context if listen.kind == "submissions" else None,
            )
            await listener.bind()
            self.listeners.append(listener)
        self._tls_context = tls_context
        if config.tls.acme:
            from postillon.acme_service import AcmeService

            self.acme = AcmeService(config)
            await self.acme.bind()
        if config.mta_sts.listen is not None:
            await self._bind_mta_sts(config, certificate)
        # Keys are read before dropping root, as OpenDKIM does: they may be readable by root only.
        signer: DkimSigner | None = build_signer(config)
        if config.queue.store == "postgresql":
            # Only this store needs asyncpg (~3 MiB): imported as root (see below), opened later.
            from postillon.queue.postgres_store import PostgresStore
        if drop_to is not None:
            # Everything imported from here on must be readable by the server's user; the
            # interpreter's own library may not be (a Python under /root). Import now what
            # is otherwise imported late, and start the helper processes now: each drops
            # to the same user itself once it has imported what it needs.
            if config.admin.listen is not None:
                import postillon.observability.routes  # noqa: F401
                from postillon.admin.server import static_dir

                static_dir()
            if config.tls_reports.enabled:
                import aiohttp  # noqa: F401 (tlsrpt/https_post.py posts the reports with it)
            await self._start_helpers(config, signer, drop_to)
            drop_privileges(drop_to)
            log.info("dropped privileges to user %s", drop_to)
        else:
            await self._start_helpers(config, signer, None)
        if certificate is None and tls_context is not None:
            self_signed = tls_certificate(config)
            assert self_signed is not None
            self_signed.load_into(tls_context)
            if self.mta_sts is not None:
                self_signed.load_into(self.mta_sts.tls)
        if self.mta_sts is not None:
            self._check_mta_sts_certificate(config)

        self.store = open_queue_store(config)
        self._builder.store = self.store
        if config.queue.store == "postgresql":
            assert isinstance(self.store, PostgresStore)  # imported before the drop, above
            # Connect and check the schema version now: a node with an unreachable or
            # unmigrated database refuses to start instead of refusing every message.
            await self.store.open()
        self.metrics.queue.attach(self.store.count_by_state)
        # Every mail log event with a queue id becomes a step of that message's history.
        self.history = HistoryRecorder(self.store, clock, config.admin.history_days * 86400)
        self.maillog.subscribe(self.history.on_event)
        self.history.start()
        if config.explain.enabled:
            # Every check's decision, for `postillon explain` (checks/trace.py).
            self.trace = TraceRecorder(
                self.store.traces,
                clock,
                flush_interval=config.explain.flush_interval,
                keep_seconds=config.explain.keep_hours * 3600,
            )
            self.trace.start()
            self._builder.trace = self.trace
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
        if config.tls_reports.enabled:
            self._start_tls_reports(config, intake, clock)  # before the transports: they observe
        if config.dmarc_reports.enabled:
            self._start_dmarc_reports(config, intake, clock)  # before the policy: it observes
        # Greylisting and port-25 rate limits: drop expired state hourly (every node may).
        self.state_pruner = StatePruner(self.store.policy_state, clock, lambda: self.config)
        self.state_pruner.start()
        policy = self._builder.policy(config, None, signer)
        serving = [
            (listener, self._builder.session_deps(config, listener, intake, policy, tls_context))
            for listener in self.listeners
        ]
        smtp, lmtp = self._smtp = self._builder.smtp_transports(config)
        transports: dict[str, Transport] = {
            "maildir": maildir_transport(config, policy.local),
            "smtp": smtp,
            "lmtp": lmtp,
            "discard": DiscardTransport(),
            "error": ErrorTransport(),
        }
        self.runner = Runner(
            self.store,
            router(config, policy.local),
            transports,
            intake,
            retry_policy(config),
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
            assert self._reloader is not None
            decision = self._reloader.policy.relay.check_recipient(address, "", authenticated=True)
            if isinstance(decision, RecipientAccepted):
                return decision.targets
            return (str(address),)

        self.pickup = Pickup(
            maildrop,
            intake,
            config.hostname,
            clock,
            expand=expand,
            trusted_uids=server_uids,
            max_message_size=config.limits.message_size,
        )
        self._reloader = Reloader(
            config=config,
            config_path=self.config_path,
            builder=self._builder,
            maillog=self.maillog,
            policy=policy,
            smtp=(smtp, lmtp),
            intake=intake,
            runner=self.runner,
            pickup=self.pickup,
            limiter=limiter,
            listeners=self.listeners,
            helpers=self._helpers,
            mta_sts=self.mta_sts,
            acme=self.acme,
        )
        self.pickup.start()
        if self.mta_sts is not None:
            await self.mta_sts.start()
        for listener, deps in serving:
            await listener.start(deps)
        if self.acme is not None:
            await self.acme.start(self.apply_certificate, self.store.acme, self.metrics.acme_status)
        if config.admin.listen is not None:
            await self._start_admin(config, intake, limiter, tls_context)
        pid_path(data_dir).write_text(f"{os.getpid()}\n")
        log.info("postillon started: %s", ", ".join(lst.config.label for lst in self.listeners))
        for note in config.deprecations():
            log.warning("config: %s", note)

    async def _bind_mta_sts(self, config: Config, certificate: ServerCertificate | None) -> None:
        """Bind the MTA-STS policy server (port 443: as root, before the drop) with its
        own TLS context holding the SMTP certificate (the configured one now; the
        self-signed one is loaded after the drop, as for the listeners)."""
        # Imported here: aiohttp is slow to import and most CLI commands never need it.
        from postillon.dnsrecords.sts_server import StsServer

        assert config.mta_sts.listen is not None
        context = empty_server_context(config.tls.min_version)
        if certificate is not None:
            certificate.load_into(context)
        self.mta_sts = StsServer(
            config.mta_sts.listen,
            context,
            config.local_domains,
            format_policy(served_policy(config)),
            # TLS-ALPN-01 (RFC 8737) answers on this socket while a challenge is pending.
            challenge=self.acme.board.context_for if self.acme is not None else None,
        )
        await self.mta_sts.bind()

    def apply_certificate(self) -> None:
        """A new ACME certificate: load it into every TLS context a listener holds (the
        first one, which the admin server may share; each listener's STARTTLS and
        implicit-TLS context, which a reload may have replaced; the MTA-STS server's).
        Handshakes from now on present it; sessions already up keep theirs."""
        certificate = tls_certificate(self.config)
        if certificate is None:
            return
        contexts = [self._tls_context, self.mta_sts.tls if self.mta_sts else None]
        for listener in self.listeners:
            contexts += [
                listener.implicit_tls,
                listener.deps.tls_context if listener.deps else None,
            ]
        for context in {id(c): c for c in contexts if c is not None}.values():
            certificate.load_into(context)
        log.info("TLS: listeners now present %s", certificate.certificate)

    @staticmethod
    def _check_mta_sts_certificate(config: Config) -> None:
        from postillon.dnsrecords.sts_server import warn_uncovered

        cert = tls_certificate(config)
        if cert is not None:
            warn_uncovered(cert.certificate, config.local_domains, acme_stand_in=cert.acme_stand_in)

    async def _start_admin(
        self,
        config: Config,
        intake: Intake,
        limiter: ConnectionLimiter,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        # Imported here: aiohttp takes a while to import, and the CLI
        # commands that import this module never serve HTTP.
        from postillon.admin.context import AdminContext
        from postillon.admin.queue_ops import QueueOps
        from postillon.admin.server import AdminServer, build_app
        from postillon.admin.tls import admin_tls_context
        from postillon.admin.token import TokenVerifier, token_path
        from postillon.observability.routes import add_ops_routes

        assert config.admin.listen is not None
        assert self.store is not None and self.runner is not None
        runner = self.runner
        admin_app = build_app(
            AdminContext(
                ops=QueueOps(
                    self.store,
                    SystemClock(),
                    intake=intake,
                    hostname=config.hostname,
                    maillog=self.maillog,
                    history=self.history,
                    wake_runner=runner.wake,
                    actor="api",
                ),
                token=TokenVerifier(token_path(config.data_dir)),
                hostname=config.hostname,
                listeners=self.listeners,
                limiter=limiter,
                in_flight=lambda: runner.in_flight,
                queue_health=self.store.health,
                certificate_status=self._certificate_status,
                flush_trace=self.trace.flush if self.trace is not None else None,
                tls_counting=self.tls_recorder is not None,
                flush_tls=self.tls_recorder.flush if self.tls_recorder is not None else None,
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

    def _certificate_status(self) -> dict[str, object] | None:
        """The ACME certificate's state for /healthz and the page (None without ACME)."""
        status = self.acme.status if self.acme is not None else None
        return status.as_dict() if status is not None else None

    def _start_tls_reports(self, config: Config, intake: Intake, clock: Clock) -> None:
        from postillon.tlsrpt.recorder import TlsReportRecorder
        from postillon.tlsrpt.schedule import DailyReports

        assert self.store is not None
        settings = config.tls_reports
        recorder = TlsReportRecorder(
            self.store.tls_reports, clock, flush_interval=settings.flush_interval
        )
        recorder.start()
        self.tls_recorder = self._builder.tls_observer = recorder
        reporter = tls_reporter(config, self.store, dns_resolver(config, self.metrics), intake)
        self.tls_daily = DailyReports(
            clock,
            settings.hour,
            reporter.report_day,
            prune=self.store.tls_reports.prune,
            keep_days=settings.keep_days,
        )
        self.tls_daily.start()

    def _start_dmarc_reports(self, config: Config, intake: Intake, clock: Clock) -> None:
        from postillon.dmarcrpt.recorder import DmarcReportRecorder
        from postillon.dmarcrpt.reporter import reporter_from_config
        from postillon.tlsrpt.schedule import DailyReports

        assert self.store is not None
        counters = self.store.policy_state.dmarc_reports
        settings = config.dmarc_reports
        recorder = DmarcReportRecorder(counters, clock, flush_interval=settings.flush_interval)
        recorder.start()
        self.dmarc_recorder = recorder
        self._builder.dmarc_observer = recorder.evaluated
        resolver = dns_resolver(config, self.metrics)
        reporter = reporter_from_config(config, counters, resolver, intake)
        self.dmarc_daily = DailyReports(
            clock, settings.hour, reporter.report_day, prune=counters.prune,
            keep_days=settings.keep_days, name="DMARC reports",
        )  # fmt: skip
        self.dmarc_daily.start()

    async def _start_helpers(
        self, config: Config, signer: DkimSigner | None, user: str | None
    ) -> None:
        """The helper processes, when they have work: an MX listener that checks mail,
        or RSA keys to sign with."""
        share_keys(self._helpers, signer)
        checks_mail = config.authentication.enabled and any(
            listen.kind == "smtp" for listen in config.listen
        )
        signs_rsa = signer is not None and any(k.algorithm == "rsa" for k in signer.keys)
        if self._helpers.processes and (checks_mail or signs_rsa):
            self._helpers.user = user
            await self._helpers.start()

    async def reload(self) -> ReloadResult:
        """Re-read the config and apply it (``reload.Reloader``); declined until the
        server is built and once it is stopping."""
        if self._reloader is None or self._stopping:
            log.warning("reload ignored: the server is starting or stopping")
            return ReloadResult(False, "the server is starting or stopping")
        return await self._reloader.reload()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let sessions finish (bounded), return leases, close the queue."""
        self._stopping = True
        if self._reloader is not None:
            self._reloader.stopping = True
        if grace is None:
            grace = self.config.shutdown.grace
        if self.admin is not None:
            await self.admin.stop()
        if self.acme is not None:
            await self.acme.stop()
        if self.mta_sts is not None:
            await self.mta_sts.stop()
        for listener in self.listeners:
            listener.stop_accepting()
        await asyncio.gather(*(lst.wait_sessions(grace) for lst in self.listeners))
        log.debug("stop: sessions done")
        if self.pickup is not None:
            await self.pickup.stop()
        if self.runner is not None:
            await self.runner.stop(grace)
        log.debug("stop: runner done")
        if self._reloader is not None:
            await self._reloader.close()
        elif self._smtp is not None:  # start failed before the reloader was made
            for transport in self._smtp:
                await transport.close()
        log.debug("stop: transports done")
        if self.tls_daily is not None:
            await self.tls_daily.stop()
        if self.tls_recorder is not None:
            await self.tls_recorder.stop()  # the last counts, before the store closes
        if self.dmarc_daily is not None:
            await self.dmarc_daily.stop()
        if self.state_pruner is not None:
            await self.state_pruner.stop()
        if self.dmarc_recorder is not None:
            await self.dmarc_recorder.stop()
        if self.store_failure is not None:
            self.store_failure.cancel()
        if self.history is not None:
            await self.history.stop()
        if self.trace is not None:
            await self.trace.stop()  # the last steps, before the store closes
        await self._helpers.close()
        if self.store is not None:
            await self.store.close()
        with contextlib.suppress(OSError):
            pid_path(self.config.data_dir).unlink()
        log.info("postillon stopped")
        self._stopped.set()
