"""The DANE lookup for one host: from DNSSEC states to a TLS requirement (RFC 7672 §2).

Design note
-----------
:class:`DaneHook` is the transport's one door to DANE's DNS side. Before connecting to a
host the transport asks :meth:`DaneHook.lookup` and hands the answer to
``tls_policy.decide``, which applies the precedence (table rules, DANE, MTA-STS, the
default); after the handshake ``tls.check_requirement`` matches the server's chain
against the records (``dane.match_chain``). So DANE has no gate of its own: one
requirement, one check, for every mode.

===========================================  =================================================
DNS says (``[dns] trust_ad`` on)             :meth:`DaneHook.lookup` returns
===========================================  =================================================
MX or host address answer not secure         :class:`NoPublishedPolicy`: DANE does not apply
                                             (§2.2); no TLSA lookup
TLSA lookup: secure records, some usable     ``TlsRequirement("dane", tlsa=usable)``: STARTTLS
                                             mandatory, the chain must match one (§2.2, §3)
TLSA lookup: secure records, none usable     ``TlsRequirement("dane", tlsa=())``: STARTTLS
                                             mandatory, unauthenticated (§2.2)
TLSA lookup: not found (validated or not),   :class:`NoPublishedPolicy`: DANE does not apply
or an answer that is not secure              (§2.2.1)
TLSA lookup: bogus (SERVFAIL)                :class:`HostRefused` "dnssec-bogus": do not use
                                             this host (try the next MX, then defer), §2.1.1
TLSA lookup: timeout, other error            :class:`HostRefused` "dane-lookup-failed" (§2.2:
                                             a failed lookup is not "no records")
===========================================  =================================================

TLSA is looked up at ``_<port>._tcp.<MX host>`` (port 25 for MX delivery). When the MX
host name is an alias and its address answer - which carries the whole CNAME chain, so
its AD bit vouches for every link - is secure, the CNAME-expanded name is tried first
and the MX name second (RFC 7672 §2.2.2); the first name with secure TLSA records (or
a bogus or failed lookup) decides, and both names are DANE-TA reference identifiers.
For a next hop the operator named (a smarthost under a ``dane`` rule) the name comes from
the configuration, so only its address answer must be secure (the caller passes
``mx_secure=True``).

Without ``trust_ad`` no answer is ever secure, so DANE never applies; the transport then
has no hook at all (``build.py``). A forged AD bit from a resolver across the network must
not be able to turn DANE on or off (RFC 7672 §2.1.1).
"""

from __future__ import annotations

from postillon.dns.resolver import Answer, DnsBogus, DnsNotFound, Resolver, TlsaRecord
from postillon.outbound.dane import usable_records
from postillon.outbound.tls_policy import HostRefused, NoPublishedPolicy, TlsRequirement

__all__ = ["DaneHook", "tlsa_name"]


def tlsa_name(host: str, port: int = 25) -> str:
    """RFC 6698 §3 / RFC 7672 §2.2.1: where the TLSA records of ``host`` live."""
    return f"_{port}._tcp.{host.rstrip('.')}"


class DaneHook:
    """RFC 7672's DNS side for the SMTP transport; see the module note for the table."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def lookup(
        self,
        host: str,
        port: int = 25,
        *,
        mx_secure: bool,
        address_secure: bool,
        canonical: str = "",
    ) -> TlsRequirement | HostRefused | NoPublishedPolicy:
        """Before connecting to ``host`` on ``port`` (an MX host, or the domain for an
        implicit MX; a smarthost on its own port, e.g. 587: its TLSA are at ``_587._tcp``).

        ``mx_secure``: the MX answer (or, for an implicit MX, the address answer; for a
        configured host, True) was authenticated; ``address_secure``: so was the host's
        address answer (with the CNAME chain that led to it: one reply, one AD bit).
        ``canonical``: the CNAME-expanded name when ``host`` is an alias ("" if not).
        """
        if not mx_secure:
            return NoPublishedPolicy(f"the MX answer for {host} is not DNSSEC-secure")
        if not address_secure:
            return NoPublishedPolicy(f"the address answer for {host} is not DNSSEC-secure")
        original = host.rstrip(".").lower()
        expanded = canonical.rstrip(".").lower()
        # RFC 7672 §2.2.2: a secure CNAME chain: the expanded name first, then the
        # original; either way both names are reference identifiers (§3.2.2).
        bases = [expanded, host] if expanded and expanded != original else [host]
        names = (expanded, original) if len(bases) == 2 else (original,)
        why_not = ""
        for base in bases:
            found = await self._tlsa_at(tlsa_name(base, port), names)
            if not isinstance(found, NoPublishedPolicy):
                return found
            why_not = f"{why_not}; {found.reason}" if why_not else found.reason
        return NoPublishedPolicy(why_not)

    async def _tlsa_at(
        self, name: str, reference_names: tuple[str, ...]
    ) -> TlsRequirement | HostRefused | NoPublishedPolicy:
        """The TLSA records at ``name`` as a requirement (see the module note's table)."""
        try:
            answer: Answer[TlsaRecord] = await self._resolver.tlsa(name)
        except DnsNotFound:
            return NoPublishedPolicy(f"no TLSA records at {name}")  # §2.2.1
        except DnsBogus as exc:
            return HostRefused(f"DANE: TLSA lookup of {name} failed: {exc.reason}", "dnssec-bogus")
        except Exception as exc:  # DnsTempError, anything unclassified: not "no records"
            reason = getattr(exc, "reason", type(exc).__name__)
            return HostRefused(
                f"DANE: TLSA lookup of {name} failed: {reason}", "dane-lookup-failed"
            )
        if not answer.authenticated:
            # An insecure delegation below a signed MX: not DANE.
            return NoPublishedPolicy(f"the TLSA answer at {name} is not DNSSEC-secure")
        return TlsRequirement(
            "dane",
            match=reference_names,  # DANE-TA reference names, §3.2.2
            tlsa=usable_records(answer.records),
            source=f"dane {name}",
        )
