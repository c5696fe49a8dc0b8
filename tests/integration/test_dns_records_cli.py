"""``postillon dns records`` output is a zone a real DNS server serves, and ``postillon dns
check`` (through [dns] nameservers, the loopback fixture) passes on it and names what is wrong
in a broken one.

postillon dkim keygen ──▶ postillon dns records example.org ──▶ zone text ──▶ DnsServer
postillon dns check example.org ──[dns] nameservers──▶ DnsServer ──▶ ✓/✗ checklist, exit status
"""

from __future__ import annotations

from typing import Any

import pytest

from postillon.testing.dns_server import DnsServer
from postillon.testing.server import ServerProcess

pytestmark = pytest.mark.integration

HOST = "mx.example.org"
HOST_IP = "192.0.2.25"
REVERSE = {"2.0.192.in-addr.arpa": {"25.2.0.192.in-addr.arpa": {"PTR": HOST}}}


@pytest.fixture
def configured(make_server: Any) -> ServerProcess:
    server: ServerProcess = make_server(hostname=HOST)
    server.write_config()
    server.data_dir.mkdir(exist_ok=True)
    server.cli("dkim", "keygen", "example.org", "--selector", "rsa1")
    server.cli("dkim", "keygen", "example.org", "--selector", "ed1", "--algorithm", "ed25519")
    return server


def _point_at(server: ServerProcess, dns_server: DnsServer) -> None:
    server.config["dns"] = {"nameservers": [dns_server.nameserver], "timeout": 1, "attempts": 1}
    server.write_config()


def test_published_records_pass_the_check(configured: ServerProcess) -> None:
    records = configured.cli("dns", "records", "example.org").stdout
    for expected in (
        "example.org. 3600 IN MX 10 mx.example.org.",
        'example.org. 3600 IN TXT "v=spf1 mx ~all"',
        "rsa1._domainkey.example.org. 3600 IN TXT (",
        'ed1._domainkey.example.org. 3600 IN TXT "v=DKIM1; k=ed25519; p=',
        '_dmarc.example.org. 3600 IN TXT "v=DMARC1; p=none; rua=mailto:postmaster@example.org"',
        '_mta-sts.example.org. 3600 IN TXT "v=STSv1; id=',
        '_smtp._tls.example.org. 3600 IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.org"',
        "mta-sts.example.org/.well-known/mta-sts.txt",
    ):
        assert expected in records, records
    zone = f"$ORIGIN example.org.\n{records}\n{HOST}. 3600 IN A {HOST_IP}\n"
    with DnsServer({"example.org": zone, **REVERSE}) as dns_server:
        _point_at(configured, dns_server)
        checked = configured.cli("dns", "check", "example.org", check=False)
        queried = {(q.name, q.rdtype) for q in dns_server.queries}
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "✗" not in checked.stdout and "!" not in checked.stdout.split("\n", 1)[1]
    for title in ("MX", "SPF", "DKIM rsa1 (rsa)", "DKIM ed1 (ed25519)", "DMARC", "MTA-STS"):
        assert f"✓ {title}" in checked.stdout, checked.stdout
    assert ("ed1._domainkey.example.org", "TXT") in queried  # asked the fixture, nobody else


def test_broken_zone_is_reported_item_by_item(configured: ServerProcess) -> None:
    broken = {
        "example.org": {
            "@": {
                "MX": "10 old-mx.example.net",
                "TXT": ['"v=spf1 mx -all"', '"v=spf1 +all"'],  # two SPF records: permerror
            },
            HOST: {"A": HOST_IP},  # no HELO SPF, PTR names another host
            # A stale key for rsa1, nothing for ed1.
            "rsa1._domainkey.example.org": {"TXT": '"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0B"'},
            "_mta-sts.example.org": {"TXT": '"v=STSv1; id=not valid!"'},
            # no _dmarc, no TLS-RPT
        },
        "2.0.192.in-addr.arpa": {"25.2.0.192.in-addr.arpa": {"PTR": "host.provider.example"}},
    }
    with DnsServer(broken) as dns_server:
        _point_at(configured, dns_server)
        checked = configured.cli("dns", "check", "example.org", check=False)
    out = checked.stdout
    assert checked.returncode == 1, out + checked.stderr
    for line in (
        "✗ MX: MX points to old-mx.example.net, not to this host (mx.example.org)",
        "✗ SPF: 2 SPF records: a permerror (RFC 7208 4.5)",
        "✗ DKIM rsa1 (rsa): rsa1._domainkey.example.org publishes a different key",
        "✗ DKIM ed1 (ed25519): no key record at ed1._domainkey.example.org",
        "✗ DMARC: no DMARC record at _dmarc.example.org",
        "✗ MTA-STS: ",
        "! TLS-RPT: recommended",
        "! Reverse DNS: 192.0.2.25 → host.provider.example",
        "! SPF for HELO name: recommended",
        "✓ Mail host address: mx.example.org → 192.0.2.25",
    ):
        assert line in out, out
    assert "problem(s)" in out


def test_check_reports_dns_failure_and_bad_input(configured: ServerProcess) -> None:
    with DnsServer({"example.org": {"@": {"A": HOST_IP}}}) as dns_server:
        dns_server.set_failure("example.org", "servfail")
        _point_at(configured, dns_server)
        checked = configured.cli("dns", "check", "example.org", check=False)
    assert checked.returncode == 1
    assert "✗ MX: DNS lookup failed" in checked.stdout, checked.stdout
    other = configured.cli("dns", "records", "other.test").stdout
    assert "; note: other.test is not a [[domain]] in the config" in other
    assert "; DKIM: no key for other.test yet" in other
    bad = configured.cli("dns", "records", "not a domain", check=False)
    assert bad.returncode == 2 and "not a domain name" in bad.stderr
