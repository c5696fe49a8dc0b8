"""The resolver protocol: what postillon asks of DNS, its answers and its two errors.

Everything in postillon that needs DNS (MX routing, SPF/DKIM/DMARC, DNSBL, DANE, the
``Received:`` PTR) asks through the :class:`Resolver` protocol, so tests and other rooms can
inject a fake. ``dnspython_resolver.DnsResolver`` is the real one.

The contract, as one transaction::

    try:
        answer = await resolver.mx("example.org")     # Answer[MxRecord], >= 1 record
    except DnsNotFound as exc:                         # permanent: the data does not exist
        exc.nxdomain                                   #   True: the name does not exist
                                                       #   False: it exists, no such records
    except DnsTempError:                               # temporary: SERVFAIL, REFUSED,
        ...                                            #   timeout, network error, bad reply
                                                       #   (DnsBogus: SERVFAIL from a trusted
                                                       #   validating resolver)

Lookups return a value or raise one of exactly those two exceptions (both subclass
:class:`DnsError`); ``DnsResolver`` turns every other failure into
:class:`DnsTempError`. A caller must map ``DnsTempError`` (and, for other implementations,
any unexpected exception) to a *temporary* delivery failure, never to a bounce: an
unclassified error is retried, not bounced (DESIGN principle 6).

Why exceptions rather than result values: every call site has the same three-way split,
the success path stays a plain ``answer.records``, and the rule "anything unexpected is
temporary" is then an ordinary ``except Exception`` at the module boundary (``mx.py``),
where outcomes become values.

:class:`LookupEvent` is what a resolver reports per record-type lookup, for metrics.

DNSSEC (for DANE, RFC 7672 §2.1): postillon does not validate signatures itself. It asks
the configured nameservers to, and reads the AD bit of their replies - but only when the
operator says they validate and the path to them cannot be tampered with (``[dns] trust_ad
= true``: a validating resolver on this machine, RFC 6698 §4.1 / RFC 7672 §2.1.1). Without
it every answer is reported unauthenticated, whatever the AD bit said: an AD bit from a
resolver across the network proves nothing. Each answer then has one of four states
(:func:`dnssec_state`): ``secure`` (AD set: validated), ``insecure`` (no AD: unsigned, or
AD not trusted), ``bogus`` (:class:`DnsBogus`: the validating resolver answered SERVFAIL,
which is how it reports data whose signatures do not validate) and ``not found``
(:class:`DnsNotFound`, itself secure or insecure: ``authenticated`` says whether the denial
of existence was validated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

__all__ = [
    "Answer",
    "DnsBogus",
    "DnsError",
    "DnsNotFound",
    "DnsTempError",
    "DnssecState",
    "LookupEvent",
    "LookupResult",
    "MxRecord",
    "Resolver",
    "TlsaRecord",
    "TxtRecord",
    "dnssec_state",
]

T = TypeVar("T")


# -- errors ----------------------------------------------------------------------------------


class DnsError(Exception):
    """Base of the two lookup failures. ``name`` and ``rdtype`` say what was asked."""

    def __init__(self, name: str, rdtype: str, reason: str) -> None:
        super().__init__(f"{name} {rdtype}: {reason}")
        self.name = name
        self.rdtype = rdtype
        self.reason = reason


class DnsNotFound(DnsError):
    """Permanent: NXDOMAIN (``nxdomain=True``) or no records of that type (NODATA).

    ``authenticated``: the denial of existence came with a trusted AD bit (RFC 7672 §2.1:
    e.g. a validated "no TLSA records here")."""

    def __init__(
        self, name: str, rdtype: str, reason: str, *, nxdomain: bool, authenticated: bool = False
    ) -> None:
        super().__init__(name, rdtype, reason)
        self.nxdomain = nxdomain
        self.authenticated = authenticated


class DnsTempError(DnsError):
    """Temporary: SERVFAIL, REFUSED, timeout, network error, malformed reply. Retry later."""


class DnsBogus(DnsTempError):
    """A SERVFAIL from a resolver trusted to validate (``[dns] trust_ad``): the data's
    DNSSEC signatures did not validate (RFC 4035 §5.5), or the resolver could not get it.
    A validating resolver reports both the same way unless it adds an extended error (RFC
    8914), which ``reason`` then names; either is a lookup failure for DANE (RFC 7672 §2.1.1:
    never treated as "insecure"). A subclass of DnsTempError, so callers that do not care
    about DNSSEC retry later as for any temporary failure."""


# -- typed results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """A successful lookup: at least one record.

    ``name`` is the name asked for and ``canonical_name`` the one that held the records
    after CNAMEs (both lower-case A-labels without the final dot). ``ttl`` is the smallest
    TTL along the chain, as received. ``authenticated`` is the AD bit of the reply: true only
    when a validating resolver vouches for it (DANE, RFC 7672 §2.1; meaningful only with a
    trusted, local validating resolver).
    """

    name: str
    records: tuple[T, ...]
    ttl: int
    canonical_name: str
    authenticated: bool = False


@dataclass(frozen=True, slots=True)
class MxRecord:
    preference: int
    exchange: str  # lower-case, no final dot; "." is the root (null MX, RFC 7505)

    @property
    def is_null(self) -> bool:
        return self.exchange == "."


@dataclass(frozen=True, slots=True)
class TxtRecord:
    """One TXT record: its character-strings as received."""

    strings: tuple[bytes, ...]

    @property
    def joined(self) -> bytes:
        """The strings concatenated with nothing between (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
        return b"".join(self.strings)

    @property
    def text(self) -> str:
        return self.joined.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class TlsaRecord:
    """RFC 6698 §2.1: certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes


class Resolver(Protocol):
    """What postillon asks of DNS. See the module docstring for the error contract."""

    async def mx(self, domain: str) -> Answer[MxRecord]:
        """MX records of ``domain`` (CNAMEs followed), in the order received."""
        ...

    async def addresses(self, host: str) -> Answer[str]:
        """IPv4 and IPv6 addresses of ``host`` (A then AAAA), as text."""
        ...

    async def ipv4(self, name: str) -> Answer[str]:
        """The A records of ``name`` alone (a DNS list answers in A records, RFC 5782
        §2.1: asking AAAA too would double the queries a list sees)."""
        ...

    async def txt(self, name: str) -> Answer[TxtRecord]: ...

    def cached_txt(self, name: str) -> Answer[TxtRecord] | None:
        """TXT records of ``name`` if the answer is at hand without a lookup (a cache),
        else None; "does not exist" at hand raises DnsNotFound, as :meth:`txt` would.
        Not a coroutine: a check that usually finds its records cached skips the cost
        of scheduling lookups."""
        ...

    async def tlsa(self, name: str) -> Answer[TlsaRecord]:
        """TLSA records at ``name`` (e.g. ``_25._tcp.mx.example.org``), as published:
        records with unknown usages or malformed data are returned too (RFC 7672 §2.2:
        the caller decides what is usable)."""
        ...

    async def ptr(self, ip: str) -> Answer[str]:
        """Host names for ``ip`` (reverse lookup). Raises ValueError for a malformed IP."""
        ...


DnssecState = Literal["secure", "insecure", "bogus", "not found"]


def dnssec_state(result: Answer[Any] | BaseException) -> DnssecState:
    """The DNSSEC state of a lookup's result (an answer or the error it raised).

    "not found" covers both a validated and an unvalidated denial (``DnsNotFound.authenticated``
    tells them apart); every error other than DnsNotFound and DnsBogus is "bogus" too, in the
    sense that matters for DANE: nothing is known, so nothing may be assumed (RFC 7672 §2.1.1).
    """
    if isinstance(result, Answer):
        return "secure" if result.authenticated else "insecure"
    if isinstance(result, DnsNotFound):
        return "not found"
    return "bogus"


# -- observability hook ----------------------------------------------------------------------

LookupResult = Literal["answer", "nxdomain", "nodata", "tempfail"]


@dataclass(frozen=True, slots=True)
class LookupEvent:
    name: str
    rdtype: str
    result: LookupResult
    seconds: float
    cached: bool  # served from the cache or from an identical query already in flight
