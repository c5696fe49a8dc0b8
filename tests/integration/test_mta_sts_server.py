"""postillon serves its own MTA-STS policy (RFC 8461 §3.2, §3.3) over HTTPS with the SMTP
certificate, ``dns records`` publishes the id of exactly that policy, and ``dns check``
(fetching as a sender would) passes against it.

                        ┌──────── postillon serve ─────────┐
  aiohttp client ──TLS, SNI mta-sts.example.org──▶ 127.0.0.8x:443 /.well-known/mta-sts.txt
  smtplib STARTTLS ───────────────▶ SMTP listener   (the same [tls] certificate)
  postillon dns check ──[dns] nameservers──▶ DnsServer (the zone `dns records` printed)
                      └──HTTPS──▶ mta-sts.example.org A 127.0.0.8x ──▶ the policy server
"""

from __future__ import annotations

import os
import pwd
import smtplib
import socket
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from postillon.core.sts import StsPolicy, format_policy, parse_policy
from postillon.dnsrecords.records import mta_sts_id
from postillon.testing.dns_server import DnsServer
from support.https_server import make_tls_files
from support.server import ServerProcess, default_config

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="port 443 needs root (CI runs as root)"),
]

HOST = "mx.example.org"
STS_HOST = "mta-sts.example.org"
POLICY_PATH = "/.well-known/mta-sts.txt"
NAMES = [HOST, STS_HOST, "mta-sts.catchall.test"]
# One loopback address per test: a socket of the test before may still be closing.
ADDRESSES = iter(f"127.0.0.{n}" for n in range(81, 99))


def _tls(directory: Path, names: list[str] = NAMES) -> tuple[Path, dict[str, str]]:
    """A CA and a certificate it issued for ``names``: (CA file, the [tls] section)."""
    ca, cert, key = make_tls_files(directory, names)
    return ca, {"certificate": str(cert), "private_key": str(key)}


def _client_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def _fetch(
    address: str,
    ca: Path | ssl.SSLContext,
    *,
    host: str | None = STS_HOST,
    path: str = POLICY_PATH,
    method: str = "GET",
    sni: str = STS_HOST,
) -> tuple[int, str, str, dict[str, str]]:
    """(status, Content-Type, body, headers) of one request to the policy server."""
    context = ca if isinstance(ca, ssl.SSLContext) else _client_context(ca)
    headers = {"Host": host} if host is not None else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.request(
            method,
            f"https://{address}{path}",
            headers=headers,
            ssl=context,
            server_hostname=sni,
            allow_redirects=False,
        ) as response,
    ):
        body = await response.read()
        return response.status, response.content_type, body.decode(), dict(response.headers)


@pytest.fixture
def sts(make_server: Any, tmp_path: Path) -> tuple[ServerProcess, Path, str]:
    """A running postillon serving the policy on ADDRESS:443 with a CA-issued [tls]
    certificate; (server, CA file, address)."""
    address = next(ADDRESSES)
    ca, tls = _tls(tmp_path / "tls")
    server: ServerProcess = make_server(
        hostname=HOST, tls=tls, mta_sts={"listen": f"{address}:443"}
    )
    return server.start(), ca, address


async def test_the_policy_for_each_domain_and_nothing_else(
    sts: tuple[ServerProcess, Path, str],
) -> None:
    server, ca, address = sts
    expected = "version: STSv1\r\nmode: testing\r\nmx: mx.example.org\r\nmax_age: 604800\r\n"
    status, ctype, body, headers = await _fetch(address, ca)
    assert (status, ctype, body) == (200, "text/plain", expected)
    assert parse_policy(body) == StsPolicy("testing", 604800, (HOST,))
    assert headers["Server"] == "postillon"  # no versions given away
    # The Host header picks the domain, in any case; SNI alone does for HTTP/1.0.
    assert (await _fetch(address, ca, host="MTA-STS.Example.ORG."))[:3] == (200, ctype, expected)
    assert (await _fetch(address, ca, host="mta-sts.catchall.test"))[2] == expected
    assert (await _fetch(address, ca, method="HEAD"))[:3] == (200, "text/plain", "")
    post = await _fetch(address, ca, method="POST")
    assert post[0] == 405 and post[3]["Allow"] == "GET, HEAD"
    for host, path in [
        ("mta-sts.unknown.example", POLICY_PATH),  # not a local domain
        ("example.org", POLICY_PATH),
        (HOST, POLICY_PATH),
        (STS_HOST, "/"),
        (STS_HOST, "/.well-known/"),
        (STS_HOST, "/.well-known/mta-sts.txt/"),
        (STS_HOST, "/.well-known/../.well-known/security.txt"),
        (STS_HOST, "/index.html"),
    ]:
        status, _, body, headers = await _fetch(address, ca, host=host, path=path)
        assert (status, body) == (404, "not found\n"), (host, path)
        assert "Location" not in headers
    assert "Traceback" not in server.stderr()


