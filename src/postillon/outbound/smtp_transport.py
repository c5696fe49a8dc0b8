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
from collections.abc import Sequence
from dataclasses import dataclass, field

from postillon.core.envelope import BodyType, MailParams
from postillon.core.outcome import (
    Delivered,
    Outcome,
    PermFail,
    TempFail,
    TlsDetails,
    outcome_from_reply,
)
from postillon.core.reply import Reply
from postillon.core.sts import StsPolicy
from postillon.delivery.transport import DeliveryJob
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver
from postillon.observability.metrics import Metrics
from postillon.outbound import mta_sts, requiretls
from postillon.outbound.client_session import (
    TLS_POLICY_STATUS,
    ClientTimeouts,
    SessionError,
    SmtpClientSession,
    TlsChecker,
    TransactionResult,
)
from postillon.outbound.dane_policy import DaneHook
from postillon.outbound.mx import MxResult, resolve_next_hops
from postillon.outbound.pool import ConnectionPool, Limits, PoolKey
from postillon.outbound.session_tls import describe, tls_details
from postillon.outbound.sts_policies import StsFailure, StsPolicies
from postillon.outbound.tls import AUTHENTICATED_RESULTS, TlsCheck, check_requirement, load_anchors
from postillon.outbound.tls_observer import TlsObserver, TlsSessionResult, published_policy
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
from postillon.routing.router import NextHop, Route

log = logging.getLogger("postillon.outbound")

# Addresses tried per delivery attempt across all hosts (Postfix's
# smtp_mx_address_limit), so a domain with dozens of MX records cannot keep
# one delivery busy for hours.
MAX_ADDRESSES = 10

NO_ADDRESSES = Reply.of(451, "4.4.4", "No usable address for the destination host")
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


# What the DANE lookup said about one host, kept for the rest of a delivery.
_DaneAnswer = TlsRequirement | HostRefused | NoPublishedPolicy | None


@dataclass(slots=True)
class Lookups:
    """The DNS-published policies found during one delivery, each looked up once."""

    dane: dict[str, _DaneAnswer] = field(default_factory=dict)  # by MX host
    sts_done: bool = False
    sts: StsPolicy | None = None  # the recipient domain's MTA-STS policy
    sts_failure: StsFailure | None = None  # why it has none although it publishes one


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # name for logs and SNI
    address: str  # IP address, or "" for a unix socket
    port: int
    hop: NextHop | None
    # DNSSEC (RFC 7672 §2.2): the MX answer (True for a host the operator named)
    # and this host's address answer were secure.
    mx_secure: bool = False
    address_secure: bool = False
    # The domain whose MX this host is (RFC 8460's policy domain); "" for a host
    # the operator named (smarthost, route), whose TLS is not reported.
    mx_domain: str = ""
    canonical: str = ""  # the CNAME-expanded host name, "" when not an alias (RFC 7672 §2.2.2)


