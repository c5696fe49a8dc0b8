"""Inbound authentication: SPF, DKIM, DMARC and ARC for one message, at end of data.

Design note
-----------
The session calls :meth:`InboundAuthentication.evaluate` after the last
byte of DATA/BDAT and before the message is committed, so a rejection means
nothing was queued. First, on the event loop and all at once, the TXT
records the checks are sure to need (both SPF identities, every DKIM key)
and the DMARC record are fetched through postillon's resolver. Then:

* DKIM is verified by ``dkimcore`` with those answers, inline (a worker
  thread only for large messages, see ``dkim_check``);
* SPF comes from the result cache when both identities are in it;
* only what is left, SPF evaluations not cached and ARC chains (pyspf and
  dkimpy are blocking and look names up themselves), runs in ONE worker
  thread, its lookups handed back to the resolver (``blocking_dns.py``).

A bulk sender's message thus costs no thread hop at all (the figures are in
``bench/README.md``).

The verdict carries what the transaction should become: one new
``Authentication-Results:`` field naming this host (RFC 8601), any policy
marks (the quarantine header), the client's header section with forged
results for this host removed, and, when the message is forwarded off
this server through an alias, an ARC set sealed with the forwarding
domain's key (RFC 8617 §5.1). Policy itself is ``auth_policy.decide``.

At most ``max_verify_concurrency`` messages are verified at once
(``verify_slot``): each may hold its whole message in memory, up to
``max_arc_size`` (ARC's dkimpy wants it whole), so without a bound the memory a
client could make the server hold grew with the number of its sessions. Larger
messages, up to ``max_verify_size``, have their DKIM body hashes computed from
the spool chunk by chunk (``verify_dkim_streamed``) and get no ARC verification
or seal: a 10 MiB message is verified holding one chunk at a time. A message that gets no slot
within ``verify_wait`` seconds is answered ``VERIFY_BUSY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from postillon.checks.arc_check import ArcOutcome, arc_seal, has_arc_headers, verify_arc
from postillon.checks.auth_policy import Decision, decide
from postillon.checks.authresults import MethodResult, header_values, render, strip_own_results
from postillon.checks.blocking_dns import BlockingDns
from postillon.checks.dkim_check import (
    dkim_key_names,
    verify_dkim_message,
    verify_dkim_streamed,
)
from postillon.checks.dmarc_check import (
    AuthIdentity,
    PolicyLookup,
    aligned,
    cached_policy,
    discover_policy,
    evaluate,
    from_domain_of,
    organizational_domain,
)
from postillon.checks.spf_check import SpfCache, SpfOutcome, cached_spf, check_spf
from postillon.config.model import AuthenticationConfig
from postillon.core.dmarc import AuthResult, DmarcResultCount, PublishedPolicy
from postillon.core.reply import Reply
from postillon.dns.resolver import Resolver
from postillon.helpers.pool import HelperPool

log = logging.getLogger("postillon.checks.authentication")

# RFC 3463 X.3.2 "system not accepting network messages": busy, try later.
VERIFY_BUSY = Reply.of(451, "4.3.2", "Too busy to check this message now, try again later")


class VerifyBusy(Exception):
    """No verification slot came free within ``verify_wait`` seconds."""


# Told of each DMARC evaluation whose record asks for aggregate reports (rua=): the
# ``dmarcrpt`` recorder (RFC 7489 §7.2), handed in by the composition root. The row's
# ``day`` is left empty: the recorder stamps it with its clock. Must not block.
DmarcObserver = Callable[[DmarcResultCount], None]

# A forwarding domain's ARC key: (selector, PEM private key), or None
# (``signing.keys.KeyStore.arc_sealing_key``, handed in by the composition root).
SealingKey = tuple[str, bytes]
SealingKeys = Callable[[str], SealingKey | None]


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What the checks look at, gathered by the session."""

    client_ip: str
    helo: str
    mail_from: str  # "" for the null reverse-path
    header: bytes  # the client's header section (CRLF lines, no final empty line)
    # The whole message as received, in memory: only up to max_arc_size (ARC needs it so,
    # dkimpy has no streaming interface). None above it, or when too large to verify.
    message: bytes | None
    # (delivery address, address the client gave) for each recipient
    recipients: Sequence[tuple[str, str]] = ()
    # The body (after the header section's empty line) read from the spool in chunks,
    # when ``message`` is None but DKIM is still verified: hashed streaming.
    body: Callable[[], Iterable[bytes]] | None = None

    @property
    def dkim_verified(self) -> bool:
        return self.message is not None or self.body is not None


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    results: list[MethodResult]
    prepend: bytes  # header fields to put on top of the message
    header: bytes  # the client's header section, own forged results removed
    removed: int = 0  # forged Authentication-Results removed
    sealed_for: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """``spf=pass dkim=pass dmarc=pass arc=none`` for the mail log."""
        return " ".join(
            f"{r.method}{'(helo)' if r.prop('smtp.helo') else ''}={r.result}" for r in self.results
        )


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".")


