"""``postillon dns records`` output is a zone a real DNS server serves, and ``postillon dns
check`` (through [dns] nameservers, the loopback fixture) passes on it and names what is wrong
in a broken one.

postillon dkim keygen ──▶ postillon dns records example.org ──▶ zone text ──▶ DnsServer
postillon dns check example.org ──[dns] nameservers──▶ DnsServer ──▶ ✓/✗ checklist, exit status
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postillon.dnsrecords.records import mta_sts_policy
from postillon.testing.dns_server import DnsServer
from support.https_server import Answer, HttpsServer, make_tls_files
from support.server import ServerProcess

pytestmark = pytest.mark.integration

HOST = "mx.example.org"
HOST_IP = "192.0.2.25"
REVERSE = {"2.0.192.in-addr.arpa": {"25.2.0.192.in-addr.arpa": {"PTR": HOST}}}
# The MTA-STS policy host (https://mta-sts.example.org, port 443: needs root, as CI has).
STS_HOST = "mta-sts.example.org"
STS_IP = "127.0.0.80"
POLICY_PATH = "/.well-known/mta-sts.txt"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the policy host listens on port 443 (CI runs as root)"
)


@pytest.fixture
def policy_host(tmp_path: Path) -> Iterator[HttpsServer]:
    """https://mta-sts.example.org serving the policy ``dns records`` suggests."""
    with HttpsServer(tmp_path / "web", STS_IP, [STS_HOST]) as web:
        web.answers[POLICY_PATH] = Answer(body=mta_sts_policy(HOST).encode())
        yield web


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


@needs_root
def test_published_records_pass_the_check(
    configured: ServerProcess, policy_host: HttpsServer
) -> None:
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
    zone = (
        f"$ORIGIN example.org.\n{records}\n{HOST}. 3600 IN A {HOST_IP}\n"
        f"{STS_HOST}. 3600 IN A {STS_IP}\n"
    )
    with DnsServer({"example.org": zone, **REVERSE}) as dns_server:
        _point_at(configured, dns_server)
        checked = configured.cli(
            "dns", "check", "example.org", check=False, env=_trusting(policy_host)
        )
        queried = {(q.name, q.rdtype) for q in dns_server.queries}
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "✗" not in checked.stdout and "!" not in checked.stdout.split("\n", 1)[1]
    for title in ("MX", "SPF", "DKIM rsa1 (rsa)", "DKIM ed1 (ed25519)", "DMARC", "MTA-STS"):
        assert f"✓ {title}" in checked.stdout, checked.stdout
    assert f"✓ MTA-STS policy: mode testing, mx {HOST}, max_age 604800" in checked.stdout, (
        checked.stdout
    )
    assert ("ed1._domainkey.example.org", "TXT") in queried  # asked the fixture, nobody else
    assert (STS_HOST, "A") in queried  # the policy host's address, from the fixture too
    assert policy_host.requests == [(STS_HOST, POLICY_PATH)]


def _trusting(web: HttpsServer) -> dict[str, str]:
    """The CLI's environment: trust the test CA (and only it)."""
    return {"SSL_CERT_FILE": str(web.ca_file)}


def _sts_zone(records: str) -> dict[str, Any]:
    zone = (
        f"$ORIGIN example.org.\n{records}\n{HOST}. 3600 IN A {HOST_IP}\n"
        f"{STS_HOST}. 3600 IN A {STS_IP}\n"
    )
    return {"example.org": zone, **REVERSE}


@needs_root
@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            Answer(404, b"nope\n"),
            "✗ MTA-STS policy: https://mta-sts.example.org/.well-known/mta-sts.txt: HTTP 404",
        ),
        (
            Answer(body=b"version: STSv1\nmode: enforce\nmx: mx.other.example\nmax_age: 86400\n"),
            "mx.example.org not listed; senders that enforce MTA-STS will not deliver there",
        ),
        (
            Answer(body=b"version: STSv1\nmode: testing\nmx: mx.other.example\nmax_age: 86400\n"),
            "! MTA-STS policy: mode testing, mx mx.other.example, max_age 86400: "
            "mx.example.org not listed",
        ),
        (Answer(body=b"version: STSv1\nmode: sometimes\n"), "one 'mode:' of enforce, testing"),
        (
            Answer(301, headers={"Location": "https://www.example.org/sts.txt"}),
            "HTTP 301 redirect to https://www.example.org/sts.txt: senders do not follow",
        ),
        (
            Answer(headers={"Content-Type": "text/html"}, body=mta_sts_policy(HOST).encode()),
            "Content-Type is 'text/html', not text/plain",
        ),
    ],
)
def test_policy_file_problems_are_named(
    configured: ServerProcess, policy_host: HttpsServer, answer: Answer, expected: str
) -> None:
    records = configured.cli("dns", "records", "example.org").stdout
    policy_host.answers[POLICY_PATH] = answer
    with DnsServer(_sts_zone(records)) as dns_server:
        _point_at(configured, dns_server)
        checked = configured.cli(
            "dns", "check", "example.org", check=False, env=_trusting(policy_host)
        )
    assert expected in checked.stdout, checked.stdout
    assert checked.returncode == (0 if expected.startswith("!") else 1), checked.stdout


@needs_root
def test_policy_host_certificate_must_be_valid(
    configured: ServerProcess, policy_host: HttpsServer, tmp_path: Path
) -> None:
    """A certificate the sender cannot verify (here: the CLI trusts another CA only)
    means no MTA-STS policy at all: a ✗, not a ✓."""
    records = configured.cli("dns", "records", "example.org").stdout
    other_ca, _, _ = make_tls_files(tmp_path / "other", ["unrelated.example"])
    with DnsServer(_sts_zone(records)) as dns_server:
        _point_at(configured, dns_server)
        checked = configured.cli(
            "dns", "check", "example.org", check=False, env={"SSL_CERT_FILE": str(other_ca)}
        )
    assert checked.returncode == 1, checked.stdout
    expected = f"✗ MTA-STS policy: https://{STS_HOST}{POLICY_PATH}: the certificate is not valid"
    assert expected in checked.stdout, checked.stdout
