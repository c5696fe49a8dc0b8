"""The whole path of issue 17 on one machine: ``postillon setup`` with ACME, then the
server it wrote, getting its certificate from Pebble and taking the admin's mail.

    postillon setup --root R --acme-directory https://127.0.0.1:P/dir --acme-ca-file …
        │ writes R/etc/postillon/postillon.toml ([tls] acme = true, [mta_sts] listen on
        │ --https-port for TLS-ALPN-01), the DKIM keys, the admin's account (password printed)
        ▼
    postillon --config R/etc/postillon/postillon.toml serve        (as root; drops to postillon)
        ├── ACME ──▶ Pebble ──TLS-ALPN-01──▶ 127.0.0.1:--https-port
        │            (mx.example.org, mta-sts.example.org ─▶ 127.0.0.1 in the loopback DNS)
        ├── 465 and 587 STARTTLS present Pebble's certificate (issuer checked with ssl)
        ├── 587: the admin logs in with the printed password; the message lands in the
        │         admin's Maildir, DKIM-signed with a key setup made
        └── postillon tls renew ──▶ a new serial on 465 and 587, same server process

The only line added to the written config is ``[dns] nameservers`` (tests never ask the
machine's resolver); everything else is what setup wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from postillon.testing.dns_server import DnsServer
from support.pebble import Pebble
from support.ports import free_port, stop_process, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the server drops to postillon)"),
]

POSTILLON = [sys.executable, "-m", "postillon.cli.main"]
HOST = "mx.example.org"
DOMAIN = "example.org"
ADMIN = f"you@{DOMAIN}"
ZONES = {DOMAIN: {HOST: {"A": "127.0.0.1"}, f"mta-sts.{DOMAIN}": {"A": "127.0.0.1"}}}


@pytest.fixture
def world() -> Iterator[Path]:
    # Under /tmp and world-searchable: the server drops to user postillon, which must
    # reach the data directory and Pebble's CA file (pytest's tmp directories are 0700).
    directory = Path(tempfile.mkdtemp(prefix="setup-acme-", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONES) as server:
        yield server


@pytest.fixture
def pebble(world: Path, dns: DnsServer) -> Iterator[Pebble]:
    # TLS-ALPN-01 only: setup configures no HTTP-01 listener, so Pebble's HTTP port is
    # one nothing listens on.
    ca = Pebble(world / "pebble", dns.nameserver, http_port=free_port(), tls_port=free_port())
    ca.start()
    (world / "pebble").chmod(0o755)
    ca.ca_file.chmod(0o644)
    yield ca
    ca.stop()


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "POSTILLON_CONFIG"}
    return subprocess.run(
        [*POSTILLON, *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


class Installation:
    """What ``postillon setup`` wrote under ``root``, and the server running from it."""

    def __init__(self, root: Path, ports: dict[str, int]) -> None:
        self.root = root
        self.ports = ports
        self.config = root / "etc/postillon/postillon.toml"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def stderr_path(self) -> Path:
        return self.root / "serve.stderr"

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "POSTILLON_CONFIG"}
        self.proc = subprocess.Popen(
            [*POSTILLON, "--config", str(self.config), "serve"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.stderr_path, "ab"),  # noqa: SIM115
            env=env,
        )

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)

    def certificate(self, port: int, *, starttls: bool, trust: ssl.SSLContext) -> x509.Certificate:
        """The certificate ``port`` presents (after STARTTLS when ``starttls``), verified
        against Pebble's root for the hostname."""
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            if starttls:
                _starttls(raw)
            with trust.wrap_socket(raw, server_hostname=HOST) as tls:
                der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


