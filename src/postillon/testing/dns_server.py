"""A small authoritative DNS server for tests, on loopback, over real UDP and TCP.

Design note
-----------
Tests never ask the machine's resolver (DESIGN "Tests"). They start this server on
127.0.0.1 (or ::1) on a random high port, point ``DnsResolver(nameservers=[srv.nameserver])``
at it, and talk to it over real sockets. It runs in one background thread (a selector over
the UDP socket and the TCP listener) plus one short-lived thread per TCP connection, so it
serves synchronous tests, asyncio tests and postillon subprocesses alike.

It is authoritative only: every answer has AA set, RA clear, and nothing is recursed.
Answers are built with ``dns.message`` from ``dns.zone`` data by
:class:`~postillon.testing.dns_zones.ZoneAuthority` (zones, failures, the query log, no
sockets), which :class:`DnsServer` serves over UDP and TCP:

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
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType

import dns.exception

from postillon.testing.dns_zones import (
    FailureMode,
    QueryRecord,
    RdataValue,
    RecordSet,
    ZoneAuthority,
    ZoneData,
    Zones,
)

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

_TCP_IDLE_TIMEOUT = 10.0  # seconds a test client may keep an idle TCP connection


class DnsServer(ZoneAuthority):
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
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conn_threads: set[threading.Thread] = set()
        self._port = 0
        super().__init__(
            zones,
            default_ttl=default_ttl,
            negative_ttl=negative_ttl,
            authenticated=authenticated,
            on_query=on_query,
        )

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
            answer = self.respond(wire, "udp")
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
                answer = self.respond(wire, "tcp")
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