def _raw(address: str, ca: Path | ssl.SSLContext, request: bytes) -> bytes:
    """One request written by hand over TLS (SNI mta-sts.example.org): the answer's bytes."""
    context = ca if isinstance(ca, ssl.SSLContext) else _client_context(ca)
    with (
        socket.create_connection((address, 443), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=STS_HOST) as conn,
    ):
        conn.sendall(request)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def test_sni_without_host_and_request_limits(sts: tuple[ServerProcess, Path, str]) -> None:
    _, ca, address = sts
    answer = _raw(address, ca, b"GET /.well-known/mta-sts.txt HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(b"max_age: 604800\r\n")
    # A request line or a header beyond the limits is refused, not buffered.
    long_path = b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: mta-sts.example.org\r\n\r\n"
    assert _raw(address, ca, long_path).split(b" ")[1] in (b"400", b"414")
    big_header = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10000 + b"\r\n\r\n"
    assert _raw(address, ca, big_header).split(b" ")[1] in (b"400", b"431")


def _certificate_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


async def test_same_certificate_as_smtp_and_reloaded_with_it(
    sts: tuple[ServerProcess, Path, str], tmp_path: Path
) -> None:
    server, ca, address = sts
    smtp_port = int(server.config["listen"][0]["address"].rpartition(":")[2])
    cert_file = Path(server.config["tls"]["certificate"])

    def smtp_certificate(context: ssl.SSLContext) -> bytes | None:
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
            smtp.starttls(context=context)
            return smtp.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]

    def policy_certificate(trust: Path) -> bytes | None:
        """The certificate the policy server presents, verified against ``trust`` for
        mta-sts.example.org, once it answered 200."""
        with (
            socket.create_connection((address, 443), timeout=10) as raw,
            _client_context(trust).wrap_socket(raw, server_hostname=STS_HOST) as conn,
        ):
            conn.sendall(
                b"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: mta-sts.example.org\r\n\r\n"
            )
            assert conn.recv(65536).startswith(b"HTTP/1.0 200 OK\r\n")
            return conn.getpeercert(binary_form=True)

    unverified = ssl.create_default_context()
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    first = _certificate_der(cert_file)
    assert policy_certificate(ca) == first == smtp_certificate(unverified)

    # A renewed certificate (another CA, here), in the same files: `postillon reload`.
    new_ca, new_tls = _tls(tmp_path / "renewed", [HOST, STS_HOST])  # drops mta-sts.catchall.test
    cert_file.write_bytes(Path(new_tls["certificate"]).read_bytes())
    Path(server.config["tls"]["private_key"]).write_bytes(Path(new_tls["private_key"]).read_bytes())
    _reload(server, 1)
    second = _certificate_der(cert_file)
    assert second != first
    assert policy_certificate(new_ca) == second == smtp_certificate(unverified)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await _fetch(address, ca)  # the old CA no longer vouches for what is served
    # A name the certificate lost is named in the log: senders would refuse its policy.
    log = server.wait_for_log("mta-sts.catchall.test")
    assert "is not valid for mta-sts.catchall.test" in log, log
    assert "is not valid for mta-sts.example.org" not in log


def _reload(server: ServerProcess, count: int) -> None:
    """`postillon reload`, then wait for the server's ``count``-th reload to be done."""
    assert server.cli("reload").returncode == 0
    deadline = time.monotonic() + 20
    while server.maillog().count("configuration reloaded") < count:
        assert time.monotonic() < deadline, server.maillog()
        time.sleep(0.05)


def _records(server: ServerProcess) -> str:
    return server.cli("dns", "records", "example.org").stdout


def _published_id(records: str) -> str:
    line = next(x for x in records.splitlines() if x.startswith("_mta-sts.example.org."))
    return line.split("id=")[1].rstrip('"')


