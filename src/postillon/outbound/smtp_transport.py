"""The SMTP (and LMTP) transport: next hops, host iteration, reuse, limits.

TLS per host, in two steps that every mode shares: before connecting,
:meth:`SmtpTransport.requirement` resolves what the connection must prove
(``tls_policy.resolve`` for the table, the DANE lookup through ``dane``, a
``dane_policy.DaneHook`` built only with ``[dns] trust_ad``, the recipient
domain's MTA-STS policy through ``mta_sts``, an ``sts_policies.StsPolicies``
built with ``[outbound] mta_sts`` and turned into a per-host value by
``mta_sts.decide``, then ``tls_policy.decide`` for the precedence and
``for_credentials`` for a hop with a password); after the handshake the
session runs ``tls.check_requirement`` on the server's chain, before AUTH or
MAIL. A host refused before connecting (bogus DNSSEC, a ``dane`` rule without
secure TLSA, RFC 7672 §2.2; an MTA-STS enforce policy that does not list it,
RFC 8461 §4.1) or failing the check is skipped like an unreachable one: the
next MX is tried and, when none is left, the mail is deferred with the reason
(4.7.5). Each lookup runs once per delivery and only when the precedence can
use it (``consults_dane``, ``consults_sts``). Per message, ``requiretls``
(RFC 8689) relaxes the table's requirement before (``TLS-Required: No``) and
raises the decided one after (REQUIRETLS), checks the server's EHLO after TLS,
and makes a REQUIRETLS message's TLS failure a bounce.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from postillon.core.envelope import BodyType, MailParams, RcptParams
from postillon.core.outcome import Delivered, Outcome, TempFail, TlsDetails, outcome_from_reply
from postillon.core.reply import Reply
from postillon.core.sts import StsPolicy
from postillon.delivery.transport import DeliveryJob
from postillon.dns.resolver import Resolver
from postillon.observability.metrics import Metrics
from postillon.outbound import mta_sts, requiretls
from postillon.outbound.attempt_outcomes import (
    NO_ADDRESSES,
    describe,
    failure,
    settled_before_failure,
)
from postillon.outbound.attempt_outcomes import failure as _failure  # noqa: F401 (tests)
from postillon.outbound.client_session import (
    TLS_POLICY_STATUS,
    ClientTimeouts,
    SessionError,
    SmtpClientSession,
    TlsChecker,
    TransactionResult,
)
from postillon.outbound.connector import Connector, SourceRules
from postillon.outbound.dane_policy import DaneHook
from postillon.outbound.egress import EgressSettings, SourceSelector
from postillon.outbound.happy_eyeballs import DEFAULT_DELAY
from postillon.outbound.mx import resolve_next_hops
from postillon.outbound.pool import ConnectionPool, Limits, PoolKey
from postillon.outbound.session_tls import tls_details
from postillon.outbound.shaping import Shaper, chained
from postillon.outbound.smtputf8 import send_sendable
from postillon.outbound.sts_policies import StsFailure, StsPolicies
from postillon.outbound.targets import Target as Target
from postillon.outbound.targets import host_targets, is_ip, next_hop, shaping_domain
from postillon.outbound.targets import mx_targets as mx_targets
from postillon.outbound.tls import AUTHENTICATED_RESULTS, TlsCheck, check_requirement, load_anchors
from postillon.outbound.tls_observer import TlsObserver, observe_session
from postillon.outbound.tls_policy import (
    HostRefused,
    NoPublishedPolicy,
    TlsPolicyTable,
    TlsRequirement,
    consults_dane,
    consults_sts,
    decide,
    for_credentials,
    resolve,
)
from postillon.outbound.transaction_limits import send_within_limits
from postillon.routing.router import Route

log = logging.getLogger("postillon.outbound")

# Addresses tried per delivery attempt across all hosts (Postfix's
# smtp_mx_address_limit), so a domain with dozens of MX records cannot keep
# one delivery busy for hours.
MAX_ADDRESSES = 10

# A delivery waits at most this long for a free connection slot to its
# destination. A busy destination frees slots in milliseconds; a stalled one
# would otherwise hold the runner's whole active set and block every other
# destination, so past this wait the delivery is deferred instead.
DESTINATION_WAIT = 1.0
DESTINATION_BUSY = Reply.of(
    451, "4.4.5", "Too many connections to this destination in use; will retry"
)


@dataclass(frozen=True, slots=True)
class OutboundSettings:
    helo_name: str
    port: int = 25
    # [outbound] tls and [[tls_policy]] (see tls_policy.resolve).
    tls_policy: TlsPolicyTable = field(default_factory=TlsPolicyTable)
    prefer_ipv6: bool = False
    concurrency: int = 100
    per_destination: int = 10
    messages_per_connection: int = 100
    idle_reuse: float = 10.0
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    # [outbound] source_addresses, helo_names, source_selection (see egress.py).
    egress: EgressSettings = field(default_factory=EgressSettings)
    # [outbound] happy_eyeballs_delay: RFC 8305's Connection Attempt Delay.
    happy_eyeballs_delay: float = DEFAULT_DELAY


# What the DANE lookup said about one host, kept for the rest of a delivery.
_DaneAnswer = TlsRequirement | HostRefused | NoPublishedPolicy | None


@dataclass(slots=True)
class Lookups:
    """The DNS-published policies found during one delivery, each looked up once."""

    dane: dict[str, _DaneAnswer] = field(default_factory=dict)  # by MX host
    sts_done: bool = False
    sts: StsPolicy | None = None  # the recipient domain's MTA-STS policy
    sts_failure: StsFailure | None = None  # why it has none although it publishes one


class SmtpTransport:
    def __init__(
        self,
        resolver: Resolver,
        settings: OutboundSettings,
        *,
        lmtp: bool = False,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        dane: DaneHook | None = None,
        mta_sts: StsPolicies | None = None,
        tls_observer: TlsObserver | None = None,
        source_rules: SourceRules | None = None,
        shaper: Shaper | None = None,
    ) -> None:
        self.resolver = resolver
        # [[shaping]] and [backoff] (outbound/shaping.py); never for LMTP next hops.
        self.shaper = shaper if not lmtp else None
        self.sources = SourceSelector(settings.egress, settings.helo_name)
        # Source addresses and Happy Eyeballs (connector.py).
        self.connector = Connector(
            self.sources,
            source_rules,
            prefer_ipv6=settings.prefer_ipv6,
            delay=settings.happy_eyeballs_delay,
            connect_timeout=settings.timeouts.connect,
        )
        self.metrics = metrics
        self.settings = settings
        self.lmtp = lmtp
        self.rng = rng or random.Random()
        self.pool = ConnectionPool(settings.idle_reuse, settings.messages_per_connection)
        # DANE's DNS side (None without [dns] trust_ad: then DANE cannot run, and a
        # policy = "dane" rule defers, see tls_policy.decide). Never for LMTP next hops.
        self.dane = dane if not lmtp else None
        # MTA-STS's policies (None with [outbound] mta_sts = false); never for LMTP.
        self.mta_sts = mta_sts if not lmtp else None
        self.limits = Limits(settings.concurrency, settings.per_destination)
        # Told of every MX session's TLS result where it is counted (_count_tls):
        # [tls_reports], RFC 8460 (see tls_observer.py). Never for LMTP.
        self.tls_observer = tls_observer if not lmtp else None

    async def close(self) -> None:
        await self.pool.close()
        if self.mta_sts is not None:
            await self.mta_sts.close()

    # -- next hops -----------------------------------------------------------
    async def _targets(self, route: Route) -> list[Target] | Outcome:
        hop = route.hop
        port = hop.port if hop is not None else self.settings.port
        if hop is not None and hop.unix_path:
            return [Target(hop.unix_path, "", 0, hop)]
        if hop is not None and not hop.mx_lookup:
            return await host_targets(self.resolver, hop.host, port, hop, MAX_ADDRESSES)
        domain = hop.host if hop is not None else route.domain
        result = await resolve_next_hops(
            domain, self.resolver, prefer_ipv6=self.settings.prefer_ipv6, rng=self.rng
        )
        if result.failure is not None:
            return result.failure
        targets = mx_targets(result, port, hop)
        return targets[:MAX_ADDRESSES] or TempFail(NO_ADDRESSES, domain)

    # -- delivery ------------------------------------------------------------
    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        count = len(job.records)
        targets = await self._targets(job.route)
        if not isinstance(targets, list):
            return [targets] * count
        if not targets:
            return [TempFail(NO_ADDRESSES, job.route.domain)] * count
        if self.shaper is not None:  # suspended, or over its message rate: not attempted
            where = shaping_domain(targets[0])
            hop = next_hop(targets[0])
            claimed = min(r.updated_at for r in job.records)
            admitted = await self.shaper.admit(where, [t.host for t in targets], hop, claimed)
            if isinstance(admitted, TempFail):
                return [admitted] * count
        slot = self.limits.destination(job.route.key)
        try:
            async with asyncio.timeout(DESTINATION_WAIT):
                await slot.acquire()
        except TimeoutError:
            return [TempFail(DESTINATION_BUSY, job.route.key, attempted=False)] * count
        try:
            async with self.limits.total:
                return await self._try_targets(job, targets)
        finally:
            slot.release()

    async def _try_targets(self, job: DeliveryJob, targets: list[Target]) -> list[Outcome]:
        """Each host in turn; a host's addresses raced (Happy Eyeballs, RFC 8305)."""
        count = len(job.records)
        errors: list[SessionError] = []
        last_detail = ""
        last_tls: TlsDetails | None = None  # the last host's TLS, for the outcome
        lookups = Lookups()
        unconnected = 0  # addresses that accepted no connection
        pending = self.connector.reachable(job.route.domain, targets, errors)
        while pending:
            first = pending[0]
            params = job.message.mail_params
            requirement = await self.requirement(job.route, first, lookups, params)
            if isinstance(requirement, HostRefused):  # not this host: try the next
                pending.pop(0)
                errors.append(
                    SessionError(
                        requirement.reason,
                        status=TLS_POLICY_STATUS,
                        tls_result=requirement.result,
                    )
                )
                last_detail = describe(first, None, requirement)
                last_tls = tls_details(first.host, first.address, None, requirement)
                self._count_tls(requirement, requirement.result, first, requirement.reason)
                log.info("%s: %s: %s", job.message.queue_id, last_detail, requirement.reason)
                continue
            same_host = (first.host, first.port, first.hop)
            group = [t for t in pending if (t.host, t.port, t.hop) == same_host]
            sources = self.connector.source_pool(job.route.domain, first.host)
            # Pooled by requirement too: a connection that met a weaker policy
            # (or none) must not carry mail that needs a stronger one.
            for key, target in self.connector.pool_keys(group, sources, self.lmtp, requirement):
                session = self.pool.take(key)
                if session is None:
                    continue
                # A reused connection may have been closed by the server while
                # idle; that says nothing about the host, so retry it fresh.
                again = functools.partial(self.connect, target, requirement, source=key[4])
                try:
                    result, session = await self._send(job, session, requirement, again)
                except SessionError as lost:
                    session.close()
                    # A part of a split delivery that went through is not sent again.
                    partial = lost.partial.per_recipient if lost.partial else ()
                    if any(reply.code < 300 for reply in partial):
                        detail = describe(target, None, requirement)
                        return settled_before_failure(lost, detail) or []
                else:
                    return await self._finish(key, target, session, result, requirement)
            raced = await self.connector.race(group, sources, job.route.key)
            errors.extend(error for _, error in raced.failed)
            unconnected += len(raced.failed)
            for failed, why in raced.failed:
                last_detail = describe(failed, None, requirement)
                log.info("%s: %s: %s", job.message.queue_id, last_detail, why.detail)
            gone = [t for t, _ in raced.failed] + [raced.target]
            pending = [t for t in pending if t not in gone]
            if raced.target is None:
                continue
            for slow in raced.stalled:  # RFC 8305: no answer within the stagger
                log.info(
                    "%s: %s[%s]:%d did not answer within %gs; connected to %s instead",
                    *(job.message.queue_id, slow.host, slow.address, slow.port),
                    *(self.settings.happy_eyeballs_delay, raced.target.address),
                )
            target, sock, source = raced.target, raced.sock, raced.source
            session = None
            key = (target.address or target.host, target.port, self.lmtp, requirement, source)
            try:
                session = await self.connect(target, requirement, sock=sock, source=source)
                again = functools.partial(self.connect, target, requirement, source=source)
                result, session = await self._send(job, session, requirement, again)
            except SessionError as error:
                if self.shaper is not None:  # a 421 or 4xx burst suspends the destination
                    await self.shaper.observe(shaping_domain(target), target.host, error=error)
                if session is not None:
                    session.close()
                elif error.tls_result:  # the connection failed its TLS policy
                    self._count_tls(requirement, error.tls_result, target, error.detail)
                # RFC 8689 §4.2.1: a REQUIRETLS message's TLS failure is a bounce.
                exc = requiretls.failure(requirement, error, null_sender=not job.message.sender)
                errors.append(exc)
                last_detail = describe(target, session, requirement)
                last_tls = tls_details(target.host, target.address, session, requirement, error)
                log.info("%s: %s: %s", job.message.queue_id, last_detail, exc.detail)
                settled = settled_before_failure(exc, last_detail, last_tls)
                if settled is not None:
                    return settled
                continue
            return await self._finish(key, target, session, result, requirement)
        outcome = failure(errors, last_detail, last_tls)
        if self.shaper is not None and errors and unconnected == len(errors):
            reason = f"{last_detail}: {errors[-1].detail}"  # no address took a connection
            await self.shaper.unreachable(next_hop(targets[0]), reason)
        return [outcome] * count

    async def _finish(
        self,
        key: PoolKey,
        target: Target,
        session: SmtpClientSession,
        result: TransactionResult,
        requirement: TlsRequirement,
    ) -> list[Outcome]:
        detail = describe(target, session, requirement)
        tls = tls_details(target.host, target.address, session, requirement)
        # RFC 3461 §6.2.2: a next hop without DSN cannot honour NOTIFY=SUCCESS;
        # the runner then sends a "relayed" notice itself.
        dsn_passed = self.lmtp or "DSN" in session.extensions
        most = None
        if self.shaper is not None:
            where = shaping_domain(target)
            await self.shaper.observe(where, target.host, result=result)
            most = self.shaper.messages_per_connection(where, target.host)
        await self.pool.put(key, session, max_messages=most)
        outcomes: list[Outcome] = []
        for reply in result.per_recipient:
            outcome = outcome_from_reply(reply, detail, tls)
            if isinstance(outcome, Delivered) and not dsn_passed:
                outcome = Delivered(outcome.reply, detail, relayed_without_dsn=True, tls=tls)
            outcomes.append(outcome)
        return outcomes

    async def _send(
        self,
        job: DeliveryJob,
        session: SmtpClientSession,
        requirement: TlsRequirement,
        reconnect: Callable[[], Awaitable[SmtpClientSession]],
    ) -> tuple[TransactionResult, SmtpClientSession]:
        """The job's transaction(s) on ``session``: split to fit the server's RFC
        9422 LIMITS (``reconnect`` when MAILMAX is reached); the session last used."""
        params = requiretls.mail_params(job.message.mail_params, requirement)
        recipients = [(r.recipient, r.rcpt_params) for r in job.records]

        async def send(session: SmtpClientSession, part: range) -> TransactionResult:
            async def send_these(rcpts: Sequence[tuple[str, RcptParams]]) -> TransactionResult:
                return await session.send(
                    job.message.sender,
                    params,
                    rcpts,
                    job.body(),
                    job.message.size,
                    smtputf8=params.smtputf8,  # said where offered; no need by itself
                    eight_bit=params.body is not BodyType.SEVEN_BIT,
                )

            # A non-ASCII local part to a server without SMTPUTF8: 5.6.7, the rest go.
            chosen = recipients[part.start : part.stop]
            return await send_sendable(session.extensions, chosen, send_these)

        return await send_within_limits(session, len(recipients), send, reconnect)

    async def requirement(
        self, route: Route, target: Target, lookups: Lookups, params: MailParams
    ) -> TlsRequirement | HostRefused:
        """What the connection to ``target`` must prove, or why not to connect
        (the precedence is tls_policy's; here only its inputs are gathered)."""
        hop = target.hop
        if target.address == "":
            return TlsRequirement("none", source="unix socket")  # LMTP on this machine
        # The next-hop destination: the host of a smarthost or route (for
        # smtp:host, the domain whose MX hosts these are), else the recipient domain.
        destination = hop.host if hop is not None else route.domain
        requirement = resolve(destination, target.host, self.settings.tls_policy)
        # TLS-Required: No (RFC 8689 §4.2.2): final opportunistic, so no lookups below.
        requirement = requiretls.relax(requirement, params, lmtp=self.lmtp)
        mx_delivery = hop is None or hop.mx_lookup
        dane: _DaneAnswer = None
        if (
            self.dane is not None
            and consults_dane(requirement, mx_delivery=mx_delivery)
            and not is_ip(target.host)  # no name, no TLSA
        ):
            if target.host not in lookups.dane:  # once per host and delivery
                lookups.dane[target.host] = await self.dane.lookup(
                    target.host,
                    target.port,
                    mx_secure=target.mx_secure,
                    address_secure=target.address_secure,
                    canonical=target.canonical,
                )
            dane = lookups.dane[target.host]
        sts = None
        if (
            self.mta_sts is not None
            and consults_sts(requirement, dane, recipient_mx=hop is None)
            and not is_ip(target.host)
        ):
            if not lookups.sts_done:  # once per delivery, and only when it can matter
                self.mta_sts.start()  # the background refresher, once, in the running loop
                found = await self.mta_sts.policy_or_failure(route.domain)
                lookups.sts, lookups.sts_failure = found
                lookups.sts_done = True
            sts = mta_sts.decide(
                route.domain, lookups.sts, target.host, ca_file=self.mta_sts.ca_file
            )
        decided = decide(requirement, dane=dane, sts=sts, host=target.host)
        if isinstance(decided, HostRefused):
            return decided
        if lookups.sts_failure is not None and sts is None and decided.mode != "dane":
            # RFC 8460 §4.3.2.2: the session is reported as the policy's failure.
            decided = dataclasses.replace(decided, sts_failure=lookups.sts_failure)
        # REQUIRETLS (RFC 8689 §4.2.1): authenticated TLS (DANE and MTA-STS count).
        decided = requiretls.require(decided, target.host, params, lmtp=self.lmtp)
        if hop is not None and hop.username:
            # Never send a password to an unverified server.
            decided = for_credentials(
                decided,
                target.host,
                ca_file=hop.tls_ca_file,
                fingerprints=hop.tls_fingerprints,
                source="credentials",
            )
        return decided

    def tls_checker(self, target: Target, requirement: TlsRequirement) -> TlsChecker:
        """The handshake judge for this connection; raises SessionError when its
        trust anchors cannot be read (a configuration problem: defer, say why)."""
        testing = requirement.sts == "testing" and requirement.mode != "verify"
        anchors: tuple[object, ...] = ()
        try:
            if requirement.mode == "verify" or testing:
                anchors = load_anchors(requirement.ca_file)
        except (OSError, ValueError) as exc:
            if not testing:
                raise SessionError(
                    f"cannot read CA file {requirement.ca_file} ({requirement.source}): {exc}",
                    status="4.3.5",
                    tls_result="config-error",
                ) from exc
            # MTA-STS testing must never stop a delivery (RFC 8461 §5): say it, go on.
            log.error("MTA-STS: cannot read [outbound] sts_ca_file: %s", exc)
        # Recording only (RFC 7435): the system CAs are parsed (with cryptography) after a
        # handshake, not for every connection: never without TLS (bench/README.md "Memory").
        recording = requirement.mode in ("none", "opportunistic", "encrypt") and not anchors

        def check(chain: list[bytes]) -> TlsCheck:
            result = check_requirement(
                requirement,
                chain,
                host=target.host,
                anchors=_recording_anchors() if recording else anchors,
                now=datetime.datetime.now(datetime.UTC),
            )
            if testing and result.reason:  # reported, not enforced (RFC 8461 §5)
                log.warning("%s (policy mode testing: delivering anyway)", result.reason)
            return result

        return check

    async def connect(
        self,
        target: Target,
        requirement: TlsRequirement,
        tls_check: TlsChecker | None = None,
        *,
        sock: socket.socket | None = None,
        source: str | None = None,
    ) -> SmtpClientSession:
        """Connect, EHLO, STARTTLS and check the chain as ``requirement`` asks (then
        AUTH for a hop with credentials). ``tls_check``: the checker to use instead of
        :meth:`tls_checker` (``postillon tls check`` wraps it to see the chain).
        ``sock``: connected already (from ``source``, whose HELO name is said)."""
        hop = target.hop
        implicit = bool(hop and hop.implicit_tls)
        opening = SmtpClientSession.connect(
            target.address or target.host,
            target.port,
            sock=sock,
            local_address=source if sock is None else None,
            helo_name=self.sources.helo_name(source),
            lmtp=self.lmtp,
            starttls=requirement.starttls,
            tls_check=tls_check or self.tls_checker(target, requirement),
            implicit_tls=implicit,
            server_hostname=target.host if not is_ip(target.host) else None,
            unix_path=hop.unix_path if hop is not None else None,
            timeouts=self.settings.timeouts,
        )
        if self.shaper is None:
            session = await opening
        else:  # a connection slot and connect token ([[shaping]])
            where = shaping_domain(target)
            try:
                session = await self.shaper.opened(where, target.host, target.address, opening)
            except BaseException:
                if sock is not None:  # raced already (Happy Eyeballs): not used now
                    sock.close()
                raise
        if self.metrics is not None:
            self._count_connection(self.metrics, session)
        result = session.tls_result if session.tls else "plaintext"
        self._count_tls(requirement, result, target)
        refused = requiretls.session_error(requirement, session.extensions)
        if refused is not None:  # RFC 8689 §4.2.1: before AUTH or MAIL
            await session.quit()
            raise refused
        if requirement.sts == "testing" and not session.tls and target.address:
            log.warning(  # RFC 8460 starttls-not-supported, reported only (RFC 8461 §5)
                "MTA-STS: %s does not offer STARTTLS (policy mode testing: delivering anyway)",
                target.host,
            )
        if hop is not None and hop.username:
            if not requirement.authenticated or session.tls_result not in AUTHENTICATED_RESULTS:
                # for_credentials made sure of it; kept as a last guard here, at
                # the one place a password leaves.
                session.close()
                raise SessionError(
                    f"AUTH withheld: {target.host} did not prove its identity",
                    status=TLS_POLICY_STATUS,
                )
            try:
                await session.authenticate(hop.username, hop.password or "")
            except SessionError:
                session.close()
                raise
        return session

    def _count_tls(
        self,
        requirement: TlsRequirement | HostRefused | None,
        result: str,
        target: Target,
        reason: str = "",
    ) -> None:
        """The one place each session's TLS result is counted: the metric, and the
        observer (TLS reporting) for MX sessions. ``requirement``: what applied (a
        refused host's ``HostRefused``)."""
        mode = requirement.mode if requirement is not None else "none"
        if self.metrics is not None:
            self.metrics.outbound_tls.labels(mode, result).inc()
        if self.tls_observer is not None and target.mx_domain:
            where = (target.mx_domain, target.host, target.address)
            observe_session(self.tls_observer, requirement, result, where, reason)

    @staticmethod
    def _count_connection(metrics: Metrics, session: SmtpClientSession) -> None:
        metrics.connections.labels("out", "").inc()
        active = metrics.connections_active.labels("out", "")
        active.inc()
        session.on_close = chained(active.dec, session.on_close)  # and the shaping slot
        if session.tls:
            metrics.tls.labels("out", session.tls.split()[0]).inc()


@functools.lru_cache(maxsize=1)
def _recording_anchors() -> tuple[object, ...]:
    """The system CAs, for recording whether a certificate would verify (RFC 7435)."""
    try:
        return load_anchors(None)
    except (OSError, ValueError):
        return ()
