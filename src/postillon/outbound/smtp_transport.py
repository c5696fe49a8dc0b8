"""The SMTP (and LMTP) transport: next hops, host iteration, reuse, limits.

MTA-STS (RFC 8461) enters through one hook, ``mta_sts`` (an ``sts_policies.StsPolicies``,
built with ``[outbound] mta_sts``): for MX delivery the recipient domain's policy is found
once per delivery (:meth:`SmtpTransport._sts_policy`), ``mta_sts.decide`` says per MX host
what it requires before connecting (nothing, verified STARTTLS, or "not this host"), and
:meth:`SmtpTransport._sts_gate` checks the certificate right after STARTTLS, before AUTH
or MAIL. A refused host is skipped like an unreachable one, so the next MX is tried and,
when none is left, the mail is deferred with the MTA-STS reason. (DANE plugs in the same
way on its branch and wins over MTA-STS for a host it applies to: ``decide(dane_applies=)``.)
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from postillon.core.envelope import BodyType
from postillon.core.outcome import Delivered, Outcome, PermFail, TempFail, outcome_from_reply
from postillon.core.reply import Reply
from postillon.core.sts import StsPolicy
from postillon.delivery.transport import DeliveryJob
from postillon.dns.resolver import DnsNotFound, DnsTempError, Resolver
from postillon.observability.metrics import Metrics
from postillon.outbound import mta_sts
from postillon.outbound.client_session import (
    ClientTimeouts,
    SessionError,
    SmtpClientSession,
    TransactionResult,
)
from postillon.outbound.mta_sts import STS_STATUS, StsRefusal, StsRequirement
from postillon.outbound.mx import resolve_next_hops
from postillon.outbound.pool import ConnectionPool, Limits, PoolKey
from postillon.outbound.sts_policies import StsPolicies
from postillon.outbound.tls import load_anchors, peer_chain
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
    tls: Literal["opportunistic", "none", "required"] = "opportunistic"
    prefer_ipv6: bool = False
    concurrency: int = 100
    per_destination: int = 10
    messages_per_connection: int = 100
    idle_reuse: float = 10.0
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)


@dataclass(frozen=True, slots=True)
class _Target:
    host: str  # name for logs and SNI
    address: str  # IP address, or "" for a unix socket
    port: int
    hop: NextHop | None


class SmtpTransport:
    def __init__(
        self,
        resolver: Resolver,
        settings: OutboundSettings,
        *,
        lmtp: bool = False,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
        mta_sts: StsPolicies | None = None,
    ) -> None:
        self.resolver = resolver
        self.metrics = metrics
        self.settings = settings
        self.lmtp = lmtp
        # MTA-STS only where TLS is used at all, and never to LMTP next hops.
        self.mta_sts = mta_sts if settings.tls != "none" and not lmtp else None
        self.rng = rng or random.Random()
        self.pool = ConnectionPool(settings.idle_reuse, settings.messages_per_connection)
        self.limits = Limits(settings.concurrency, settings.per_destination)

    async def close(self) -> None:
        await self.pool.close()
        if self.mta_sts is not None:
            await self.mta_sts.close()

    # -- next hops -----------------------------------------------------------
    async def _targets(self, route: Route) -> list[_Target] | Outcome:
        hop = route.hop
        port = hop.port if hop is not None else self.settings.port
        if hop is not None and hop.unix_path:
            return [_Target(hop.unix_path, "", 0, hop)]
        if hop is not None and not hop.mx_lookup:
            return await self._host_targets(hop.host, port, hop)
        domain = hop.host if hop is not None else route.domain
        result = await resolve_next_hops(
            domain, self.resolver, prefer_ipv6=self.settings.prefer_ipv6, rng=self.rng
        )
        if result.failure is not None:
            return result.failure
        targets = [
            _Target(next_hop.host, address, port, hop)
            for next_hop in result.hops
            for address in next_hop.addresses
        ]
        return targets[:MAX_ADDRESSES] or TempFail(NO_ADDRESSES, domain)

    async def _host_targets(self, host: str, port: int, hop: NextHop) -> list[_Target] | Outcome:
        if _is_ip(host):
            return [_Target(host, host, port, hop)]
        try:
            answer = await self.resolver.addresses(host)
        except DnsTempError as exc:
            return TempFail(Reply.of(451, "4.4.3", f"DNS lookup of {host} failed: {exc.reason}"))
        except DnsNotFound:
            return TempFail(Reply.of(451, "4.4.4", f"Host {host} has no address (check the route)"))
        return [_Target(host, a, port, hop) for a in answer.records][:MAX_ADDRESSES]

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

    async def _try_targets(self, job: DeliveryJob, targets: list[_Target]) -> list[Outcome]:
        count = len(job.records)
        errors: list[SessionError] = []
        last_detail = ""
        policy = await self._sts_policy(job)
        for target in targets:
            sts = self._sts_for(job, target, policy)
            if isinstance(sts, StsRefusal):
                errors.append(SessionError(sts.reason, reply=Reply.of(451, STS_STATUS, sts.reason)))
                last_detail = _describe(target, None)
                log.info("%s: %s: %s", job.message.queue_id, last_detail, sts.reason)
                continue
            # Pooled by the requirement too: a connection that met no policy (or another)
            # must not carry mail that needs one.
            key: PoolKey = (target.address or target.host, target.port, self.lmtp, sts)
            session = self.pool.take(key)
            if session is not None:
                # A reused connection may have been closed by the server while
                # idle; that says nothing about the host, so retry it fresh.
                try:
                    result = await self._send(job, session)
                except SessionError:
                    session.close()
                else:
                    return await self._finish(key, target, session, result, sts)
                session = None
            try:
                session = await self._connect(target, sts)
                result = await self._send(job, session)
            except SessionError as exc:
                if session is not None:
                    session.close()
                errors.append(exc)
                last_detail = _describe(target, session, sts)
                log.info("%s: %s: %s", job.message.queue_id, last_detail, exc.detail)
                settled = _settled_before_failure(exc, last_detail)
                if settled is not None:
                    return settled
                continue
            return await self._finish(key, target, session, result, sts)
        return [_failure(errors, last_detail)] * count

    async def _sts_policy(self, job: DeliveryJob) -> StsPolicy | None:
        """The recipient domain's MTA-STS policy, for MX delivery only: a smarthost or a
        transport route is the operator's choice of next hop (RFC 8461 §3.4)."""
        if self.mta_sts is None or job.route.hop is not None:
            return None
        self.mta_sts.start()  # the background refresher, once, in the running loop
        return await self.mta_sts.policy_for(job.route.domain)

    def _sts_for(
        self, job: DeliveryJob, target: _Target, policy: StsPolicy | None
    ) -> StsRequirement | StsRefusal | None:
        if policy is None or self.mta_sts is None or not target.address:
            return None
        # DANE (on its branch) passes dane_applies=True for a host with a DANE requirement.
        return mta_sts.decide(job.route.domain, policy, target.host, ca_file=self.mta_sts.ca_file)

    async def _sts_gate(self, session: SmtpClientSession, sts: StsRequirement) -> None:
        """Right after STARTTLS, before AUTH or MAIL: the host must satisfy MTA-STS
        (enforce), or its failure is logged (testing, RFC 8461 §5)."""
        try:
            anchors = load_anchors(sts.ca_file)
        except (OSError, ValueError) as exc:  # a configuration problem: say it, verify nothing
            log.error("MTA-STS: cannot read [outbound] sts_ca_file: %s", exc)
            anchors = ()
        obj = session.ssl_object
        check = mta_sts.check(
            sts,
            peer_chain(obj) if obj is not None and session.tls else None,
            anchors=anchors,
            now=datetime.datetime.now(datetime.UTC),
        )
        if check.ok:
            session.tls_verified = True
            return
        if not sts.enforced:
            log.warning("%s (policy mode testing: delivering anyway)", check.reason)
            return
        await session.quit()
        raise SessionError(check.reason, reply=Reply.of(451, STS_STATUS, check.reason))

    async def _finish(
        self,
        key: PoolKey,
        target: _Target,
        session: SmtpClientSession,
        result: TransactionResult,
        sts: StsRequirement | None,
    ) -> list[Outcome]:
        detail = _describe(target, session, sts)
        # RFC 3461 §6.2.2: a next hop without DSN cannot honour NOTIFY=SUCCESS;
        # the runner then sends a "relayed" notice itself.
        dsn_passed = self.lmtp or "DSN" in session.extensions
        await self.pool.put(key, session)
        outcomes: list[Outcome] = []
        for reply in result.per_recipient:
            outcome = outcome_from_reply(reply, detail)
            if isinstance(outcome, Delivered) and not dsn_passed:
                outcome = Delivered(outcome.reply, outcome.detail, relayed_without_dsn=True)
            outcomes.append(outcome)
        return outcomes

    @staticmethod
    async def _send(job: DeliveryJob, session: SmtpClientSession) -> TransactionResult:
        params = job.message.mail_params
        return await session.send(
            job.message.sender,
            params,
            [(r.recipient, r.rcpt_params) for r in job.records],
            job.body(),
            job.message.size,
            needs_smtputf8=params.smtputf8,
            eight_bit=params.body is not BodyType.SEVEN_BIT,
        )

    async def _connect(
        self, target: _Target, sts: StsRequirement | None = None
    ) -> SmtpClientSession:
        hop = target.hop
        implicit = bool(hop and hop.implicit_tls)
        starttls: Literal["none", "opportunistic", "required"] = self.settings.tls
        if hop is not None and hop.username and not implicit:
            starttls = "required"  # never send a password in clear
        if sts is not None and sts.enforced:
            starttls = "required"  # RFC 8461 §5: enforce never delivers in clear
        if target.address == "":
            starttls = "none"  # LMTP over a local unix socket
        session = await SmtpClientSession.connect(
            target.address or target.host,
            target.port,
            helo_name=self.settings.helo_name,
            lmtp=self.lmtp,
            starttls=starttls,
            implicit_tls=implicit,
            server_hostname=target.host if not _is_ip(target.host) else None,
            unix_path=hop.unix_path if hop is not None else None,
            timeouts=self.settings.timeouts,
        )
        if self.metrics is not None:
            self._count_connection(self.metrics, session)
        if sts is not None:
            await self._sts_gate(session, sts)
        if hop is not None and hop.username:
            try:
                await session.authenticate(hop.username, hop.password or "")
            except SessionError:
                session.close()
                raise
        return session

    @staticmethod
    def _count_connection(metrics: Metrics, session: SmtpClientSession) -> None:
        metrics.connections.labels("out", "").inc()
        active = metrics.connections_active.labels("out", "")
        active.inc()
        session.on_close = active.dec
        if session.tls:
            metrics.tls.labels("out", session.tls.split()[0]).inc()