async def test_id_follows_the_served_policy(sts: tuple[ServerProcess, Path, str]) -> None:
    """`dns records` prints an id that changes exactly when the policy served changes:
    for each config, the id is the one derived from the bytes the server sends."""
    server, ca, address = sts
    seen: dict[str, str] = {}
    changes: list[dict[str, Any]] = [
        {},
        {"mode": "enforce"},
        {"mode": "enforce", "max_age": 86400},
        {"mode": "enforce", "max_age": 86400, "mx": [HOST, "*.backup.example.org"]},
        {"mode": "none", "max_age": 86400, "mx": [HOST, "*.backup.example.org"]},
    ]
    for number, change in enumerate(changes):
        server.config["mta_sts"] = {"listen": f"{address}:443", **change}
        server.config["limits"] = {"recipients": 100 + number}  # not in the policy
        server.write_config()
        if number:
            _reload(server, number)
        records = _records(server)
        ident = _published_id(records)
        status, _, body, _ = await _fetch(address, ca)
        assert status == 200
        assert ident == mta_sts_id(body), (change, body)
        assert f";   mode: {change.get('mode', 'testing')}" in records
        seen[body] = ident
    assert len(set(seen.values())) == len(changes)  # each change, a new id
    # The same policy again (after unrelated changes): the same id.
    server.config["limits"] = {"recipients": 999}
    server.write_config()
    assert _published_id(_records(server)) == ident


def _zone(records: str) -> dict[str, Any]:
    """The zone `dns records` printed (with the mta-sts A record for the policy server),
    plus the mail host's own address."""
    assert "mta-sts.example.org. 3600 IN A 127.0.0." in records, records
    return {"example.org": f"$ORIGIN example.org.\n{records}\n{HOST}. 3600 IN A 192.0.2.25\n"}


def test_dns_check_passes_against_our_own_server(sts: tuple[ServerProcess, Path, str]) -> None:
    server, ca, _ = sts
    server.cli("dkim", "keygen", "example.org", "--algorithm", "ed25519")
    records = _records(server)
    trust = {"SSL_CERT_FILE": str(ca)}
    with DnsServer(_zone(records)) as dns:
        server.config["dns"] = {"nameservers": [dns.nameserver], "timeout": 1, "attempts": 1}
        server.write_config()
        checked = server.cli("dns", "check", "example.org", check=False, env=trust)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"✓ MTA-STS: v=STSv1; id={_published_id(records)}" in checked.stdout
        assert f"✓ MTA-STS policy: mode testing, mx {HOST}, max_age 604800" in checked.stdout

        # The policy changes (and the server reloads) but the old id stays published:
        # senders would keep the old policy, and the check says so.
        server.config["mta_sts"]["mode"] = "enforce"
        server.write_config()
        _reload(server, 1)
        checked = server.cli("dns", "check", "example.org", check=False, env=trust)
    new_id = mta_sts_id(format_policy(StsPolicy("enforce", 604800, (HOST,))))
    assert (
        f"! MTA-STS: 'v=STSv1; id={_published_id(records)}': the policy postillon serves "
        f"has id={new_id}; publish _mta-sts.example.org. IN TXT"
    ) in checked.stdout, checked.stdout
    assert f"✓ MTA-STS policy: mode enforce, mx {HOST}, max_age 604800" in checked.stdout
    assert checked.returncode == 0, checked.stdout  # a warning, not a failure


def test_bound_as_root_served_after_the_drop_with_the_self_signed_certificate() -> None:
    """Port 443 is bound before the server drops to its user; the self-signed certificate
    (made after the drop, in data_dir/tls) is what the policy server presents."""
    entry = pwd.getpwnam("postillon")
    root = Path(tempfile.mkdtemp(prefix="postillon-sts-"))
    root.chmod(0o755)
    address = next(ADDRESSES)
    config = default_config(root, hostname=HOST, mta_sts={"listen": f"{address}:443"})
    config["user"] = "postillon"
    server = ServerProcess(root, config)
    try:
        server.start()
        assert server.proc is not None
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert set(uid_line.split()[1:]) == {str(entry.pw_uid)}
        self_signed = server.data_dir / "tls" / "selfsigned-cert.pem"
        # Trust the self-signed certificate; it names the mail host only.
        context = ssl.create_default_context(cafile=str(self_signed))
        context.check_hostname = False
        request = b"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: mta-sts.example.org\r\n\r\n"
        answer = _raw(address, context, request)
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n"), answer
        log = server.wait_for_log("is not valid for mta-sts.example.org")
        assert "is not valid for mta-sts.example.org" in log, log
    finally:
        server.stop()