def _within(domain: str, listed: Sequence[str]) -> bool:
    return any(domain == d or domain.endswith("." + d) for d in listed)


class InboundAuthentication:
    def __init__(
        self,
        config: AuthenticationConfig,
        resolver: Resolver,
        authserv_id: str,
        *,
        local_domains: frozenset[str] = frozenset(),
        sealing_keys: SealingKeys | None = None,
        helpers: HelperPool | None = None,
        dmarc_observer: DmarcObserver | None = None,
    ) -> None:
        self.config = config
        self.dmarc_observer = dmarc_observer
        self.helpers = helpers
        self.resolver = resolver
        self.authserv_id = authserv_id
        self.local_domains = local_domains
        self.sealing_keys = sealing_keys
        self._networks = [ipaddress.ip_network(n, strict=False) for n in config.allow_networks]
        # Per instance (so per resolver): results live at most a minute (spf_check.SpfCache).
        self.spf_cache = SpfCache()
        # One bound for every listener of the process (one instance per policy;
        # a reload makes a new one while messages in flight finish on the old).
        self._slots = asyncio.Semaphore(config.max_verify_concurrency)

    @contextlib.asynccontextmanager
    async def verify_slot(self) -> AsyncIterator[None]:
        """Hold one of ``max_verify_concurrency`` slots while a message is read
        into memory and verified; ``VerifyBusy`` after ``verify_wait`` seconds."""
        try:
            async with asyncio.timeout(self.config.verify_wait):
                await self._slots.acquire()
        except TimeoutError:
            raise VerifyBusy from None
        try:
            yield
        finally:
            self._slots.release()

    def _allowlisted(self, facts: MessageFacts, from_domain: str) -> bool:
        if self._networks:
            try:
                ip = ipaddress.ip_address(facts.client_ip)
            except ValueError:
                ip = None
            if ip is not None and any(ip in net for net in self._networks):
                return True
        domains = self.config.allow_domains
        if not domains:
            return False
        return _within(_domain_of(facts.mail_from), domains) or (
            bool(from_domain) and _within(from_domain, domains)
        )

    def _blocking_checks(
        self, bridge: BlockingDns, facts: MessageFacts, spf: SpfOutcome | None, arc: bool
    ) -> tuple[SpfOutcome, ArcOutcome | None]:
        """The checks whose libraries look names up themselves (worker thread)."""
        if spf is None:
            spf = check_spf(bridge, facts.client_ip, facts.mail_from, facts.helo, self.spf_cache)
        if not arc or facts.message is None:
            return spf, None
        return spf, verify_arc(bridge, facts.message)

    @staticmethod
    def _names_to_prefetch(facts: MessageFacts, key_names: list[str]) -> list[str]:
        """TXT names the checks will certainly ask: the SPF records of both
        identities and each signature's DKIM key."""
        names = [_domain_of(facts.mail_from) or facts.helo.lower(), facts.helo.lower()]
        names.extend(key_names)
        return [n for n in names if "." in n and not n.startswith("[")]

    async def evaluate(self, facts: MessageFacts) -> Verdict:
        loop = asyncio.get_running_loop()
        bridge = BlockingDns(self.resolver, loop)
        key_names = dkim_key_names(facts.header) if facts.dkim_verified else []
        from_domain, from_problem = from_domain_of(header_values(facts.header, "From"))
        # The DMARC record: from the resolver's cache, or looked up alongside the rest.
        dmarc_lookup: asyncio.Future[PolicyLookup] | None = None
        if from_domain:
            known = cached_policy(self.resolver, from_domain)
            if known is not None:
                dmarc_lookup = loop.create_future()
                dmarc_lookup.set_result(known)
            else:
                dmarc_lookup = asyncio.ensure_future(discover_policy(self.resolver, from_domain))
        await bridge.prefetch_txt(self._names_to_prefetch(facts, key_names))
        try:
            if facts.message is not None:
                dkim_results = await verify_dkim_message(
                    facts.message, key_names, bridge, self.helpers
                )
            elif facts.body is not None:
                dkim_results = await verify_dkim_streamed(
                    facts.header, facts.body, key_names, bridge
                )
            else:
                too_big = MethodResult("dkim", "policy", "message too large to verify")
                dkim_results = [too_big]
            cached = cached_spf(self.spf_cache, facts.client_ip, facts.mail_from, facts.helo)
            wants_arc = facts.message is not None and has_arc_headers(facts.header)
            arc: ArcOutcome | None = None
            if facts.message is not None:
                arc = ArcOutcome(MethodResult("arc", "none"))
            elif facts.body is not None and has_arc_headers(facts.header):
                # Not verified: dkimpy needs the whole message in memory (max_arc_size).
                arc = ArcOutcome(MethodResult("arc", "none", "message too large for ARC"))
            if cached is not None and not wants_arc:
                spf = cached
            else:
                spf, arc_found = await asyncio.to_thread(
                    self._blocking_checks, bridge, facts, cached, wants_arc
                )
                if wants_arc:
                    arc = arc_found
        finally:
            if dmarc_lookup is not None and not dmarc_lookup.done():
                await asyncio.wait([dmarc_lookup])
        results: list[MethodResult] = [spf.mailfrom]
        if spf.helo is not None:
            results.append(spf.helo)
        results.extend(dkim_results)
        if arc is not None:
            results.append(arc.clause)

        if dmarc_lookup is None:
            dmarc = MethodResult("dmarc", "permerror", from_problem)
            policy = "none"
        else:
            lookup: PolicyLookup = dmarc_lookup.result()
            dkim_ids = [
                AuthIdentity(r.prop("header.d"), r.result)
                for r in dkim_results
                if r.prop("header.d")
            ]
            spf_id = AuthIdentity(spf.domain, spf.result) if spf.domain else None
            dmarc, policy = evaluate(from_domain, lookup, spf_id, dkim_ids)
            if not facts.dkim_verified and dmarc.result == "fail":
                # We did not verify DKIM: never act on a verdict we could not reach.
                dmarc = MethodResult("dmarc", "none", "DKIM not verified", dmarc.properties)
                policy = "none"
            if dmarc.result == "fail" and arc is not None:
                dmarc, policy = self._arc_override(dmarc, policy, arc, from_domain)
        results.append(dmarc)
        lookup_done = dmarc_lookup.result() if dmarc_lookup is not None else None

        decision = decide(
            self.config,
            dmarc_result=dmarc.result,
            dmarc_policy=policy,
            from_domain=from_domain,
            spf_result=spf.result,
            spf_domain=spf.domain,
            allowlisted=self._allowlisted(facts, from_domain),
        )
        if self.dmarc_observer is not None and lookup_done is not None:
            record = lookup_done.record
            if record is not None and record.rua and dmarc.result in ("pass", "fail"):
                # The disposition is what DMARC applied (§7.2 Appendix C): "none" when
                # the policy was none, even if a local rule (SPF fail) held the message.
                applied = decision.action if policy != "none" else "none"
                row = dmarc_report_row(facts, from_domain, lookup_done, spf, dkim_results, applied)
                self.dmarc_observer(row)
        header, removed = strip_own_results(facts.header, self.authserv_id)
        prepend = render(self.authserv_id, results)
        if decision.action == "quarantine":
            prepend += f"{self.config.quarantine_header}: {decision.reason}\r\n".encode()
        sealed_for: list[str] = []
        if decision.action in ("accept", "quarantine") and facts.message is not None:
            arc_set, sealed_for = await self._seal(facts, prepend, header)
            prepend = arc_set + prepend
        return Verdict(decision, results, prepend, header, removed, sealed_for)

    def _arc_override(
        self, dmarc: MethodResult, policy: str, arc: ArcOutcome, from_domain: str
    ) -> tuple[MethodResult, str]:
        """RFC 8617 §7.2 / RFC 7489 §7.2.1.1 "trusted_forwarder": a chain that
        verifies, sealed by a forwarder we trust, whose seal recorded a DMARC
        pass for the same author domain, keeps DMARC passing here."""
        trusted = self.config.arc_trusted_sealers
        if (
            arc.clause.result == "pass"
            and _within(arc.sealer, trusted)
            and arc.sealed_dmarc == "pass"
            and organizational_domain(arc.sealed_from or from_domain)
            == organizational_domain(from_domain)
        ):
            comment = f"arc override: sealed by {arc.sealer} i={arc.instance}; local: fail"
            return MethodResult("dmarc", "pass", comment, dmarc.properties), "none"
        return dmarc, policy

    async def _seal(
        self, facts: MessageFacts, prepend: bytes, header: bytes
    ) -> tuple[bytes, list[str]]:
        """An ARC set for the first local domain that forwards this message off-server."""
        if not self.config.arc_seal or self.sealing_keys is None or facts.message is None:
            return b"", []
        forwarding = []
        for target, given in facts.recipients:
            source, dest = _domain_of(given), _domain_of(target)
            leaves = source in self.local_domains and dest not in self.local_domains
            if leaves and source not in forwarding:
                forwarding.append(source)
        for domain in forwarding:
            key = self.sealing_keys(domain)
            if key is None:
                continue
            selector, pem = key
            body = facts.message[len(facts.header) :]
            message = prepend + header + body
            try:
                sealed = await asyncio.to_thread(
                    arc_seal, message, selector, domain, pem, self.authserv_id
                )
            except Exception:
                log.exception("ARC sealing for %s failed; forwarding unsealed", domain)
                return b"", []
            # One seal per message: the stored body is the same for every recipient.
            return sealed, [domain]
        return b"", []