def _settled_before_failure(exc: SessionError, detail: str) -> list[Outcome] | None:
    """Outcomes already final when a connection broke mid-transaction.

    A recipient refused with 5xx at RCPT, or (LMTP) given its own 250 after
    DATA, must not be sent again: that would bounce late or deliver twice.
    The still-open recipients get the made-up 4xx and are retried later.
    None when nothing was settled, so the next host may take the whole job.
    """
    partial = exc.partial
    if partial is None or all(r.is_transient for r in partial.per_recipient):
        return None
    return [outcome_from_reply(reply, detail) for reply in partial.per_recipient]


def _failure(errors: list[SessionError], detail: str) -> Outcome:
    if not errors:
        return TempFail(NO_ADDRESSES, detail)
    last = errors[-1]
    reply = last.reply or Reply.of(451, "4.4.1", f"Connection failed: {last.detail}"[:400])
    if all(e.permanent for e in errors) and reply.is_permanent:
        return PermFail(reply, detail)
    if reply.is_permanent:
        # Some host failed temporarily: try again later rather than bounce.
        reply = Reply.of(451, "4.4.1", f"{reply.code} {' / '.join(reply.lines)}"[:400])
    return TempFail(reply, detail)


def _describe(
    target: _Target, session: SmtpClientSession | None, sts: StsRequirement | None = None
) -> str:
    where = target.host if not target.address else f"{target.host}[{target.address}]:{target.port}"
    if sts is not None:
        where += f" mta-sts={sts.mode}"
    if session is not None and session.tls:
        verified = "verified" if session.tls_verified else "unverified"
        return f"{where} tls={session.tls.split()[0]}/{verified}"
    return where


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