def mx_targets(result: MxResult, port: int, hop: NextHop | None = None) -> list[Target]:
    """One target per address of each MX host of ``result``, in order (what the
    transport tries, and what ``postillon tls check`` shows)."""
    return [
        Target(
            h.host, a, port, hop, result.authenticated, h.authenticated, result.domain, h.canonical
        )
        for h in result.hops
        for a in h.addresses
    ]


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
    ) -> None:
        self.resolver = resolver
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
            return await self._host_targets(hop.host, port, hop)
        domain = hop.host if hop is not None else route.domain
        result = await resolve_next_hops(
            domain, self.resolver, prefer_ipv6=self.settings.prefer_ipv6, rng=self.rng
        )
        if result.failure is not None:
            return result.failure
        targets = mx_targets(result, port, hop)
        return targets[:MAX_ADDRESSES] or TempFail(NO_ADDRESSES, domain)

    async def _host_targets(self, host: str, port: int, hop: NextHop) -> list[Target] | Outcome:
        if _is_ip(host):
            return [Target(host, host, port, hop)]
        try:
            answer = await self.resolver.addresses(host)
        except DnsTempError as exc:
            return TempFail(Reply.of(451, "4.4.3", f"DNS lookup of {host} failed: {exc.reason}"))
        except DnsNotFound:
            return TempFail(Reply.of(451, "4.4.4", f"Host {host} has no address (check the route)"))
        # A configured host name needs no secure MX (RFC 7672 §2.2.2: its name came
        # from us, not from DNS); its addresses still do.
        secure = answer.authenticated
        return [Target(host, a, port, hop, True, secure) for a in answer.records][:MAX_ADDRESSES]

    # -- delivery ------------------------------------------------------------
    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        count = len(job.records)
        targets = await self._targets(job.route)
        if not isinstance(targets, list):
            return [targets] * count
        if not targets:
            return [TempFail(NO_ADDRESSES, job.route.domain)] * count
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
        count = len(job.records)
        errors: list[SessionError] = []
        last_detail = ""
        last_tls: TlsDetails | None = None  # the last host's TLS, for the outcome
        lookups = Lookups()
        for target in targets:
            params = job.message.mail_params
            requirement = await self.requirement(job.route, target, lookups, params)
            if isinstance(requirement, HostRefused):  # not this host: try the next
                errors.append(
                    SessionError(
                        requirement.reason,
                        status=TLS_POLICY_STATUS,
                        tls_result=requirement.result,
                    )
                )
                last_detail = _describe(target, None, requirement)
                last_tls = tls_details(target.host, target.address, None, requirement)
                self._count_tls(requirement, requirement.result, target, requirement.reason)
                log.info("%s: %s: %s", job.message.queue_id, last_detail, requirement.reason)
                continue
            # Pooled by requirement too: a connection that met a weaker policy
            # (or none) must not carry mail that needs a stronger one.
            key = (target.address or target.host, target.port, self.lmtp, requirement)
            session = self.pool.take(key)
            if session is not None:
                # A reused connection may have been closed by the server while
                # idle; that says nothing about the host, so retry it fresh.
                try:
                    result = await self._send(job, session, requirement)
                except SessionError:
                    session.close()
                else:
                    return await self._finish(key, target, session, result, requirement)
                session = None
            try:
                session = await self.connect(target, requirement)
                result = await self._send(job, session, requirement)
            except SessionError as error:
                if session is not None:
                    session.close()
                elif error.tls_result:  # the connection failed its TLS policy
                    self._count_tls(requirement, error.tls_result, target, error.detail)
                # RFC 8689 §4.2.1: a REQUIRETLS message's TLS failure is a bounce.
                exc = requiretls.failure(requirement, error, null_sender=not job.message.sender)
                errors.append(exc)
                last_detail = _describe(target, session, requirement)
                last_tls = tls_details(target.host, target.address, session, requirement, error)
                log.info("%s: %s: %s", job.message.queue_id, last_detail, exc.detail)
                settled = _settled_before_failure(exc, last_detail, last_tls)
                if settled is not None:
                    return settled
                continue
            return await self._finish(key, target, session, result, requirement)
        return [_failure(errors, last_detail, last_tls)] * count

    async def _finish(
        self,
        key: PoolKey,
        target: Target,
        session: SmtpClientSession,
        result: TransactionResult,
        requirement: TlsRequirement,
    ) -> list[Outcome]:
        detail = _describe(target, session, requirement)
        tls = tls_details(target.host, target.address, session, requirement)
        # RFC 3461 §6.2.2: a next hop without DSN cannot honour NOTIFY=SUCCESS;
        # the runner then sends a "relayed" notice itself.
        dsn_passed = self.lmtp or "DSN" in session.extensions
        await self.pool.put(key, session)
        outcomes: list[Outcome] = []
        for reply in result.per_recipient:
            outcome = outcome_from_reply(reply, detail, tls)
            if isinstance(outcome, Delivered) and not dsn_passed:
                outcome = Delivered(outcome.reply, detail, relayed_without_dsn=True, tls=tls)
            outcomes.append(outcome)
        return outcomes

    @staticmethod
    async def _send(
        job: DeliveryJob, session: SmtpClientSession, requirement: TlsRequirement
    ) -> TransactionResult:
        params = requiretls.mail_params(job.message.mail_params, requirement)
        return await session.send(
            job.message.sender,
            params,
            [(r.recipient, r.rcpt_params) for r in job.records],
            job.body(),
            job.message.size,
            needs_smtputf8=params.smtputf8,
            eight_bit=params.body is not BodyType.SEVEN_BIT,
        )

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
            and not _is_ip(target.host)  # no name, no TLSA
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
            and not _is_ip(target.host)
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
        if requirement.mode in ("none", "opportunistic", "encrypt") and not anchors:
            anchors = _recording_anchors()

        def check(chain: list[bytes]) -> TlsCheck:
            result = check_requirement(
                requirement,
                chain,
                host=target.host,
                anchors=anchors,
                now=datetime.datetime.now(datetime.UTC),
            )
            if testing and result.reason:  # reported, not enforced (RFC 8461 §5)
                log.warning("%s (policy mode testing: delivering anyway)", result.reason)
            return result

        return check

    async def connect(
        self, target: Target, requirement: TlsRequirement, tls_check: TlsChecker | None = None
    ) -> SmtpClientSession:
        """Connect, EHLO, STARTTLS and check the chain as ``requirement`` asks (then
        AUTH for a hop with credentials). ``tls_check``: the checker to use instead of
        :meth:`tls_checker` (``postillon tls check`` wraps it to see the chain)."""
        hop = target.hop
        implicit = bool(hop and hop.implicit_tls)
        session = await SmtpClientSession.connect(
            target.address or target.host,
            target.port,
            helo_name=self.settings.helo_name,
            lmtp=self.lmtp,
            starttls=requirement.starttls,
            tls_check=tls_check or self.tls_checker(target, requirement),
            implicit_tls=implicit,
            server_hostname=target.host if not _is_ip(target.host) else None,
            unix_path=hop.unix_path if hop is not None else None,
            timeouts=self.settings.timeouts,
        )
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
            applied = requirement if isinstance(requirement, TlsRequirement) else None
            tlsa = applied.tlsa if applied is not None else None
            # An MX an enforce policy refused is reported under that policy (sts), not
            # as no-policy-found (RFC 8460 §4.3); HostRefused carries its text.
            sts_text = requirement.sts_policy if requirement is not None else ""
            policy_type, strings = published_policy(
                mode, tlsa, sts_lines=sts_text.splitlines() if sts_text else None
            )
            failure = applied.sts_failure if applied is not None else None
            if failure is not None:  # no MTA-STS policy to apply: that is the result
                policy_type, strings, (result, reason) = "sts", (), failure
            self.tls_observer.tls_session(
                TlsSessionResult(
                    target.mx_domain,
                    mode,
                    result,
                    target.host,
                    target.address,
                    policy_type,
                    strings,
                    reason,
                )
            )

    @staticmethod
    def _count_connection(metrics: Metrics, session: SmtpClientSession) -> None:
        metrics.connections.labels("out", "").inc()
        active = metrics.connections_active.labels("out", "")
        active.inc()
        session.on_close = active.dec
        if session.tls:
            metrics.tls.labels("out", session.tls.split()[0]).inc()


