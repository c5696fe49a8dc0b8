"""Real DNSSEC for tests: signed zones served by NSD, validated by Debian's unbound.

::

    test zones --(dnspython sign_zone, ECDSAP256: KSK+ZSK, NSEC)--> $T/*.zone
        NSD 127.0.0.1:<p1>  (authoritative, the zone files as written)
    unbound 127.0.0.1:<p2>  (validating; trust anchor = each signed zone's KSK)
        <-- postillon's DnsResolver([dns] nameservers = unbound, trust_ad = true)

So the AD bit postillon sees is unbound's real verdict: a signed zone answers AD=1, an
unsigned one AD=0 ("insecure": no trust anchor covers it), and a zone changed after
signing gives SERVFAIL ("bogus"). The recipe and its pitfalls are in
``../shared/notes/test-components.md`` section 1: unbound serves ``test.`` as an empty
local zone unless told ``local-zone: "test." nodefault``, and refuses to ask a loopback
server without ``do-not-query-localhost: no``. Signatures are made at start (0.1 s), so
they are always within their validity window.

:class:`Zone` is a zone's records as text (relative names, ``@`` for the apex);
``signed=False`` leaves it unsigned, ``tamper`` lists (name, type, rdata) whose data is
replaced *after* signing (the signatures then no longer match: bogus). Both daemons run
in the foreground in their own process groups and are stopped by pid.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.zone
from cryptography.hazmat.primitives.asymmetric import ec
from dns.dnssectypes import Algorithm

from support.ports import free_port, stop_process

__all__ = ["NSD", "UNBOUND", "DnssecLab", "Zone", "missing_tools"]

NSD = "/usr/sbin/nsd"
UNBOUND = "/usr/sbin/unbound"


def missing_tools() -> list[str]:
    return [p for p in (NSD, UNBOUND) if not Path(p).exists()]


@dataclass(frozen=True)
class Zone:
    name: str  # "dane.test"
    records: str  # zone-file lines relative to the apex; SOA and NS are added
    signed: bool = True
    tamper: tuple[tuple[str, str, str], ...] = ()  # (name, rdtype, new rdata) after signing


@dataclass
class DnssecLab:
    """NSD + validating unbound on loopback, serving ``zones``. Use as a context manager."""

    root: Path
    zones: list[Zone]
    nsd_port: int = 0
    unbound_port: int = 0
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def nameserver(self) -> str:
        """What ``[dns] nameservers`` should hold: the validating resolver."""
        return f"127.0.0.1:{self.unbound_port}"

    def __enter__(self) -> DnssecLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.nsd_port = self.nsd_port or free_port()
        self.unbound_port = self.unbound_port or free_port()
        anchors = [self._write_zone(z) for z in self.zones]
        (self.root / "anchors").write_text("".join(a for a in anchors if a))
        (self.root / "nsd.conf").write_text(self._nsd_conf())
        (self.root / "unbound.conf").write_text(self._unbound_conf())
        self._spawn([NSD, "-d", "-c", str(self.root / "nsd.conf")], "nsd")
        self._wait_answering(self.nsd_port, self.zones[0].name, "nsd")
        self._spawn([UNBOUND, "-d", "-c", str(self.root / "unbound.conf")], "unbound")
        self._wait_answering(self.unbound_port, self.zones[0].name, "unbound")

    def stop(self) -> None:
        for proc in reversed(self._procs):
            stop_process(proc, signal.SIGTERM, timeout=10)
        self._procs.clear()

    def query(self, name: str, rdtype: str) -> dns.message.Message:
        """Ask unbound directly (for assertions about the lab itself)."""
        q = dns.message.make_query(name, rdtype)
        q.flags |= dns.flags.AD
        return dns.query.udp(q, "127.0.0.1", port=self.unbound_port, timeout=2)

    # -- zones -----------------------------------------------------------------------------

    def _write_zone(self, zone: Zone) -> str:
        """Write the zone file (signed unless told not to); the trust anchor line, if any."""
        origin = zone.name.rstrip(".") + "."
        text = (
            f"$TTL 300\n@ SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 300\n"
            f"@ NS ns.{origin}\nns A 127.0.0.1\n{zone.records}\n"
        )
        parsed = dns.zone.from_text(text, origin=origin, relativize=False)
        anchor = ""
        if zone.signed:
            ksk_key = ec.generate_private_key(ec.SECP256R1())
            zsk_key = ec.generate_private_key(ec.SECP256R1())
            alg = Algorithm.ECDSAP256SHA256
            ksk = dns.dnssec.make_dnskey(ksk_key.public_key(), alg, flags=257)
            zsk = dns.dnssec.make_dnskey(zsk_key.public_key(), alg, flags=256)
            now = datetime.now(UTC)
            with parsed.writer() as txn:
                dns.dnssec.sign_zone(
                    parsed,
                    txn=txn,
                    keys=[(ksk_key, ksk), (zsk_key, zsk)],
                    inception=now - timedelta(hours=1),
                    lifetime=7 * 86400,
                )
            anchor = f"{origin} 300 IN DNSKEY {ksk.to_text()}\n"
        if zone.tamper:
            with parsed.writer() as txn:
                for name, rdtype, rdata in zone.tamper:
                    absolute = dns.name.from_text(name, dns.name.from_text(origin))
                    rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, rdata, origin=origin)
                    # Only the data changes; its RRSIG stays, and no longer matches.
                    txn.replace(absolute, 300, rd)
        parsed.to_file(str(self.root / f"{zone.name}.zone"), relativize=False, want_origin=True)
        return anchor

    def _nsd_conf(self) -> str:
        r = self.root
        zones = "".join(
            f"zone:\n    name: {z.name}\n    zonefile: {z.name}.zone\n" for z in self.zones
        )
        return (
            "server:\n"
            f"    ip-address: 127.0.0.1@{self.nsd_port}\n"
            "    do-ip6: no\n"
            '    username: ""\n'
            '    chroot: ""\n'
            f'    zonesdir: "{r}"\n'
            '    database: ""\n'
            f'    zonelistfile: "{r}/nsd.zonelist"\n'
            f'    xfrdfile: "{r}/nsd.xfrd.state"\n'
            f'    xfrdir: "{r}"\n'
            f'    pidfile: "{r}/nsd.pid"\n'
            f'    logfile: "{r}/nsd.log"\n'
            "    server-count: 1\n"
            "remote-control:\n    control-enable: no\n" + zones
        )

    def _unbound_conf(self) -> str:
        r = self.root
        stubs = "".join(
            f'stub-zone:\n    name: "{z.name}"\n    stub-addr: 127.0.0.1@{self.nsd_port}\n'
            for z in self.zones
        )
        return (
            "server:\n"
            f"    interface: 127.0.0.1@{self.unbound_port}\n"
            f"    port: {self.unbound_port}\n"
            "    outgoing-interface: 127.0.0.1\n"
            "    do-ip6: no\n"
            '    username: ""\n'
            '    chroot: ""\n'
            f'    directory: "{r}"\n'
            f'    pidfile: "{r}/unbound.pid"\n'
            "    use-syslog: no\n"
            f'    logfile: "{r}/unbound.log"\n'
            "    num-threads: 1\n"
            "    access-control: 127.0.0.0/8 allow\n"
            # Required: unbound will not ask a server on loopback otherwise (all SERVFAIL).
            "    do-not-query-localhost: no\n"
            '    module-config: "validator iterator"\n'
            f'    trust-anchor-file: "{r}/anchors"\n'
            # Required: test. is one of unbound's built-in empty local zones (RFC 6761).
            '    local-zone: "test." nodefault\n'
            "    val-log-level: 2\n"
            "    ede: yes\n"  # RFC 8914 extended errors on SERVFAIL (postillon logs them)
            "    cache-max-ttl: 5\n"
            "remote-control:\n    control-enable: no\n"
            + stubs
            # Never the root servers: any other name goes to NSD, which refuses it.
            + f'forward-zone:\n    name: "."\n    forward-addr: 127.0.0.1@{self.nsd_port}\n'
        )

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, argv: list[str], what: str) -> None:
        log = (self.root / f"{what}.stderr").open("wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root
        )
        self._procs.append(proc)

    def _wait_answering(self, port: int, name: str, what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            proc = self._procs[-1]
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {self._logs(what)}")
            try:
                q = dns.message.make_query(name, "SOA")
                dns.query.udp(q, "127.0.0.1", port=port, timeout=0.5)
                return
            except Exception as exc:
                last = exc
                time.sleep(0.05)
        raise RuntimeError(f"{what} did not answer on {port}: {last!r} {self._logs(what)}")

    def _logs(self, what: str) -> str:
        out = []
        for name in (f"{what}.stderr", f"{what}.log"):
            path = self.root / name
            if path.exists():
                out.append(path.read_text(errors="replace")[-2000:])
        return " | ".join(out)
