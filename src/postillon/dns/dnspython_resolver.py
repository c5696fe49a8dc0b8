"""The dnspython adapter of the resolver protocol, with a small TTL cache.

Design note
-----------
:class:`DnsResolver` implements ``postillon.dns.resolver.Resolver`` (the contract and the
error rule are written there): dnspython's asyncio stub resolver, sent only to the
configured nameservers (``[dns] nameservers``; the system's resolv.conf only when none are
configured), plus a bounded cache that respects TTLs.

Caching: answers are cached for their TTL (the smallest along a CNAME chain, capped by
``max_ttl``), NXDOMAIN/NODATA for the negative TTL of RFC 2308 §5 (capped by
``max_negative_ttl``); temporary failures are never cached. The cache is an LRU of at most
``cache_size`` entries keyed by (name, type). Identical lookups in flight at the same time
share one query. TTLs run on an injected clock (``postillon.core.clock.Clock``, monotonic by
default) so tests advance time instead of sleeping.

``on_lookup`` receives one ``LookupEvent`` per record-type lookup (cache hits too,
flagged) with its latency, for metrics.

DNSSEC: every query sets AD (RFC 6840 §5.7: "tell me whether you validated"), which is
enough for a validating resolver to report it; DO is not set, because postillon does not
check signatures itself and would only receive RRSIGs it never reads. With ``trust_ad`` the
reply's AD bit becomes ``Answer.authenticated`` / ``DnsNotFound.authenticated``, and a
SERVFAIL becomes :class:`DnsBogus` (unless the resolver's extended error, RFC 8914, says it
was a network problem). Without ``trust_ad`` (the default) nothing is ever authenticated:
an AD bit is only worth the path it travelled (RFC 7672 §2.1.1, RFC 6698 §4.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import dns.asyncresolver
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename

from postillon.core.address import AddressError, domain_to_ascii
from postillon.core.clock import Clock
from postillon.dns.resolver import (
    Answer,
    DnsBogus,
    DnsNotFound,
    DnsTempError,
    LookupEvent,
    LookupResult,
    MxRecord,
    TlsaRecord,
    TxtRecord,
)

__all__ = ["DnsCache", "DnsResolver", "parse_nameserver"]

T = TypeVar("T")

DEFAULT_PORT = 53
# EDNS payload size recommended by DNS flag day 2020: avoids IP fragmentation.
EDNS_PAYLOAD = 1232


# -- configuration helpers -------------------------------------------------------------------


def parse_nameserver(entry: str) -> tuple[str, int]:
    """``"127.0.0.1:5353"``, ``"127.0.0.1"``, ``"[::1]:5353"`` or ``"::1"`` -> (ip, port).

    A nameserver is an IP address (port 53 unless given); an IPv6 address with a port is
    written in brackets.
    """
    text = entry.strip()
    host, port = text, DEFAULT_PORT
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid nameserver {entry!r}")
        host = inner
        if rest:
            port = _port(rest[1:], entry)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, entry)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {entry!r} is not an IP address") from None
    return str(ip), port


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port in nameserver {entry!r}")
    return int(text)


class _MonotonicClock:
    def now(self) -> float:
        return time.monotonic()


# -- cache -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Negative:
    nxdomain: bool
    reason: str
    authenticated: bool = False


# (lower-case name text, rdtype): the same equality as dns.name.Name's (case-insensitive),
# without dnspython's per-call Name hashing (it lower-cases every label each time).
_CacheKey = tuple[str, int]
_CacheValue = Answer[Any] | _Negative


class DnsCache:
    """A bounded LRU of lookup results, each dropped when its TTL runs out."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._max = max_entries
        self._clock = clock
        self._data: OrderedDict[_CacheKey, tuple[float, _CacheValue]] = OrderedDict()

    def get(self, key: _CacheKey) -> _CacheValue | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, value = item
        if self._clock.now() >= expires:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def put(self, key: _CacheKey, value: _CacheValue, ttl: float) -> None:
        if ttl <= 0 or self._max <= 0:
            return
        self._data[key] = (self._clock.now() + ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# -- the dnspython adapter -------------------------------------------------------------------


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


@functools.lru_cache(maxsize=4096)
def _wire_name(text: str) -> tuple[dns.name.Name, str]:
    """A name as asked (stripped, ASCII) and its text for events, memoised: a busy
    server asks the same few names over and over, and dnspython's parsing is pure
    Python. Names are immutable; invalid ones raise and are not memoised."""
    if not text.isascii():
        text = domain_to_ascii(text.rstrip("."))
    name = dns.name.from_text(text)
    return name, _text(name)


@functools.lru_cache(maxsize=64)
def _rdtype_text(rdtype: dns.rdatatype.RdataType) -> str:
    return dns.rdatatype.to_text(rdtype)


def _ad(response: object) -> bool:
    """The AD bit of a reply (RFC 4035 §3.2.3), False for anything that is not one."""
    return isinstance(response, dns.message.Message) and bool(response.flags & dns.flags.AD)


# Extended DNS errors (RFC 8914 §4) that say "no answer reached the resolver", as opposed
# to "the answer did not validate": a SERVFAIL carrying one of these is not bogus data.
_NOT_BOGUS_EDE = frozenset(
    {
        dns.edns.EDECode.NOT_READY,
        dns.edns.EDECode.NOT_AUTHORITATIVE,
        dns.edns.EDECode.NO_REACHABLE_AUTHORITY,
        dns.edns.EDECode.NETWORK_ERROR,
    }
)


def _negative_ttl(response: object) -> int:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) of the authority SOA (dnspython computes it)."""
    if not isinstance(response, dns.message.QueryMessage):
        return 0
    try:
        return int(response.resolve_chaining().minimum_ttl)
    except Exception:
        return 0


def _mx(rd: dns.rdata.Rdata) -> MxRecord:
    return MxRecord(int(rd.preference), _text(rd.exchange))  # type: ignore[attr-defined]


def _address(rd: dns.rdata.Rdata) -> str:
    return str(rd.address)  # type: ignore[attr-defined]


def _txt(rd: dns.rdata.Rdata) -> TxtRecord:
    return TxtRecord(tuple(rd.strings))  # type: ignore[attr-defined]


def _tlsa(rd: dns.rdata.Rdata) -> TlsaRecord:
    r = cast(Any, rd)
    return TlsaRecord(int(r.usage), int(r.selector), int(r.mtype), bytes(r.cert))


def _ptr(rd: dns.rdata.Rdata) -> str:
    return _text(rd.target)  # type: ignore[attr-defined]


class DnsResolver:
    """:class:`Resolver` over dnspython's asyncio stub resolver, with a TTL cache.

    ``nameservers``: entries like ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"``
    (port 53 by default). ``None`` or empty: the system's, read from ``resolv_conf``.
    ``timeout`` bounds one try at one server; ``attempts`` is how many rounds over all the
    servers one lookup may take, so one lookup takes at most about
    ``timeout * attempts * len(nameservers)`` seconds, plus dnspython's short pause between
    rounds. A truncated UDP answer is retried over TCP within the same budget.
    A server that answers SERVFAIL or REFUSED is skipped for the rest of that lookup.
    ``ipv4``/``ipv6`` choose which address families :meth:`addresses` asks for.
    ``trust_ad``: the nameservers validate DNSSEC and the path to them is safe (a resolver
    on this machine), so their AD bit is believed; see the module note.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        timeout: float = 5.0,
        attempts: int = 2,
        cache_size: int = 10_000,
        max_ttl: int = 86_400,
        max_negative_ttl: int = 3_600,  # RFC 2308 §5: one to three hours is common
        ipv4: bool = True,
        ipv6: bool = True,
        trust_ad: bool = False,
        clock: Clock | None = None,
        on_lookup: Callable[[LookupEvent], None] | None = None,
        resolv_conf: str = "/etc/resolv.conf",
    ) -> None:
        if timeout <= 0 or attempts < 1:
            raise ValueError("timeout must be positive and attempts at least 1")
        if not (ipv4 or ipv6):
            raise ValueError("at least one of ipv4 and ipv6 must be enabled")
        if nameservers:
            servers = [parse_nameserver(entry) for entry in nameservers]
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(filename=resolv_conf, configure=True)
            except dns.resolver.NoResolverConfiguration as exc:
                raise ValueError(f"no nameservers configured and none in {resolv_conf}") from exc
            resolver.search = []
        resolver.timeout = timeout
        # dnspython bounds a whole lookup by its lifetime and sleeps between rounds over
        # the servers (0.1 s, doubling, at most 2 s); leave room for that so every round
        # gets its full per-server timeout.
        backoff = sum(min(0.1 * 2**k, 2.0) for k in range(attempts - 1))
        rounds = timeout * attempts * max(1, len(resolver.nameservers))
        resolver.lifetime = rounds + backoff
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        # Ask for AD (RFC 6840 §5.7) so a validating resolver tells us what it validated.
        resolver.flags = dns.flags.RD | dns.flags.AD
        resolver.cache = None  # ours, below, also caches negative answers and is bounded
        self._resolver = resolver
        self._trust_ad = trust_ad
        self._max_ttl = max_ttl
        self._max_negative_ttl = max_negative_ttl
        self._families = tuple(
            t for t, on in ((dns.rdatatype.A, ipv4), (dns.rdatatype.AAAA, ipv6)) if on
        )
        self._cache = DnsCache(cache_size, clock or _MonotonicClock())
        self._on_lookup = on_lookup
        self._inflight: dict[_CacheKey, asyncio.Future[_CacheValue]] = {}

    @property
    def nameservers(self) -> list[str]:
        """The servers asked, as ``ip:port`` / ``[ip]:port`` (for logs and ``dns`` CLI)."""
        out = []
        for ns in self._resolver.nameservers:
            if isinstance(ns, dns.nameserver.AddressAndPortNameserver):
                host, port = ns.address, ns.port
            else:
                host, port = str(ns), DEFAULT_PORT
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return out

    @property
    def trust_ad(self) -> bool:
        return self._trust_ad

    @property
    def cache(self) -> DnsCache:
        return self._cache

    # -- the protocol --

    async def mx(self, domain: str) -> Answer[MxRecord]:
        return await self._lookup(domain, dns.rdatatype.MX, _mx)

    async def txt(self, name: str) -> Answer[TxtRecord]:
        return await self._lookup(name, dns.rdatatype.TXT, _txt)

    def cached_txt(self, name: str) -> Answer[TxtRecord] | None:
        return self._cached(name, dns.rdatatype.TXT)

    async def tlsa(self, name: str) -> Answer[TlsaRecord]:
        return await self._lookup(name, dns.rdatatype.TLSA, _tlsa)

    async def ptr(self, ip: str) -> Answer[str]:
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
        name = dns.reversename.from_address(str(addr)).to_text()
        return await self._lookup(name, dns.rdatatype.PTR, _ptr)

    async def ipv4(self, name: str) -> Answer[str]:
        return await self._lookup(name, dns.rdatatype.A, _address)

    async def addresses(self, host: str) -> Answer[str]:
        """A and AAAA together. Records from either family make an answer (a temporary
        failure of the other family is then ignored, as Postfix does); with none, a
        temporary failure of either family wins over "not found"."""
        results = await asyncio.gather(
            *(self._lookup(host, rdtype, _address) for rdtype in self._families),
            return_exceptions=True,
        )
        answers = [r for r in results if isinstance(r, Answer)]
        if answers:
            first = answers[0]
            return Answer(
                name=first.name,
                records=tuple(rec for a in answers for rec in a.records),
                ttl=min(a.ttl for a in answers),
                canonical_name=first.canonical_name,
                authenticated=all(a.authenticated for a in answers),
            )
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors:
            if not isinstance(err, DnsNotFound):
                if isinstance(err, DnsTempError):
                    raise err
                if not isinstance(err, Exception):
                    raise err  # cancellation and friends pass through
                raise DnsTempError(host, "A/AAAA", f"unexpected error: {err!r}") from err
        nxdomain = all(isinstance(e, DnsNotFound) and e.nxdomain for e in errors)
        secure = all(isinstance(e, DnsNotFound) and e.authenticated for e in errors)
        reason = "NXDOMAIN" if nxdomain else "no A or AAAA records"
        raise DnsNotFound(host, "A/AAAA", reason, nxdomain=nxdomain, authenticated=secure)

    # -- machinery --

    def _qname(self, name: str, rdtype_text: str) -> tuple[dns.name.Name, str]:
        """The name to ask and its text (for lookup events)."""
        text = name.strip()
        try:
            if not text:
                raise ValueError("empty name")
            return _wire_name(text)
        except (ValueError, AddressError, dns.exception.DNSException) as exc:
            # A name that cannot be put on the wire can never exist.
            raise DnsNotFound(name, rdtype_text, f"invalid name: {exc}", nxdomain=True) from None

    def _cached(self, name: str, rdtype: dns.rdatatype.RdataType) -> Answer[Any] | None:
        """The cached answer (DnsNotFound for a cached negative one), None if not cached."""
        rdtype_text = _rdtype_text(rdtype)
        _qname, qtext = self._qname(name, rdtype_text)
        started = time.perf_counter()
        value = self._cache.get((qtext, int(rdtype)))
        if value is None:
            return None
        if isinstance(value, _Negative):
            result: LookupResult = "nxdomain" if value.nxdomain else "nodata"
            self._emit(qtext, rdtype_text, result, started, True)
            raise DnsNotFound(
                name,
                rdtype_text,
                value.reason,
                nxdomain=value.nxdomain,
                authenticated=value.authenticated,
            )
        self._emit(qtext, rdtype_text, "answer", started, True)
        return value

    async def _lookup(
        self,
        name: str,
        rdtype: dns.rdatatype.RdataType,
        convert: Callable[[dns.rdata.Rdata], T],
    ) -> Answer[T]:
        hit = self._cached(name, rdtype)  # DnsNotFound for a cached negative answer
        if hit is not None:
            return cast(Answer[T], hit)
        rdtype_text = _rdtype_text(rdtype)
        qname, qtext = self._qname(name, rdtype_text)
        key: _CacheKey = (qtext, int(rdtype))
        started = time.perf_counter()
        future = self._inflight.get(key)
        cached = future is not None  # joined a lookup already on its way
        if future is None:
            future = asyncio.ensure_future(self._query(qname, rdtype, convert))
            self._inflight[key] = future
            future.add_done_callback(lambda f: self._forget(key, f))
        try:
            value = await asyncio.shield(future)
        except DnsTempError as exc:
            self._emit(qtext, rdtype_text, "tempfail", started, cached)
            raise type(exc)(name, rdtype_text, exc.reason) from None
        if isinstance(value, _Negative):
            result: LookupResult = "nxdomain" if value.nxdomain else "nodata"
            self._emit(qtext, rdtype_text, result, started, cached)
            raise DnsNotFound(
                name,
                rdtype_text,
                value.reason,
                nxdomain=value.nxdomain,
                authenticated=value.authenticated,
            )
        self._emit(qtext, rdtype_text, "answer", started, cached)
        return cast(Answer[T], value)

    def _forget(self, key: _CacheKey, future: asyncio.Future[_CacheValue]) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.cancelled():
            future.exception()  # retrieved: no "exception never retrieved" noise

    async def _query(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        convert: Callable[[dns.rdata.Rdata], T],
    ) -> _CacheValue:
        """One network lookup; caches and returns an Answer or a _Negative, or raises
        DnsTempError."""
        rdtype_text = dns.rdatatype.to_text(rdtype)
        name = _text(qname)
        key: _CacheKey = (name, int(rdtype))
        try:
            answer = await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = list(exc.kwargs.get("responses", {}).values())
            first = responses[0] if responses else None
            negative = _Negative(True, "NXDOMAIN", self._trust_ad and _ad(first))
            ttl = _negative_ttl(first)
            self._cache.put(key, negative, min(ttl, self._max_negative_ttl))
            return negative
        except dns.resolver.NoAnswer as exc:
            response = exc.kwargs.get("response")
            secure = self._trust_ad and _ad(response)
            negative = _Negative(False, f"no {rdtype_text} records", secure)
            ttl = _negative_ttl(response)
            self._cache.put(key, negative, min(ttl, self._max_negative_ttl))
            return negative
        except dns.resolver.NoNameservers as exc:
            if self._trust_ad and _bogus(exc):
                raise DnsBogus(name, rdtype_text, "DNSSEC: " + _servers_said(exc)) from None
            raise DnsTempError(name, rdtype_text, _servers_said(exc)) from None
        except dns.exception.Timeout:
            raise DnsTempError(name, rdtype_text, "timeout") from None
        except Exception as exc:  # DNSException, OSError, EOFError, anything else
            raise DnsTempError(name, rdtype_text, f"{type(exc).__name__}: {exc}") from None
        rrset = answer.rrset
        if rrset is None:  # pragma: no cover - resolve() raises NoAnswer instead
            return _Negative(False, f"no {rdtype_text} records")
        try:
            records = tuple(convert(rd) for rd in rrset)
        except Exception as exc:
            raise DnsTempError(name, rdtype_text, f"unusable answer: {exc!r}") from None
        result: Answer[T] = Answer(
            name=name,
            records=records,
            ttl=int(answer.chaining_result.minimum_ttl),
            canonical_name=_text(answer.canonical_name),
            authenticated=self._trust_ad and _ad(answer.response),
        )
        self._cache.put(key, result, min(result.ttl, self._max_ttl))
        return result

    def _emit(
        self,
        qtext: str,
        rdtype_text: str,
        result: LookupResult,
        started: float,
        cached: bool,
    ) -> None:
        if self._on_lookup is None:
            return
        event = LookupEvent(qtext, rdtype_text, result, time.perf_counter() - started, cached)
        with contextlib.suppress(Exception):  # metrics must never break a lookup
            self._on_lookup(event)