def test_setup_with_acme_serves_pebbles_certificate_takes_mail_and_renews(
    world: Path, dns: DnsServer, pebble: Pebble
) -> None:
    root = world / "root"
    root.mkdir(mode=0o755)
    ports = {name: free_port() for name in ("smtp", "submissions", "submission", "admin")}
    ports["https"] = pebble.tls_port  # Pebble connects here for TLS-ALPN-01
    setup_args = [
        "setup",
        "--root",
        str(root),
        "--hostname",
        HOST,
        "--domain",
        DOMAIN,
        "--admin-email",
        ADMIN,
        "--listen-host",
        "127.0.0.1",
        "--ports",
        f"{ports['smtp']},{ports['submissions']},{ports['submission']}",
        "--admin-listen",
        f"127.0.0.1:{ports['admin']}",
        "--https-port",
        str(ports["https"]),
        "--acme-directory",
        pebble.directory,
        "--acme-ca-file",
        str(pebble.ca_file),
    ]
    setup = run(*setup_args)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    match = re.search(rf"Mail account {ADMIN}, password \(shown only now\): (\S+)", setup.stdout)
    assert match, setup.stdout
    password = match.group(1)
    assert (
        f"port 443, forwarded to {ports['https']} (TLS-ALPN-01) as {HOST}, mta-sts.{DOMAIN}"
        in setup.stdout
    )
    assert f"The ACME certificate ([tls] acme) names mta-sts.{DOMAIN}" in setup.stdout

    site = Installation(root, ports)
    text = site.config.read_text()
    assert re.search(rf'^acme_directory = "{re.escape(pebble.directory)}"$', text, re.M)
    assert re.search(rf'^acme_ca_file = "{re.escape(str(pebble.ca_file))}"$', text, re.M)
    # Tests never ask the machine's resolver: the loopback DNS server answers instead.
    site.config.write_text(
        text + f'\n[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 1.0\nattempts = 1\n'
    )
    checked = run("check-config", str(site.config))
    assert checked.returncode == 0, checked.stdout + checked.stderr

    site.start()
    try:
        _the_path(site, pebble, password)
    finally:
        site.stop()
    # Setup again over the installation the server has been running from: nothing to do.
    again = run(*setup_args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Nothing to change: everything is already set up." in again.stdout


def _the_path(site: Installation, pebble: Pebble, password: str) -> None:
    trust = ssl.create_default_context(cadata=pebble.root_pem().decode())
    acme = site.root / "var/lib/postillon/acme"

    def issued() -> x509.Certificate | None:
        if site.proc is not None and site.proc.poll() is not None:
            raise AssertionError(f"postillon exited:\n{site.log()}")
        try:
            return site.certificate(site.ports["submissions"], starttls=False, trust=trust)
        except (OSError, ssl.SSLError):
            return None  # not listening yet, or still the stand-in certificate

    try:
        first = wait_until(issued, timeout=120, what="Pebble's certificate on 465", interval=0.5)
    except TimeoutError:
        status = (acme / "status.json").read_text() if (acme / "status.json").exists() else ""
        raise AssertionError(
            f"no certificate from Pebble\nstatus: {status}\nserver:\n{site.log()}\n"
            f"pebble:\n{pebble.log()}"
        ) from None
    assert "Pebble Intermediate" in first.issuer.rfc4514_string()
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {HOST, f"mta-sts.{DOMAIN}"}
    on_587 = site.certificate(site.ports["submission"], starttls=True, trust=trust)
    assert on_587.serial_number == first.serial_number
    # The HTTPS listener setup configured for TLS-ALPN-01 serves the MTA-STS policy
    # with that certificate, and the self-signed stand-in it started with was not
    # reported as a certificate to fix.
    assert "mode: testing" in _policy(site.ports["https"], trust)
    assert "is not valid for mta-sts" not in site.log()

    # The admin sends with the password setup printed; it lands in the Maildir.
    with smtplib.SMTP("127.0.0.1", site.ports["submission"], timeout=30) as client:
        context = ssl.create_default_context(cadata=pebble.root_pem().decode())
        context.check_hostname = False  # connected by address; the chain is still checked
        client.starttls(context=context)
        client.login(ADMIN, password)
        client.sendmail(
            ADMIN,
            [f"postmaster@{DOMAIN}"],
            f"From: {ADMIN}\r\nTo: postmaster@{DOMAIN}\r\nSubject: first\r\n\r\n"
            "hello from setup with ACME\r\n".encode(),
        )
    new = site.root / f"var/lib/postillon/mail/{DOMAIN}/you/new"
    wait_until(lambda: new.is_dir() and any(new.iterdir()), timeout=30, what="the delivery")
    (message,) = new.iterdir()
    data = message.read_bytes()
    assert b"hello from setup with ACME" in data
    assert b"DKIM-Signature:" in data  # signed with a key setup made

    # Renewal on demand, applied without a restart.
    pid = site.proc.pid if site.proc else None
    renew = run("--config", str(site.config), "tls", "renew", "--wait", "120", timeout=150)
    assert renew.returncode == 0, renew.stdout + renew.stderr + site.log()
    assert "renewed" in renew.stdout
    second = site.certificate(site.ports["submissions"], starttls=False, trust=trust)
    assert second.serial_number != first.serial_number
    assert "Pebble Intermediate" in second.issuer.rfc4514_string()
    on_587 = site.certificate(site.ports["submission"], starttls=True, trust=trust)
    assert on_587.serial_number == second.serial_number
    assert site.proc is not None and site.proc.poll() is None and site.proc.pid == pid
    for name in ("account-key.pem", "cert.pem", "key.pem"):
        assert (acme / name).stat().st_mode & 0o777 == 0o600

    # A restart (systemctl restart) serves the kept certificate without a new order.
    site.stop()
    orders = site.log().count("ordering a certificate")
    site.start()
    kept = wait_until(issued, timeout=60, what="the kept certificate on 465", interval=0.5)
    assert kept.serial_number == second.serial_number
    assert site.log().count("ordering a certificate") == orders


def _policy(port: int, trust: ssl.SSLContext) -> str:
    """``https://mta-sts.example.org/.well-known/mta-sts.txt``, fetched by address."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        trust.wrap_socket(raw, server_hostname=f"mta-sts.{DOMAIN}") as tls,
    ):
        tls.sendall(
            f"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.{DOMAIN}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        response = b""
        while chunk := tls.recv(4096):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def _starttls(sock: socket.socket) -> None:
    """Greeting, EHLO, STARTTLS on a plain socket (smtplib would check the certificate
    for the address it connected to, not the hostname)."""
    reader = sock.makefile("rb")

    def reply() -> int:
        while True:
            line = reader.readline()
            assert line, "connection closed"
            if line[3:4] != b"-":
                return int(line[:3])

    assert reply() == 220
    sock.sendall(b"EHLO client.test\r\n")
    assert reply() == 250
    sock.sendall(b"STARTTLS\r\n")
    assert reply() == 220
    reader.close()
