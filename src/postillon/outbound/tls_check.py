"""``postillon tls check DOMAIN``: which TLS policy applies to a destination, and why.

Design note
-----------
The operator's view of the outbound TLS policy (issue 14 item 8), gathered through the
transport's own code paths so it cannot disagree with a delivery: the MX hosts come from
``mx.resolve_next_hops`` and ``smtp_transport.mx_targets``; each host's requirement from
:meth:`SmtpTransport.requirement` (``tls_policy.resolve``, the DANE hook, MTA-STS, then
``tls_policy.decide``: the one precedence); the test connection from
:meth:`SmtpTransport.connect` with the transport's own checker (``tls.check_requirement``),
wrapped only to see the chain. The connection QUITs before MAIL: no message is sent.

Beside what the transport needs, it shows what an operator wants to see: the TLSA records
as published (usable or not), the MTA-STS policy and whether it came from the queue
store's cache or a fresh fetch, the certificate. The CLI renders :class:`DomainCheck`
(``rich`` tables, or ``--json`` from :meth:`DomainCheck.to_json`); the admin API can serve
the same JSON.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from postillon.core.envelope import MailParams
from postillon.dns.resolver import Answer, TlsaRecord, dnssec_state
from postillon.outbound.client_session import SessionError
from postillon.outbound.dane import usable_records
from postillon.outbound.dane_policy import tlsa_name
from postillon.outbound.mx import resolve_next_hops
from postillon.outbound.smtp_transport import Lookups, SmtpTransport, Target, mx_targets
from postillon.outbound.sts_policies import PolicyStore
from postillon.outbound.tls import TlsCheck
from postillon.outbound.tls_policy import HostRefused, NoPublishedPolicy, TlsRequirement
from postillon.routing.router import Route

__all__ = ["DomainCheck", "HostCheck", "check_domain"]

Decision = Literal["deliver", "refused", "unreachable"]


@dataclass(slots=True)
class Connection:
    """What a test connection to one address showed."""

    address: str
    ok: bool = False
    ehlo: bool = False
    starttls: bool = False
    tls_version: str = ""
    cipher: str = ""
    subject: str = ""
    sans: list[str] = field(default_factory=list)
    issuer: str = ""
    not_after: str = ""
    check_result: str = ""  # tls.check_requirement's label (verified, dane-ee, ...)
    check_reason: str = ""
    requiretls: bool = False
    error: str = ""


@dataclass(slots=True)
class HostCheck:
    host: str
    preference: int
    addresses: list[str]
    address_secure: bool
    tlsa_name: str = ""
    tlsa_state: str = ""  # secure, insecure, not found, bogus; "" when not looked up
    tlsa: list[dict[str, Any]] = field(default_factory=list)
    dane: str = ""  # what the DANE hook said (its reason when no policy applied)
    sts_match: bool | None = None
    requirement: dict[str, Any] = field(default_factory=dict)
    connection: Connection | None = None
    decision: Decision = "deliver"
    reason: str = ""

    @property
    def line(self) -> str:
        """One line: ``mx1.example.net  dane (dane-ee)  → deliver``."""
        if self.decision == "refused" and not self.requirement:
            return f"{self.host}  refused: {self.reason}"
        mode = self.requirement.get("mode", "")
        sts = self.requirement.get("sts", "")
        label = mode + (f" mta-sts={sts}" if sts else "")
        if self.decision == "deliver":
            how = self.connection.check_result if self.connection else "not connected"
            return f"{self.host}  {label} ({how})  → deliver"
        return f"{self.host}  {label}  {self.decision}: {self.reason}"


@dataclass(slots=True)
class DomainCheck:
    domain: str
    error: str = ""
    mx_secure: bool = False
    implicit_mx: bool = False
    trust_ad: bool = False
    rule: dict[str, Any] | None = None
    default: str = ""
    sts: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    hosts: list[HostCheck] = field(default_factory=list)
    connected: bool = True

    @property
    def exit_code(self) -> int:
        """0 every host would get mail; 1 some host is refused or unreachable; 2 none
        can be reached (DNS failure, no host, every host unreachable)."""
        decisions = [h.decision for h in self.hosts]
        if self.error or not decisions or all(d == "unreachable" for d in decisions):
            return 2
        return 0 if all(d == "deliver" for d in decisions) else 1

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["exit_code"] = self.exit_code
        for host, raw in zip(self.hosts, data["hosts"], strict=True):
            raw["line"] = host.line
        return data


def _requirement_json(req: TlsRequirement) -> dict[str, Any]:
    return {
        "mode": req.mode,
        "source": req.source,
        "match": list(req.match),
        "ca_file": req.ca_file,
        "sts": req.sts,
        "final": req.final,
        "usable_tlsa": None if req.tlsa is None else len(req.tlsa),
        "authenticated": req.authenticated,
    }


def _tlsa_json(record: TlsaRecord, usable: bool) -> dict[str, Any]:
    return {
        "usage": record.usage,
        "selector": record.selector,
        "mtype": record.mtype,
        "data": record.data.hex(),
        "usable": usable,
    }


def _describe_certificate(conn: Connection, der: bytes) -> None:
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        conn.subject = f"(unparsable certificate: {exc})"
        return
    conn.subject = cert.subject.rfc4514_string()
    conn.issuer = cert.issuer.rfc4514_string()
    conn.not_after = cert.not_valid_after_utc.isoformat()
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        conn.sans = [str(n) for n in ext.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        conn.sans = []


async def _probe(
    transport: SmtpTransport, target: Target, req: TlsRequirement
) -> tuple[Connection, Decision, str]:
    """One test connection: EHLO, STARTTLS, the check; QUIT before MAIL."""
    conn = Connection(target.address)
    seen: dict[str, Any] = {}
    try:
        base = transport.tls_checker(target, req)

        def check(chain: list[bytes]) -> TlsCheck:
            seen["chain"] = chain
            result = base(chain)
            seen["result"] = result
            return result

        session = await transport.connect(target, req, tls_check=check)
    except SessionError as exc:
        conn.error = exc.detail
        result = seen.get("result")
        if result is not None:
            conn.ehlo = conn.starttls = True
            conn.check_result, conn.check_reason = result.result, result.reason
        if seen.get("chain"):
            _describe_certificate(conn, seen["chain"][0])
        if exc.tls_result:  # the host failed its TLS policy: refused, like the transport
            conn.ehlo = True
            conn.check_result = conn.check_result or exc.tls_result
            return conn, "refused", exc.detail
        return conn, "unreachable", exc.detail
    except OSError as exc:
        conn.error = str(exc)
        return conn, "unreachable", conn.error
    try:
        conn.ok = conn.ehlo = True
        conn.starttls = bool(session.tls)
        if session.tls:
            conn.tls_version, _, conn.cipher = session.tls.partition(" ")
        conn.check_result = session.tls_result if session.tls else "plaintext"
        result = seen.get("result")
        if result is not None:
            conn.check_reason = result.reason
        if seen.get("chain"):
            _describe_certificate(conn, seen["chain"][0])
        conn.requiretls = "REQUIRETLS" in session.extensions
    finally:
        await session.quit()
    return conn, "deliver", ""


async def check_domain(
    domain: str,
    transport: SmtpTransport,
    *,
    store: PolicyStore | None = None,
    port: int | None = None,
    connect: bool = True,
    clock: Callable[[], float] = time.time,
) -> DomainCheck:
    """Everything ``postillon tls check`` prints, for mail to ``domain`` by MX."""
    domain = domain.lower().rstrip(".")
    out = DomainCheck(domain, trust_ad=transport.dane is not None, connected=connect)
    table = transport.settings.tls_policy
    out.default = table.default
    rule = table.lookup(domain)
    if rule is not None:
        out.rule = {
            "domain": rule.domain,
            "policy": rule.mode,
            "match": list(rule.match),
            "ca_file": rule.ca_file,
            "fingerprints": [f"sha256:{f.hex()}" for f in rule.fingerprints],
        }
    mx = await resolve_next_hops(
        domain, transport.resolver, prefer_ipv6=transport.settings.prefer_ipv6, rng=transport.rng
    )
    out.notes.extend(mx.notes)
    if mx.failure is not None:
        reply = mx.failure.reply
        out.error = f"{' '.join(reply.lines)} ({mx.failure.detail})"
        return out
    out.mx_secure, out.implicit_mx = mx.authenticated, mx.implicit
    lookups = Lookups()
    if transport.mta_sts is not None:
        before = await store.sts_policy(domain) if store is not None else None
        policy = await transport.mta_sts.policy_for(domain)
        after = await store.sts_policy(domain) if store is not None else None
        lookups.sts, lookups.sts_done = policy, True  # the transport uses this one
        if policy is not None:
            now = clock()
            cached = (
                before is not None and after is not None and before.fetched_at == after.fetched_at
            )
            entry = after if after is not None else before
            out.sts = {
                "mode": policy.mode,
                "max_age": policy.max_age,
                "mx": list(policy.mx),
                "source": "cached" if cached else "fetched",
                "fetched_at": _iso(entry.fetched_at) if entry is not None else None,
                "expires_at": _iso(entry.expires_at) if entry is not None else None,
                "expired": entry is not None and not entry.fresh(now),
            }
        else:
            out.sts = {"mode": "", "source": "none"}
    else:
        out.notes.append("MTA-STS is off ([outbound] mta_sts = false)")
    targets = mx_targets(mx, port if port is not None else transport.settings.port)
    route = Route("smtp", domain, domain)
    for next_hop in mx.hops:
        host_targets = [t for t in targets if t.host == next_hop.host]
        check = HostCheck(
            next_hop.host, next_hop.preference, list(next_hop.addresses), next_hop.authenticated
        )
        out.hosts.append(check)
        if not host_targets:
            check.decision, check.reason = "unreachable", "no address"
            continue
        first = host_targets[0]
        if transport.dane is not None:
            await _tlsa(transport, check, first)
        decided = await transport.requirement(route, first, lookups, MailParams())
        dane = lookups.dane.get(next_hop.host)
        if isinstance(dane, NoPublishedPolicy | HostRefused):
            check.dane = dane.reason
        elif isinstance(dane, TlsRequirement):
            check.dane = f"applies ({dane.source})"
        if lookups.sts is not None:
            check.sts_match = lookups.sts.covers(next_hop.host)
        if isinstance(decided, HostRefused):
            check.decision, check.reason = "refused", decided.reason
            check.requirement = {}
            continue
        check.requirement = _requirement_json(decided)
        if not connect:
            continue
        check.decision, check.reason = "unreachable", "no address answered"
        for target in host_targets:
            conn, decision, reason = await _probe(transport, target, decided)
            check.connection, check.decision, check.reason = conn, decision, reason
            if decision != "unreachable":
                break
    return out


async def _tlsa(transport: SmtpTransport, check: HostCheck, target: Target) -> None:
    """The TLSA records as published, usable or not (the hook keeps only the usable)."""
    if not (target.mx_secure and target.address_secure):
        return  # DANE cannot apply (RFC 7672 §2.2): the hook does not look, nor do we
    check.tlsa_name = tlsa_name(target.host, target.port)
    try:
        answer: Answer[TlsaRecord] | BaseException = await transport.resolver.tlsa(check.tlsa_name)
    except Exception as exc:  # shown as its DNSSEC state; the hook decides what it means
        answer = exc
    check.tlsa_state = dnssec_state(answer)
    if isinstance(answer, Answer):
        usable = set(usable_records(answer.records))
        check.tlsa = [_tlsa_json(r, r in usable) for r in answer.records]


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")
