"""The data and the answers of the test DNS server (:mod:`postillon.testing.dns_server`).

:class:`ZoneAuthority` holds the served zones, the programmed failures and the query log,
and turns the wire bytes of one query into those of its answer (:meth:`ZoneAuthority.respond`).
It has no sockets and no threads: :class:`~postillon.testing.dns_server.DnsServer` serves it
over UDP and TCP. What is answered, and how, is in that module's note.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.SOA
import dns.rrset
import dns.zone

__all__ = [
    "FailureMode",
    "QueryRecord",
    "RdataValue",
    "RecordSet",
    "Transport",
    "ZoneAuthority",
    "ZoneData",
    "Zones",
]

FailureMode = Literal["servfail", "refused", "drop", "truncate"]
Transport = Literal["udp", "tcp"]

# One rdata in zone-file syntax, optionally with its own TTL.
RdataValue: TypeAlias = str | tuple[int, str]
# rdtype ("MX") -> one value or a list of them.
RecordSet: TypeAlias = Mapping[str, RdataValue | Sequence[RdataValue]]
# Zone-file text, or owner name -> records.
ZoneData: TypeAlias = str | Mapping[str, RecordSet]
# Zone origin -> zone data.
Zones: TypeAlias = Mapping[str, ZoneData]

_IN = dns.rdataclass.IN
_MAX_CHAIN = 8  # CNAME hops followed before giving up (dnspython's own limit is 16)
_MAX_TCP_MESSAGE = 65535
_FAILURE_MODES = ("servfail", "refused", "drop", "truncate")


@dataclass(frozen=True, slots=True)
class QueryRecord:
    """One query the server received: the name lower-cased without the final dot."""

    name: str
    rdtype: str
    transport: Transport


@dataclass(slots=True)
class _Failure:
    mode: FailureMode
    rdtype: dns.rdatatype.RdataType | None
    remaining: int | None  # None: until cleared


def _absolute(name: str, origin: dns.name.Name | None = None) -> dns.name.Name:
    """A name from Python data: absolute whether or not it ends with a dot; '@' is origin."""
    if name == "@":
        if origin is None:
            raise ValueError("'@' needs a zone origin")
        return origin
    return dns.name.from_text(name.rstrip(".") + "." if name != "." else ".")


def _values(value: RdataValue | Sequence[RdataValue]) -> list[RdataValue]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        return [(value[0], str(value[1]))]
    return list(value)


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


class ZoneAuthority:
    """The zones, failures and query log of a test DNS server; every method is thread-safe
    and may be called while the server runs."""

    def __init__(
        self,
        zones: Zones | str | None = None,
        *,
        default_ttl: int = 300,
        negative_ttl: int = 60,
        authenticated: bool = False,
        on_query: Callable[[QueryRecord], None] | None = None,
    ) -> None:
        self._default_ttl = default_ttl
        self._negative_ttl = negative_ttl
        # Set AD on every answer, as a validating resolver would for a signed zone. Lets
        # DANE logic be tested without DNSSEC (the real thing: see shared/notes).
        self.authenticated = authenticated
        self._on_query = on_query
        self._lock = threading.RLock()
        self._zones: dict[dns.name.Name, dns.zone.Zone] = {}
        self._failures: dict[dns.name.Name | None, list[_Failure]] = {}
        self._queries: list[QueryRecord] = []
        # Tracebacks of queries the server failed to answer (each got SERVFAIL).
        self.errors: list[str] = []
        if isinstance(zones, str):
            self.add_zone(None, zones)
        elif zones is not None:
            for origin, data in zones.items():
                self.add_zone(origin, data)

    # -- data ----------------------------------------------------------------------------

    def add_zone(self, origin: str | None, data: ZoneData) -> None:
        """Serve one more zone (replacing a zone with the same origin).

        ``origin`` may be ``None`` only for zone-file text that has a ``$ORIGIN`` line.
        """
        zone = self._build_zone(origin, data)
        assert zone.origin is not None
        with self._lock:
            self._zones[zone.origin] = zone

    def remove_zone(self, origin: str) -> None:
        with self._lock:
            del self._zones[_absolute(origin)]

    def set_records(
        self,
        name: str,
        rdtype: str,
        values: RdataValue | Sequence[RdataValue],
        *,
        ttl: int | None = None,
    ) -> None:
        """Replace the ``rdtype`` records at ``name`` (absolute; trailing dot optional).

        ``values`` are rdata in zone-file syntax with absolute names (``"10 mx.example.org"``),
        each optionally ``(ttl, rdata)``. An empty list deletes the records. The name must
        fall inside a served zone.
        """
        owner = _absolute(name)
        with self._lock:
            zone = self._zone_for(owner)
            if zone is None:
                raise ValueError(f"{name!r} is in no zone this server serves")
            self._put(zone, owner, rdtype, _values(values), ttl)

    def delete_records(self, name: str, rdtype: str | None = None) -> None:
        """Delete one type at ``name``, or the whole name when ``rdtype`` is None."""
        owner = _absolute(name)
        with self._lock:
            zone = self._zone_for(owner)
            if zone is None:
                return
            if rdtype is None:
                zone.delete_node(owner)
            else:
                zone.delete_rdataset(owner, dns.rdatatype.from_text(rdtype))

    def set_failure(
        self,
        name: str | None,
        mode: FailureMode | None,
        *,
        rdtype: str | None = None,
        times: int | None = None,
    ) -> None:
        """Make queries for ``name`` (every name when None) fail.

        ``mode``: ``servfail``, ``refused``, ``drop`` (never answer) or ``truncate`` (TC over
        UDP; TCP answers normally); ``None`` clears the failures for that name. ``rdtype``
        limits it to one query type; ``times`` to the next N matching queries.
        """
        key = None if name is None else _absolute(name)
        with self._lock:
            if mode is None:
                self._failures.pop(key, None)
                return
            if mode not in _FAILURE_MODES:
                raise ValueError(f"unknown failure mode {mode!r}")
            rt = None if rdtype is None else dns.rdatatype.from_text(rdtype)
            self._failures.setdefault(key, []).insert(0, _Failure(mode, rt, times))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    # -- query log -----------------------------------------------------------------------

    @property
    def queries(self) -> list[QueryRecord]:
        """Every query received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._queries)

    def query_count(
        self,
        name: str | None = None,
        rdtype: str | None = None,
        transport: Transport | None = None,
    ) -> int:
        """How many queries matched (each filter is optional; names case-insensitive)."""
        want_name = None if name is None else name.rstrip(".").lower() or "."
        want_type = None if rdtype is None else rdtype.upper()
        with self._lock:
            return sum(
                1
                for q in self._queries
                if (want_name is None or q.name == want_name)
                and (want_type is None or q.rdtype == want_type)
                and (transport is None or q.transport == transport)
            )

    def reset_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    # -- zone building -------------------------------------------------------------------

    def _build_zone(self, origin: str | None, data: ZoneData) -> dns.zone.Zone:
        if isinstance(data, str):
            zone = dns.zone.from_text(
                data,
                origin=None if origin is None else _absolute(origin),
                relativize=False,
                check_origin=False,
            )
        else:
            if origin is None:
                raise ValueError("a zone given as Python data needs its origin")
            apex = _absolute(origin)
            zone = dns.zone.Zone(apex, relativize=False)
            for owner_text, records in data.items():
                owner = _absolute(owner_text, apex)
                if not owner.is_subdomain(apex):
                    raise ValueError(f"{owner_text!r} is not inside zone {origin!r}")
                for rdtype, value in records.items():
                    self._put(zone, owner, rdtype, _values(value), None)
        assert zone.origin is not None
        apex = zone.origin
        if zone.get_rdataset(apex, dns.rdatatype.SOA) is None:
            soa = f"ns.{apex} hostmaster.{apex} 1 3600 600 86400 {self._negative_ttl}"
            self._put(zone, apex, "SOA", [(self._negative_ttl, soa)], None)
        if zone.get_rdataset(apex, dns.rdatatype.NS) is None:
            self._put(zone, apex, "NS", [f"ns.{apex}"], None)
        return zone

    def _put(
        self,
        zone: dns.zone.Zone,
        owner: dns.name.Name,
        rdtype_text: str,
        values: list[RdataValue],
        ttl: int | None,
    ) -> None:
        rdtype = dns.rdatatype.from_text(rdtype_text)
        if not values:
            zone.delete_rdataset(owner, rdtype)
            return
        rdataset = dns.rdataset.Rdataset(_IN, rdtype)
        for value in values:
            rttl, text = value if isinstance(value, tuple) else (None, value)
            rdata = dns.rdata.from_text(_IN, rdtype, text, origin=dns.name.root, relativize=False)
            rdataset.add(rdata, rttl if rttl is not None else ttl or self._default_ttl)
        if rdtype == dns.rdatatype.CNAME and len(rdataset) != 1:
            raise ValueError("a CNAME owner has exactly one CNAME record")
        zone.replace_rdataset(owner, rdataset)

    def _zone_for(self, name: dns.name.Name) -> dns.zone.Zone | None:
        best: dns.zone.Zone | None = None
        for origin, zone in self._zones.items():
            if name.is_subdomain(origin) and (
                best is None or len(origin) > len(best.origin)  # type: ignore[arg-type]
            ):
                best = zone
        return best

    # -- answering -----------------------------------------------------------------------

    def _take_failure(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
    ) -> FailureMode | None:
        for key in (qname, None):
            entries = self._failures.get(key)
            if not entries:
                continue
            for entry in entries:
                if entry.rdtype is not None and entry.rdtype != rdtype:
                    continue
                if entry.remaining is not None:
                    entry.remaining -= 1
                    if entry.remaining <= 0:
                        entries.remove(entry)
                return entry.mode
        return None

    def respond(self, wire: bytes, transport: Transport) -> bytes | None:
        """The wire answer to one query, or None to stay silent. A bug in here answers
        SERVFAIL (and is kept in ``errors``) rather than killing the server thread."""
        try:
            return self._answer(wire, transport)
        except Exception:
            self.errors.append(traceback.format_exc())
            print(self.errors[-1], file=sys.stderr)
            try:
                query = dns.message.from_wire(wire)
                response = dns.message.make_response(query)
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()
            except Exception:
                return None

    def _answer(self, wire: bytes, transport: Transport) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not worth a FORMERR in a test server
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return None
        question = query.question[0]
        qname = question.name
        rdtype = question.rdtype
        record = QueryRecord(_text(qname), dns.rdatatype.to_text(rdtype), transport)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        with self._lock:
            self._queries.append(record)
            failure = self._take_failure(qname, rdtype)
            if failure == "drop":
                pass
            elif failure == "servfail":
                response.set_rcode(dns.rcode.SERVFAIL)
            elif failure == "refused":
                response.set_rcode(dns.rcode.REFUSED)
            elif failure == "truncate" and transport == "udp":
                response.flags |= dns.flags.TC
            elif query.opcode() != dns.opcode.QUERY:
                response.set_rcode(dns.rcode.NOTIMP)
            elif question.rdclass != _IN:
                response.set_rcode(dns.rcode.REFUSED)
            else:
                self._fill(response, qname, rdtype)
        if self._on_query is not None:
            self._on_query(record)
        if failure == "drop":
            return None
        if self.authenticated and response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            response.flags |= dns.flags.AD
        if transport == "tcp":
            return response.to_wire(max_size=_MAX_TCP_MESSAGE)
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    def _fill(
        self,
        response: dns.message.Message,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
    ) -> None:
        zone = self._zone_for(qname)
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            response.flags &= ~dns.flags.AA
            return
        name = qname
        for _ in range(_MAX_CHAIN):
            node = zone.get_node(name)
            if node is not None and rdtype not in (dns.rdatatype.CNAME, dns.rdatatype.ANY):
                cname = node.get_rdataset(_IN, dns.rdatatype.CNAME)
                if cname is not None:
                    response.answer.append(dns.rrset.from_rdata_list(name, cname.ttl, list(cname)))
                    target = next(iter(cname))
                    assert isinstance(target, dns.rdtypes.ANY.CNAME.CNAME)
                    name = target.target
                    next_zone = self._zone_for(name)
                    if next_zone is None:
                        return  # chain leaves our zones: the resolver carries on
                    zone = next_zone
                    continue
            if node is not None:
                if rdtype == dns.rdatatype.ANY:
                    found = list(node.rdatasets)
                else:
                    rds = node.get_rdataset(_IN, rdtype)
                    found = [] if rds is None else [rds]
                if found:
                    for rds in found:
                        response.answer.append(dns.rrset.from_rdata_list(name, rds.ttl, list(rds)))
                    return
            exists = node is not None or any(
                other != name and other.is_subdomain(name) for other in zone.nodes
            )
            if not exists:
                response.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(response, zone)
            return
        response.set_rcode(dns.rcode.SERVFAIL)  # CNAME loop

    @staticmethod
    def _add_soa(response: dns.message.Message, zone: dns.zone.Zone) -> None:
        apex = zone.origin
        assert apex is not None
        soa = zone.get_rdataset(apex, dns.rdatatype.SOA)
        if soa is None:
            return
        rdata = next(iter(soa))
        assert isinstance(rdata, dns.rdtypes.ANY.SOA.SOA)
        ttl = min(soa.ttl, rdata.minimum)  # RFC 2308 §3
        response.authority.append(dns.rrset.from_rdata_list(apex, ttl, list(soa)))
