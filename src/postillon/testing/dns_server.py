"""A small authoritative DNS server for tests, on loopback, over real UDP and TCP.

Design note
-----------
Tests never ask the machine's resolver (DESIGN "Tests"). They start this server on
127.0.0.1 (or ::1) on a random high port, point ``DnsResolver(nameservers=[srv.nameserver])``
at it, and talk to it over real sockets. It runs in one background thread (a selector over
the UDP socket and the TCP listener) plus one short-lived thread per TCP connection, so it
serves synchronous tests, asyncio tests and postillon subprocesses alike.

It is authoritative only: every answer has AA set, RA clear, and nothing is recursed.
Answers are built with ``dns.message`` from ``dns.zone`` data:

* A, AAAA, MX (including the null MX ``0 .``), TXT, TLSA, PTR, SOA, NS, CNAME and any other
  type dnspython can parse;
* CNAME chains are followed inside the served zones and put in the answer section, as an
  authoritative server does; a target outside them ends the chain (NOERROR, CNAME only);
* NXDOMAIN (the name does not exist, not even as an empty non-terminal) and NODATA (NOERROR
  with an empty answer) both carry the zone's SOA in the authority section, with the TTL
  RFC 2308 §3 asks for (the smaller of the SOA's TTL and its MINIMUM);
* a UDP answer larger than the client's limit (512 bytes, or its EDNS payload size) is sent
  empty with TC set, so the client retries over TCP (RFC 7766);
* names outside every zone get REFUSED.

Failures are programmable per name (and optionally per type, and for a number of queries):
``servfail``, ``refused``, ``drop`` (no answer at all: the client times out) and
``truncate`` (TC over UDP whatever the size; TCP answers normally).

Every query is logged (name, type, transport) so a test can assert that a cache served a
lookup: ``srv.query_count("example.org", "MX") == 1``.

Zones are given as zone-file text or as Python data::

    DnsServer({
        "example.org": {
            "@": {"MX": ["10 mx1.example.org", "20 mx2.example.org"], "TXT": '"v=spf1 -all"'},
            "mx1.example.org": {"A": "192.0.2.1", "AAAA": "2001:db8::1"},
            "mx2.example.org": {"A": [(60, "192.0.2.2")]},        # (ttl, rdata)
        },
        "example.net": "$ORIGIN example.net.\\n@ 300 IN MX 0 .\\n",   # zone-file text
    })

In Python data every name is absolute, owner names and names inside rdata alike (the
trailing dot is optional), and an owner ``@`` is the zone apex. Zone-file text follows the usual
zone-file rules (relative names are relative to ``$ORIGIN``). A zone without SOA or NS gets a
synthetic one (negative TTL ``negative_ttl``, default 60 s).

Command line, for manual runs::

    python -m postillon.testing.dns_server --zone example.org.zone --zone example.net=net.zone \\
        --port 5353
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import selectors
import signal
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
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
    "DnsServer",
    "FailureMode",
    "QueryRecord",
    "RdataValue",
    "RecordSet",
    "ZoneData",
    "Zones",
    "main",
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
_TCP_IDLE_TIMEOUT = 10.0  # seconds a test client may keep an idle TCP connection
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


class DnsServer:
    """An authoritative DNS server on loopback for tests (see the module docstring).

    Use it as a context manager, or call :meth:`start` / :meth:`stop`::

        with DnsServer(zones) as srv:
            resolver = DnsResolver([srv.nameserver], timeout=0.5)
            ...
        host, port = DnsServer(zones).start()   # remember to stop() it

    All methods are thread-safe and may be called while the server runs.
    """

    def __init__(
        self,
        zones: Zones | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        default_ttl: int = 300,
        negative_ttl: int = 60,
        authenticated: bool = False,
        on_query: Callable[[QueryRecord], None] | None = None,
    ) -> None:
        self._host = host
        self._requested_port = port
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
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conn_threads: set[threading.Thread] = set()
        self._port = 0
        # Tracebacks of queries the server failed to answer (each got SERVFAIL).
        self.errors: list[str] = []
        if isinstance(zones, str):
            self.add_zone(None, zones)
        elif zones is not None:
            for origin, data in zones.items():
                self.add_zone(origin, data)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> tuple[str, int]:
        """Bind UDP and TCP on the same port, start serving, return ``(host, port)``."""
        if self._thread is not None:
            raise RuntimeError("DnsServer already started")
        self._udp, self._tcp = self._bind()
        self._port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._serve, name=f"dns-server-{self._port}", daemon=True
        )
        self._thread.start()
        return self._host, self._port

    def stop(self) -> None:
        """Stop serving and close every socket. Safe to call twice."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
            conn_threads = list(self._conn_threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for t in conn_threads:
            t.join(timeout=5)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None
        self._thread = None

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the server listens on (port 0 before :meth:`start`)."""
        return self._host, self._port

    @property
    def nameserver(self) -> str:
        """This server as a ``[dns] nameservers`` entry: ``127.0.0.1:PORT`` or ``[::1]:PORT``."""
        if ":" in self._host:
            return f"[{self._host}]:{self._port}"
        return f"{self._host}:{self._port}"

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

    def _respond(self, wire: bytes, transport: Transport) -> bytes | None:
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

    # -- sockets -------------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        tries = 1 if self._requested_port else 50
        last: OSError | None = None
        for _ in range(tries):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.bind((self._host, self._requested_port))
                port = udp.getsockname()[1]
                tcp = socket.socket(family, socket.SOCK_STREAM)
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    tcp.bind((self._host, port))
                    tcp.listen(64)
                except OSError as exc:
                    tcp.close()
                    raise exc
            except OSError as exc:
                udp.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                last = exc
                continue
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        assert last is not None
        raise last

    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None and self._wake_r is not None
        sel = selectors.DefaultSelector()
        sel.register(self._udp, selectors.EVENT_READ, "udp")
        sel.register(self._tcp, selectors.EVENT_READ, "tcp")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "udp":
                        self._serve_udp()
                    elif key.data == "tcp":
                        self._accept_tcp()
        finally:
            sel.close()

    def _serve_udp(self) -> None:
        assert self._udp is not None
        for _ in range(64):  # drain what is queued, then go back to select
            try:
                wire, peer = self._udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            answer = self._respond(wire, "udp")
            if answer is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(answer, peer)

    def _accept_tcp(self) -> None:
        assert self._tcp is not None
        try:
            conn, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        conn.setblocking(True)
        conn.settimeout(_TCP_IDLE_TIMEOUT)
        thread = threading.Thread(target=self._serve_tcp, args=(conn,), daemon=True)
        with self._lock:
            self._conns.add(conn)
            self._conn_threads.add(thread)
        thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        try:
            while not self._stopping.is_set():
                head = _recv_exactly(conn, 2)
                if head is None:
                    return
                (length,) = struct.unpack("!H", head)
                wire = _recv_exactly(conn, length)
                if wire is None:
                    return
                answer = self._respond(wire, "tcp")
                if answer is not None:
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._conn_threads.discard(threading.current_thread())
            conn.close()


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# -- command line --------------------------------------------------------------------------


def _parse_zone_args(values: Iterable[str]) -> list[tuple[str | None, str]]:
    out: list[tuple[str | None, str]] = []
    for value in values:
        origin, sep, path = value.partition("=")
        if not sep:
            origin, path = "", value
        out.append((origin or None, Path(path).read_text(encoding="utf-8")))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m postillon.testing.dns_server",
        description="Serve zone files over UDP and TCP on loopback, for manual tests.",
    )
    parser.add_argument(
        "--zone",
        action="append",
        default=[],
        metavar="[ORIGIN=]FILE",
        help="zone file to serve (its $ORIGIN, or ORIGIN= before the path); repeatable",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0: a random free one)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each query")
    args = parser.parse_args(argv)

    def log(q: QueryRecord) -> None:
        print(f"query {q.transport} {q.name} {q.rdtype}", file=sys.stderr, flush=True)

    server = DnsServer(host=args.host, port=args.port, on_query=log if args.verbose else None)
    try:
        for origin, text in _parse_zone_args(args.zone):
            server.add_zone(origin, text)
    except (OSError, dns.exception.DNSException, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    host, port = server.start()
    print(f"listening on {server.nameserver} (udp+tcp)", flush=True)
    try:
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
    print(f"stopped {host}:{port}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
