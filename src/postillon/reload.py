"""Reload: new settings for a running server without closing a connection.

A reload has two halves, and only the first may fail:

1. **Build** everything the new config describes that can fail: read the config
   file, the certificate, aliases, accounts and DKIM keys, make resolvers and
   transports. Any error refuses the whole reload; the running config stays.
2. **Apply**: give each running component its new settings through its own
   ``reconfigure`` (intake, the connection limiter, every listener, the runner,
   pickup, the helper pool). No I/O, nothing that can fail half-way.

Sessions already running finish with the settings they started with; new sessions
and the next deliveries get the new ones. Settings that only a restart can apply
(listen addresses, data_dir, user, the queue store, ``[admin]``) keep their old
values and are reported (``config.changes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from postillon.build import (
    Builder,
    Policy,
    maildir_transport,
    retry_policy,
    router,
    tls_certificate,
)
from postillon.config.changes import effective, restart_needed
from postillon.config.loader import ConfigError, load_config
from postillon.config.model import Config
from postillon.core.credentials import redact
from postillon.core.sts import format_policy
from postillon.delivery.runner import Runner
from postillon.delivery.transport import Transport
from postillon.dnsrecords.records import served_policy
from postillon.helpers.pool import HelperPool
from postillon.inbound.accounts import AccountError
from postillon.inbound.limits import ConnectionLimiter
from postillon.inbound.listener import Listener
from postillon.inbound.tls import ServerCertificate
from postillon.intake.intake import Intake
from postillon.intake.pickup import Pickup
from postillon.observability.maillog import MailLog, configure_logging
from postillon.outbound.smtp_transport import SmtpTransport
from postillon.routing.aliases import AliasesError
from postillon.signing.remote_keys import shared_keys
from postillon.signing.signer import DkimSigner

if TYPE_CHECKING:
    from postillon.acme_service import AcmeService
    from postillon.dnsrecords.sts_server import StsServer

log = logging.getLogger("postillon")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What a reload did: applied or refused (``error`` says why), and the
    changed settings that only a restart applies."""

    applied: bool
    error: str = ""
    restart_needed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Built:
    """Step 1's result: everything step 2 hands out."""

    config: Config
    restart: tuple[str, ...]
    certificate: ServerCertificate | None
    tls_context: ssl.SSLContext | None
    policy: Policy
    # New SMTP/LMTP transports when [outbound], [dns], [[tls_policy]] or the hostname changed.
    smtp: tuple[SmtpTransport, SmtpTransport] | None
    # The MTA-STS policy text ([mta_sts] mode, max_age, mx).
    sts_policy: str


def share_keys(helpers: HelperPool, signer: DkimSigner | None) -> None:
    """The helpers sign with the signer's RSA keys (and no others: a reload replaces)."""
    helpers.share("keys", shared_keys(list(signer.keys) if signer else []))