def dmarc_report_row(
    facts: MessageFacts,
    from_domain: str,
    lookup: PolicyLookup,
    spf: SpfOutcome,
    dkim_results: Sequence[MethodResult],
    action: str,
) -> DmarcResultCount:
    """One evaluation as an RFC 7489 §7.2 report ``<record>`` (day left to the recorder).
    ``dkim``/``spf`` are the DMARC-aligned results (Appendix C ``policy_evaluated``);
    the raw results go in ``auth_results``."""
    record = lookup.record
    assert record is not None
    dkim_raw = tuple(
        AuthResult(r.prop("header.d"), r.result, r.prop("header.s"))
        for r in dkim_results
        if r.prop("header.d")
    )
    dkim_pass = any(
        r.result == "pass" and aligned(r.domain, from_domain, record.adkim) for r in dkim_raw
    )
    spf_pass = (
        spf.result == "pass" and bool(spf.domain) and aligned(spf.domain, from_domain, record.aspf)
    )
    domain = lookup.record_domain or from_domain
    disposition = {"reject": "reject", "quarantine": "quarantine"}.get(action, "none")
    recipient_domain = facts.recipients[0][1].rpartition("@")[2].lower() if facts.recipients else ""
    return DmarcResultCount(
        "",
        domain,
        PublishedPolicy(
            domain, record.adkim, record.aspf, record.policy, record.subdomain_policy, record.pct
        ),
        facts.client_ip,
        from_domain,
        _domain_of(facts.mail_from),
        recipient_domain,
        disposition,
        "pass" if dkim_pass else "fail",
        "pass" if spf_pass else "fail",
        dkim_raw,
        (AuthResult(spf.domain, spf.result, "mfrom"),) if spf.domain else (),
    )