def _settled_before_failure(
    exc: SessionError, detail: str, tls: TlsDetails | None
) -> list[Outcome] | None:
    """Outcomes already final when a connection broke mid-transaction.

    A recipient refused with 5xx at RCPT, or (LMTP) given its own 250 after
    DATA, must not be sent again: that would bounce late or deliver twice.
    The still-open recipients get the made-up 4xx and are retried later.
    None when nothing was settled, so the next host may take the whole job.
    """
    partial = exc.partial
    if partial is None or all(r.is_transient for r in partial.per_recipient):
        return None
    return [outcome_from_reply(reply, detail, tls) for reply in partial.per_recipient]


def _failure(errors: list[SessionError], detail: str, tls: TlsDetails | None = None) -> Outcome:
    if not errors:
        return TempFail(NO_ADDRESSES, detail)
    last = errors[-1]
    if last.reply is not None:
        reply = last.reply
    elif last.status:  # a TLS policy or local failure: the reason is the reply
        reply = Reply.of(550 if last.permanent else 451, last.status, last.detail[:400])
    else:
        reply = Reply.of(451, "4.4.1", f"Connection failed: {last.detail}"[:400])
    if all(e.permanent for e in errors) and reply.is_permanent:
        return PermFail(reply, detail, tls)
    if reply.is_permanent:
        # Some host failed temporarily: try again later rather than bounce.
        reply = Reply.of(451, "4.4.1", f"{reply.code} {' / '.join(reply.lines)}"[:400])
    return TempFail(reply, detail, tls=tls)


def _describe(
    target: Target, session: SmtpClientSession | None, req: TlsRequirement | HostRefused
) -> str:
    """The delivery log line's relay text (``session_tls.describe``)."""
    return describe(target.host, target.address, target.port, session, req)


@functools.lru_cache(maxsize=1)
def _recording_anchors() -> tuple[object, ...]:
    """The system CAs, for recording whether a certificate would verify (RFC 7435)."""
    try:
        return load_anchors(None)
    except (OSError, ValueError):
        return ()


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