class Reloader:
    """Owns the settings that change on reload (the config, the shared policy, the
    SMTP transports) for the composition root, and the running components it
    reconfigures. Made once the server is built (``App.start``)."""

    def __init__(
        self,
        *,
        config: Config,
        config_path: Path | None,
        builder: Builder,
        maillog: MailLog,
        policy: Policy,
        smtp: tuple[SmtpTransport, SmtpTransport],
        intake: Intake,
        runner: Runner,
        pickup: Pickup,
        limiter: ConnectionLimiter,
        listeners: list[Listener],
        helpers: HelperPool,
        mta_sts: StsServer | None = None,
        acme: AcmeService | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.policy = policy
        self.smtp = smtp
        self.stopping = False
        self._builder = builder
        self._maillog = maillog
        self._intake = intake
        self._runner = runner
        self._pickup = pickup
        self._limiter = limiter
        self._listeners = listeners
        self._helpers = helpers
        self._mta_sts = mta_sts
        self._acme = acme
        self._lock = asyncio.Lock()
        # SMTP transports replaced by a reload, closed again at stop.
        self._retired: list[SmtpTransport] = []
        self._background: set[asyncio.Task[None]] = set()

    async def reload(self) -> ReloadResult:
        """Reopen the log, re-read the config file, certificates, aliases and
        accounts, and apply them without closing a connection. Anything that
        fails (a config error, a missing certificate, a broken aliases or
        accounts file) refuses the whole reload: the errors are logged and
        the running configuration stays."""
        metrics = self._builder.metrics
        async with self._lock:
            if self.stopping:
                log.warning("reload ignored: the server is starting or stopping")
                return ReloadResult(False, "the server is starting or stopping")
            # First reopen the log under the running config (logrotate's
            # postrotate runs `postillon reload`): whatever follows, the log
            # goes to the new file.
            with contextlib.suppress(ConfigError):  # e.g. syslog away: keep the old handler
                configure_logging(self.config.log, self._maillog, self.config.hostname)
            try:
                built = self._build()
            except (ConfigError, AccountError, AliasesError, OSError, ValueError) as exc:
                metrics.reloads.labels("refused").inc()
                log.error("reload refused, the running configuration stays:\n%s", exc)
                return ReloadResult(False, redact(str(exc)))
            except Exception as exc:
                metrics.reloads.labels("refused").inc()
                log.exception("reload refused, the running configuration stays")
                return ReloadResult(False, redact(f"{type(exc).__name__}: {exc}"))
            self._apply(built)
            metrics.reloads.labels("ok").inc()
            if self._mta_sts is not None and built.certificate is not None:
                from postillon.dnsrecords.sts_server import warn_uncovered

                warn_uncovered(
                    built.certificate.certificate,
                    built.config.local_domains,
                    acme_stand_in=built.certificate.acme_stand_in,
                )
            if built.restart:
                log.warning(
                    "reload: these settings changed but need a restart to take effect: %s",
                    ", ".join(built.restart),
                )
            log.info(
                "configuration reloaded%s", f" from {self.config_path}" if self.config_path else ""
            )
            return ReloadResult(True, restart_needed=built.restart)

    def _build(self) -> _Built:
        """Step 1: everything that can fail; raises, and changes nothing running."""
        new = load_config(self.config_path) if self.config_path else self.config
        restart = tuple(restart_needed(self.config, new))
        new = effective(self.config, new)
        certificate = tls_certificate(new)
        tls_context = certificate.context() if certificate is not None else None
        policy = self._builder.policy(new, (self.config, self.policy))
        smtp = None
        if (new.outbound, new.dns, new.hostname, new.tls_policy, new.shaping, new.backoff) != (
            self.config.outbound,
            self.config.dns,
            self.config.hostname,
            self.config.tls_policy,
            self.config.shaping,
            self.config.backoff,
        ):
            smtp = self._builder.smtp_transports(new)
        sts_policy = format_policy(served_policy(new))
        # Last: from here on the log is written as the new config says.
        configure_logging(new.log, self._maillog, new.hostname)
        return _Built(new, restart, certificate, tls_context, policy, smtp, sts_policy)

    def _apply(self, built: _Built) -> None:
        """Step 2: each component takes its new settings; nothing here may fail half-way."""
        config, policy = built.config, built.policy
        self.config, self.policy = config, policy
        processes = config.helper_process_count()
        if processes != self._helpers.processes:
            self._helpers.resize(processes)
        share_keys(self._helpers, policy.signer)
        self._intake.reconfigure(
            config.hostname,
            config.limits.max_hops,
            policy.signer,
            self._helpers if processes else None,
        )
        self._limiter.reconfigure(config.limits.connections, config.limits.connections_per_ip)
        for listener in self._listeners:
            deps = self._builder.session_deps(
                config, listener, self._intake, policy, built.tls_context
            )
            listener.reconfigure(deps, built.certificate)
        transports: dict[str, Transport] = {"maildir": maildir_transport(config, policy.local)}
        if built.smtp is not None:
            # Deliveries in flight finish on the old transports; their pools
            # close idle connections now and reap the rest as they come back.
            for old in self.smtp:
                self._retired.append(old)
                task = asyncio.create_task(old.close())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            self.smtp = built.smtp
            transports["smtp"], transports["lmtp"] = built.smtp
        self._runner.reconfigure(
            router(config, policy.local),
            retry_policy(config),
            config.hostname,
            concurrency=config.queue.concurrency,
            lease_seconds=config.queue.lease,
            delay_warning=config.queue.delay_warning,
            node_timeout=config.queue.node_timeout,
            transports=transports,
        )
        self._pickup.reconfigure(config.hostname, config.limits.message_size)
        if self._acme is not None:
            self._acme.reconfigure(config)  # new names (domains) are ordered at once
        if self._mta_sts is not None:
            # The policy server presents the SMTP certificate: the new one from now on.
            if built.certificate is not None:
                built.certificate.load_into(self._mta_sts.tls)
            self._mta_sts.reconfigure(config.local_domains, built.sts_policy)

    async def close(self) -> None:
        """At stop: close the SMTP transports, the running ones and those a reload retired."""
        for transport in (*self.smtp, *self._retired):
            await transport.close()
