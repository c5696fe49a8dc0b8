"""Next hops for a destination domain (RFC 5321 §5.1, RFC 7505 null MX).

Design note
-----------
``resolve_next_hops`` turns a recipient domain into an ordered list of hosts, each with its
addresses, or into a failure *value* (DESIGN principle 6) that the transport hands back as
the outcome of every recipient for that domain:

=====================================  =====================================================
DNS says                               result
=====================================  =====================================================
MX records                             hosts by preference, random order among equal ones
a single MX of ``.`` (null MX)         ``PermFail`` 556 5.1.10 (RFC 7505 §3)
no MX records (NODATA)                 implicit MX: the domain itself, with its A/AAAA
NXDOMAIN                               ``PermFail`` 550 5.1.2 (bad destination system)
temporary failure of the MX lookup     ``TempFail`` 451 4.4.3 (directory server failure)
no host has an address, some lookup    ``TempFail`` 451 4.4.3
failed temporarily
no host has an address, all for good   ``PermFail`` 550 5.4.4 (unable to route)
=====================================  =====================================================

A DNS error nobody classified (a resolver raising something unexpected) counts as
temporary: retrying is recoverable, bouncing wrongly is not. A host whose address lookup
fails is skipped and noted in ``MxResult.notes`` (for the log, never for the peer); hosts
that resolve are used even if a more preferred one did not (RFC 5321 §5.1 asks the client
to try the others). Addresses of one host come IPv4 first, or IPv6 first with
``prefer_ipv6``; within a family their order is shuffled (spreads load across a host's
addresses, as Postfix's ``smtp_randomize_addresses``). Pass a seeded ``random.Random`` for
reproducible order.

An address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) needs no DNS (RFC 5321 §5.1).
MX targets that are IP addresses or loopback names are not special-cased: they are looked
up as host names like any other. Dropping MX hosts whose preference is not better than the
local host's own (RFC 5321 §5.1, to avoid loops) needs the local host names and is left to
the outbound transport, as is the limit on how many hosts and addresses to try.

Names are CNAME-followed by the resolver. At most ``max_hosts`` MX hosts are resolved (a
domain controls how many MX records it publishes; each costs two queries).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

from postillon.core.address import AddressError, domain_to_ascii
from postillon.core.outcome import PermFail, TempFail
from postillon.core.reply import Reply
from postillon.dns.resolver import Answer, DnsNotFound, DnsTempError, MxRecord, Resolver

__all__ = [
    "DEFAULT_MAX_HOSTS",
    "DNS_TEMP_FAILURE",
    "NO_ROUTE",
    "NO_SUCH_DOMAIN",
    "NULL_MX",
    "MxResult",
    "NextHop",
    "order_mx",
    "resolve_next_hops",
]

# Named replies (enhanced codes from RFC 3463 and RFC 7505).
NULL_MX = Reply.of(556, "5.1.10", "Recipient address has null MX")
NO_SUCH_DOMAIN = Reply.of(550, "5.1.2", "Bad destination system address")
NO_ROUTE = Reply.of(550, "5.4.4", "Unable to route: no mail exchanger has an address")
DNS_TEMP_FAILURE = Reply.of(451, "4.4.3", "Temporary DNS failure looking up the destination")

# A domain controls how many MX records it publishes; resolving each costs two queries.
DEFAULT_MAX_HOSTS = 10

_DEFAULT_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class NextHop:
    """One host to try, with its addresses in the order to try them."""

    host: str
    addresses: tuple[str, ...]
    preference: int = 0
    authenticated: bool = False  # the address records came with AD (DANE, RFC 7672 §2.2)
    # The name after CNAMEs when ``host`` is an alias ("" when it is not): DANE looks
    # up TLSA there first (RFC 7672 §2.2.2).
    canonical: str = ""


@dataclass(frozen=True, slots=True)
class MxResult:
    """Where to deliver mail for ``domain``: ``hops`` in order, or a ``failure``.

    Exactly one of the two is non-empty. ``implicit`` says no MX existed and the domain's
    own addresses are used (RFC 5321 §5.1). ``authenticated`` is the AD bit of the MX (or,
    when implicit, address) answer. ``notes`` say what was skipped, for the log.
    """

    domain: str
    hops: tuple[NextHop, ...] = ()
    failure: TempFail | PermFail | None = None
    implicit: bool = False
    authenticated: bool = False
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failure is None


def _temp(domain: str, detail: str, notes: Sequence[str] = ()) -> MxResult:
    return MxResult(domain, failure=TempFail(DNS_TEMP_FAILURE, detail), notes=tuple(notes))


def _perm(domain: str, reply: Reply, detail: str, notes: Sequence[str] = ()) -> MxResult:
    return MxResult(domain, failure=PermFail(reply, detail), notes=tuple(notes))


def order_mx(records: Sequence[MxRecord], rng: random.Random) -> list[MxRecord]:
    """Sort by preference, shuffling records of equal preference (RFC 5321 §5.1); keep
    the first (most preferred) occurrence of each host."""
    by_pref: dict[int, list[MxRecord]] = {}
    for rec in records:
        by_pref.setdefault(rec.preference, []).append(rec)
    ordered: list[MxRecord] = []
    seen: set[str] = set()
    for pref in sorted(by_pref):
        group = sorted(by_pref[pref], key=lambda r: r.exchange)  # deterministic before shuffle
        rng.shuffle(group)
        for rec in group:
            if rec.exchange not in seen:
                seen.add(rec.exchange)
                ordered.append(rec)
    return ordered


def _order_addresses(
    addresses: Sequence[str], prefer_ipv6: bool, rng: random.Random
) -> tuple[str, ...]:
    v4 = sorted({a for a in addresses if ":" not in a})
    v6 = sorted({a for a in addresses if ":" in a})
    rng.shuffle(v4)
    rng.shuffle(v6)
    return tuple(v6 + v4) if prefer_ipv6 else tuple(v4 + v6)


def _address_literal(domain: str) -> MxResult:
    inner = domain[1:-1] if domain.endswith("]") else ""
    try:
        if inner[:5].lower() == "ipv6:":
            ip: str = str(ipaddress.IPv6Address(inner[5:]))
        else:
            ip = str(ipaddress.IPv4Address(inner))
    except ValueError:
        return _perm(domain, NO_SUCH_DOMAIN, f"{domain}: unusable address literal")
    return MxResult(domain, hops=(NextHop(domain, (ip,)),))


async def resolve_next_hops(
    domain: str,
    resolver: Resolver,
    *,
    prefer_ipv6: bool = False,
    rng: random.Random | None = None,
    max_hosts: int = DEFAULT_MAX_HOSTS,
) -> MxResult:
    """RFC 5321 §5.1 next hops for ``domain``. Never raises for a DNS problem: every
    failure comes back as ``MxResult.failure`` (see the module docstring's table)."""
    rng = rng or _DEFAULT_RNG
    if domain.startswith("["):
        return _address_literal(domain)
    try:
        qdomain = domain_to_ascii(domain.rstrip("."))
    except AddressError as exc:
        return _perm(domain, NO_SUCH_DOMAIN, f"{domain}: {exc}")

    try:
        answer = await resolver.mx(qdomain)
    except DnsNotFound as exc:
        if exc.nxdomain:
            return _perm(domain, NO_SUCH_DOMAIN, f"{qdomain}: MX lookup: {exc.reason}")
        return await _implicit_mx(domain, qdomain, resolver, prefer_ipv6, rng)
    except DnsTempError as exc:
        return _temp(domain, f"{qdomain}: MX lookup: {exc.reason}")
    except Exception as exc:  # unclassified: temporary (DESIGN principle 6)
        return _temp(domain, f"{qdomain}: MX lookup: unexpected {type(exc).__name__}")

    records = [r for r in answer.records if not r.is_null]
    if not records:
        # RFC 7505 §3: a single "0 ." MX says the domain accepts no mail. Any record set made
        # only of root targets cannot route either, so it is read the same way.
        return _perm(domain, NULL_MX, f"{qdomain}: null MX")
    notes: list[str] = []
    if len(records) != len(answer.records):
        notes.append(f"{qdomain}: ignored MX records with a null target among others")

    ordered = order_mx(records, rng)
    if len(ordered) > max_hosts:
        notes.append(f"{qdomain}: resolved only the first {max_hosts} of {len(ordered)} MX hosts")
        ordered = ordered[:max_hosts]

    results = await asyncio.gather(
        *(resolver.addresses(rec.exchange) for rec in ordered), return_exceptions=True
    )
    hops: list[NextHop] = []
    temporary = False
    for rec, res in zip(ordered, results, strict=True):
        if isinstance(res, Answer):
            addrs = _order_addresses(res.records, prefer_ipv6, rng)
            if addrs:
                alias = _expanded(rec.exchange, res.canonical_name)
                hops.append(NextHop(rec.exchange, addrs, rec.preference, res.authenticated, alias))
                continue
            notes.append(f"{rec.exchange}: no addresses")
        elif isinstance(res, DnsNotFound):
            notes.append(f"{rec.exchange}: {res.reason}")
        elif isinstance(res, Exception):
            temporary = True
            reason = res.reason if isinstance(res, DnsTempError) else type(res).__name__
            notes.append(f"{rec.exchange}: temporary failure: {reason}")
        else:
            raise res  # CancelledError and other BaseExceptions are not ours to swallow
    if hops:
        return MxResult(
            domain, hops=tuple(hops), authenticated=answer.authenticated, notes=tuple(notes)
        )
    if temporary:
        return _temp(domain, f"{qdomain}: no MX host address could be looked up", notes)
    return _perm(domain, NO_ROUTE, f"{qdomain}: no MX host has an address", notes)


async def _implicit_mx(
    domain: str, qdomain: str, resolver: Resolver, prefer_ipv6: bool, rng: random.Random
) -> MxResult:
    """RFC 5321 §5.1: no MX records, so the domain is its own mail exchanger."""
    try:
        answer = await resolver.addresses(qdomain)
    except DnsNotFound as exc:
        if exc.nxdomain:
            return _perm(domain, NO_SUCH_DOMAIN, f"{qdomain}: no MX, address lookup: NXDOMAIN")
        return _perm(domain, NO_ROUTE, f"{qdomain}: no MX and no address records")
    except DnsTempError as exc:
        return _temp(domain, f"{qdomain}: no MX, address lookup: {exc.reason}")
    except Exception as exc:
        return _temp(domain, f"{qdomain}: no MX, address lookup: unexpected {type(exc).__name__}")
    addrs = _order_addresses(answer.records, prefer_ipv6, rng)
    if not addrs:
        return _perm(domain, NO_ROUTE, f"{qdomain}: no MX and no address records")
    hop = NextHop(
        qdomain, addrs, 0, answer.authenticated, _expanded(qdomain, answer.canonical_name)
    )
    return MxResult(domain, hops=(hop,), implicit=True, authenticated=answer.authenticated)


def _expanded(host: str, canonical: str) -> str:
    """``canonical`` when CNAMEs led from ``host`` to it, else ""."""
    canonical = canonical.lower().rstrip(".")
    return canonical if canonical and canonical != host.lower().rstrip(".") else ""
