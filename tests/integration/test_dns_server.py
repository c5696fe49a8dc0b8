"""The test DNS server itself, checked byte-level with raw dnspython queries on loopback.

test --(dns.query.udp / dns.query.tcp)--> DnsServer 127.0.0.1:<random>
test --(subprocess)--> python -m postillon.testing.dns_server --zone FILE --port 0
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from postillon.testing.dns_server import DnsServer, QueryRecord

pytest_plugins = ["dns_fixtures"]
pytestmark = pytest.mark.integration


def ask(
    server: DnsServer, name: str, rdtype: str, *, tcp: bool = False, edns: bool = True
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
    host, port = server.address
    if tcp:
        return dns.query.tcp(query, host, port=port, timeout=2)
    return dns.query.udp(query, host, port=port, timeout=2)


def test_answer_is_authoritative(dns_server: DnsServer) -> None:
    response = ask(dns_server, "example.org", "MX")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert not response.flags & dns.flags.RA
    assert not response.flags & dns.flags.AD
    assert len(response.answer[0]) == 3
    assert response.edns == 0  # EDNS answered in kind


def test_nxdomain_and_nodata_carry_the_soa(dns_server: DnsServer) -> None:
    nx = ask(dns_server, "nope.example.org", "A")
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.answer == []
    (soa,) = nx.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name.to_text() == "example.org."
    assert soa.ttl == 60  # min(SOA TTL, MINIMUM), RFC 2308 §3

    nodata = ask(dns_server, "mx1.example.org", "MX")
    assert nodata.rcode() == dns.rcode.NOERROR
    assert nodata.answer == []
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA


def test_cname_in_answer_section(dns_server: DnsServer) -> None:
    response = ask(dns_server, "www.example.org", "A")
    types = [(rr.name.to_text(), dns.rdatatype.to_text(rr.rdtype)) for rr in response.answer]
    assert types == [("www.example.org.", "CNAME"), ("example.org.", "A")]
    cname = ask(dns_server, "www.example.org", "CNAME")
    assert [dns.rdatatype.to_text(rr.rdtype) for rr in cname.answer] == ["CNAME"]


def test_cname_out_of_zone_ends_the_chain(dns_server: DnsServer) -> None:
    dns_server.set_records("out.example.org", "CNAME", "elsewhere.invalid")
    response = ask(dns_server, "out.example.org", "A")
    assert response.rcode() == dns.rcode.NOERROR
    assert [dns.rdatatype.to_text(rr.rdtype) for rr in response.answer] == ["CNAME"]


def test_cname_loop_is_servfail(dns_server: DnsServer) -> None:
    dns_server.set_records("loop1.example.org", "CNAME", "loop2.example.org")
    dns_server.set_records("loop2.example.org", "CNAME", "loop1.example.org")
    assert ask(dns_server, "loop1.example.org", "A").rcode() == dns.rcode.SERVFAIL


def test_outside_every_zone_is_refused(dns_server: DnsServer) -> None:
    response = ask(dns_server, "example.com", "A")
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.AA


def test_tcp_answers(dns_server: DnsServer) -> None:
    response = ask(dns_server, "example.org", "MX", tcp=True)
    assert len(response.answer[0]) == 3
    assert dns_server.queries[-1] == QueryRecord("example.org", "MX", "tcp")


def test_udp_without_edns_truncates_past_512_bytes(dns_server: DnsServer) -> None:
    dns_server.set_records("big.example.org", "TXT", ['"' + "y" * 200 + f'{i}"' for i in range(4)])
    small = ask(dns_server, "big.example.org", "TXT", edns=False)
    assert small.flags & dns.flags.TC and small.answer == []
    full = ask(dns_server, "big.example.org", "TXT", edns=True)  # 1232 bytes is enough
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 4


def test_programmed_failures(dns_server: DnsServer) -> None:
    dns_server.set_failure("example.org", "truncate")
    assert ask(dns_server, "example.org", "MX").flags & dns.flags.TC
    assert not ask(dns_server, "example.org", "MX", tcp=True).flags & dns.flags.TC
    dns_server.set_failure("example.org", "refused", rdtype="A")
    assert ask(dns_server, "example.org", "A").rcode() == dns.rcode.REFUSED
    dns_server.set_failure("example.org", None)
    assert ask(dns_server, "example.org", "A").rcode() == dns.rcode.NOERROR
    dns_server.set_failure("example.org", "drop")
    with pytest.raises(dns.exception.Timeout):
        dns.query.udp(
            dns.message.make_query("example.org", "A"),
            dns_server.address[0],
            port=dns_server.address[1],
            timeout=0.2,
        )
    dns_server.clear_failures()
    assert ask(dns_server, "example.org", "A").rcode() == dns.rcode.NOERROR


def test_zone_file_text_and_synthetic_soa() -> None:
    text = "$ORIGIN zone.test.\n$TTL 120\n@ IN MX 10 mail\nmail IN A 192.0.2.7\n"
    with DnsServer(text) as server:
        mx = ask(server, "zone.test", "MX")
        assert mx.answer[0][0].exchange.to_text() == "mail.zone.test."
        assert mx.answer[0].ttl == 120
        assert ask(server, "zone.test", "SOA").answer  # synthesised
        assert ask(server, "zone.test", "NS").answer


def test_python_data_names_must_be_in_the_zone() -> None:
    with pytest.raises(ValueError):
        DnsServer({"example.org": {"mx.example.net": {"A": "192.0.2.1"}}})
    server = DnsServer({"example.org": {}})
    with pytest.raises(ValueError):
        server.set_records("host.example.com", "A", "192.0.2.1")


def test_query_log_and_counts(dns_server: DnsServer) -> None:
    ask(dns_server, "Example.ORG", "MX")
    ask(dns_server, "example.org", "A", tcp=True)
    assert dns_server.query_count() == 2
    assert dns_server.query_count("example.org.") == 2
    assert dns_server.query_count(rdtype="mx") == 1
    assert dns_server.query_count(transport="tcp") == 1
    dns_server.reset_queries()
    assert dns_server.queries == []


def test_start_returns_host_and_port_and_stop_frees_it() -> None:
    server = DnsServer({"example.org": {}})
    host, port = server.start()
    try:
        assert host == "127.0.0.1" and port > 1024
        assert server.nameserver == f"127.0.0.1:{port}"
        assert ask(server, "example.org", "SOA").answer
    finally:
        server.stop()
        server.stop()  # idempotent
    # The port is free again: a new server can take it, on UDP and TCP.
    with DnsServer({"example.org": {}}, port=port) as again:
        assert again.address == ("127.0.0.1", port)
        assert ask(again, "example.org", "SOA", tcp=True).answer


def test_no_internal_errors(dns_server: DnsServer) -> None:
    for rdtype in ("A", "AAAA", "MX", "TXT", "TLSA", "PTR", "ANY", "SRV", "CAA"):
        ask(dns_server, "example.org", rdtype)
    assert dns_server.errors == []


def test_cli_serves_a_zone_file(tmp_path: Path) -> None:
    zone = tmp_path / "cli.test.zone"
    zone.write_text("$ORIGIN cli.test.\n$TTL 60\n@ IN MX 0 .\n", encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "postillon.testing.dns_server", "--zone", str(zone), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.split()[2].rsplit(":", 1)[1])
        query = dns.message.make_query("cli.test", "MX")
        response = dns.query.udp(query, "127.0.0.1", port=port, timeout=2)
        assert response.answer[0][0].exchange.to_text() == "."
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert proc.returncode == 0
