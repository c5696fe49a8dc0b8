"""The DANE decision for one MX host, and the check of its TLS session (RFC 7672 §2).

Design note
-----------
:class:`DaneHook` is the transport's one door to DANE. Before connecting it asks
:meth:`DaneHook.requirement`, after the handshake :meth:`DaneHook.check`:

===========================================  =================================================
DNS says (``[dns] trust_ad`` on)             decision
===========================================  =================================================
MX or host address answer not secure         ``None``: DANE does not apply; the other
                                             policies do (opportunistic today), §2.2
TLSA lookup: secure records, some usable     :class:`DaneRequirement`: STARTTLS mandatory, the
                                             chain must match a usable record (``dane.py``)
TLSA lookup: secure records, none usable     :class:`DaneRequirement` with no records: STARTTLS
                                             mandatory, unauthenticated (§2.2, "no usable TLSA")
TLSA lookup: not found (validated or not),   ``None``: DANE does not apply (§2.2.1)
or an answer that is not secure
TLSA lookup: bogus (SERVFAIL), other error   :class:`DaneUnreachable`: do not use this host
                                             (try the next MX, then defer), §2.1.1, §2.2
===========================================  =================================================

The MX host name and the TLSA base domain are the same name here: TLSA is looked up at
``_25._tcp.<MX host>`` as the MX record names it (RFC 7672 §2.2.2 also allows the
CNAME-expanded name first; not done yet, so a CNAME'd MX host is matched by its MX name).

Without ``trust_ad`` no answer is ever secure, so DANE never applies: a forged AD bit from
a resolver across the network must not be able to turn it on or off (RFC 7672 §2.1.1).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from postillon.dns.resolver import Answer, DnsNotFound, Resolver, TlsaRecord
from postillon.outbound.dane import match_chain, usable_records

__all__ = [
    "DaneCheck",
    "DaneHook",
    "DaneRequirement",
    "DaneUnreachable",
    "tlsa_name",
]


def tlsa_name(host: str, port: int = 25) -> str:
    """RFC 6698 §3 / RFC 7672 §2.2.1: where the TLSA records of ``host`` live."""
    return f"_{port}._tcp.{host.rstrip('.')}"


@dataclass(frozen=True, slots=True)
class DaneRequirement:
    """DANE applies to ``host``: TLS is mandatory, and with ``records`` (the usable
    ones) the server's chain must match one. Hashable: connections are pooled by it."""

    host: str
    records: tuple[TlsaRecord, ...]
    names: tuple[str, ...]  # reference identifiers for DANE-TA (RFC 7672 §3.2.2)

    @property
    def authenticated(self) -> bool:
        """A matching chain proves the server's identity (not so with no usable records)."""
        return bool(self.records)


@dataclass(frozen=True, slots=True)
class DaneUnreachable:
    """The TLSA lookup failed: this host must not be used (RFC 7672 §2.2)."""

    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class DaneCheck:
    """What a finished handshake proved against a :class:`DaneRequirement`.

    The same fields as ``outbound.tls.TlsCheck`` on the tlsverify branch, so the two
    merge into one: ``ok`` (the session may go on), ``verified`` (the server proved its
    identity), ``result`` (a label for logs and metrics: "dane", "dane-no-usable-tlsa",
    "dane-mismatch"), ``reason`` (why not, for the log and the deferral).
    """

    ok: bool
    verified: bool
    result: str
    reason: str = ""


class DaneHook:
    """RFC 7672 for the SMTP transport; see the module note for the decision table."""

    def __init__(self, resolver: Resolver, *, port: int = 25) -> None:
        self._resolver = resolver
        self._port = port

    async def requirement(
        self, host: str, *, mx_secure: bool, address_secure: bool
    ) -> DaneRequirement | DaneUnreachable | None:
        """Before connecting to ``host`` (an MX host, or the domain for an implicit MX).

        ``mx_secure``: the MX answer (or, for an implicit MX, the address answer) was
        authenticated; ``address_secure``: so was the host's address answer.
        """
        if not (mx_secure and address_secure):
            return None  # §2.2: insecure MX or address records: DANE does not apply
        name = tlsa_name(host, self._port)
        try:
            answer: Answer[TlsaRecord] = await self._resolver.tlsa(name)
        except DnsNotFound:
            return None  # §2.2.1: no TLSA records (secure or not): no DANE for this host
        except Exception as exc:  # DnsBogus, DnsTempError, anything unclassified
            reason = getattr(exc, "reason", type(exc).__name__)
            return DaneUnreachable(host, f"DANE: TLSA lookup of {name} failed: {reason}")
        if not answer.authenticated:
            return None  # an insecure delegation below a signed MX: not DANE
        return DaneRequirement(host, usable_records(answer.records), (host,))

    @staticmethod
    def check(
        requirement: DaneRequirement,
        chain: Sequence[bytes],
        now: datetime.datetime | None = None,
    ) -> DaneCheck:
        """After the handshake: may the session go on? (Pure but for the default clock.)"""
        if not requirement.records:
            # §2.2: "DANE with no usable TLSA": encrypted, not authenticated.
            return DaneCheck(True, False, "dane-no-usable-tlsa")
        verdict = match_chain(
            requirement.records,
            chain,
            requirement.names,
            now or datetime.datetime.now(datetime.UTC),
            host=requirement.host,
        )
        if verdict.authenticated:
            return DaneCheck(True, True, "dane", verdict.reason)
        return DaneCheck(False, False, "dane-mismatch", verdict.reason)