def _servers_said(exc: dns.resolver.NoNameservers) -> str:
    """A short reason from dnspython's per-server error list, e.g. "SERVFAIL", with the
    extended DNS error (RFC 8914) when the server gave one."""
    errors = exc.kwargs.get("errors") or []
    said = []
    for err in errors:
        what = err[3]
        text = what if isinstance(what, str) else type(what).__name__
        for ede in _extended_errors(err):
            code = dns.edns.EDECode.to_text(ede.code)
            text += f" ({code}: {ede.text})" if ede.text else f" ({code})"
        said.append(text)
    return "no nameserver answered: " + (", ".join(dict.fromkeys(said)) or "unknown")


def _extended_errors(err: Sequence[object]) -> list[dns.edns.EDEOption]:
    response = err[4] if len(err) > 4 else None
    if not isinstance(response, dns.message.Message):
        return []
    try:
        return response.extended_errors()
    except Exception:
        return []


def _bogus(exc: dns.resolver.NoNameservers) -> bool:
    """Did a (trusted, validating) server answer SERVFAIL, and not say it was only a
    network problem? That is how RFC 4035 §5.5 resolvers report bogus data."""
    for err in exc.kwargs.get("errors") or []:
        if err[3] != "SERVFAIL":
            continue
        codes = {ede.code for ede in _extended_errors(err)}
        if not codes or not codes <= _NOT_BOGUS_EDE:
            return True
    return False
