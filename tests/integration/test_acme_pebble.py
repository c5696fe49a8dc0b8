"""Automatic certificates (``[tls] acme = true``, RFC 8555) against Pebble, Let's Encrypt's
ACME test server: obtained at start, presented on 465 and after STARTTLS (the issuer
checked through ``ssl`` against Pebble's own root), renewed by ``postillon tls renew`` and
applied without a restart while a session stays up; and a challenge the CA refuses keeps
the old certificate, with the error on /healthz and /metrics.

                 ┌──────────── postillon serve ─────────────┐
  Pebble ──ACME──▶ (client in a thread)                      │
    │  resolves mx.acme.test / mta-sts.acme.test at the loopback DnsServer (127.0.0.1)
    ├──TLS-ALPN-01──▶ [mta_sts] listen 127.0.0.1:TLS (the MTA-STS policy socket)
    └──HTTP-01─────▶ [tls] acme_http_listen 127.0.0.1:HTTP
  ssl / smtplib ──▶ 465 (implicit TLS), 25 (STARTTLS), the policy server
  urllib ──▶ [admin] /healthz, /metrics
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from postillon.testing.dns_server import DnsServer
from support.pebble import Pebble
from support.ports import free_port, wait_until
from support.server import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HOST = "mx.acme.test"
DOMAIN = "acme.test"
ZONES = {DOMAIN: {HOST: {"A": "127.0.0.1"}, f"mta-sts.{DOMAIN}": {"A": "127.0.0.1"}}}


@dataclass
class AcmeLab:
    dns: DnsServer
    pebble: Pebble
    server: ServerProcess
    smtp_port: int
    smtps_port: int
    sts_port: int
    admin_port: int
    host: str = "127.0.0.1"  # the node's listening address

    def status(self) -> dict[str, Any]:
        path = self.server.data_dir / "acme" / "status.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def trust(self) -> ssl.SSLContext:
        """Trusts Pebble's issuing root (fetched from its management API) and nothing else."""
        ctx = ssl.create_default_context(cadata=self.pebble.root_pem().decode())
        return ctx

    def smtps_certificate(self) -> x509.Certificate:
        """The certificate port 465 presents, verified for the hostname."""
        with (
            socket.create_connection((self.host, self.smtps_port), timeout=10) as raw,
            self.trust().wrap_socket(raw, server_hostname=HOST) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def admin(self, path: str, token: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{self.host}:{self.admin_port}{path}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()


@pytest.fixture
def acme_lab(
    tmp_path: Path, make_server: Callable[..., ServerProcess], request: pytest.FixtureRequest
) -> Iterator[Callable[..., AcmeLab]]:
    labs: list[AcmeLab] = []

    def make(
        *,
        tls_alpn: bool = True,
        http01: bool = True,
        queue: dict[str, Any] | None = None,
        beside: AcmeLab | None = None,
        host: str = "127.0.0.1",
    ) -> AcmeLab:
        """A postillon with ACME (and Pebble and DNS for it, or those of ``beside``: a
        second node of one cluster, listening on ``host``)."""
        if beside is None:
            dns = DnsServer(ZONES)
            dns.start()
            sts_port, http_port = free_port(), free_port()
            pebble = Pebble(tmp_path / "pebble", dns.nameserver, http_port, sts_port).start()
        else:
            dns, pebble = beside.dns, beside.pebble
            sts_port, http_port = pebble.tls_port, pebble.http_port
        smtp_port, smtps_port, admin_port = free_port(host), free_port(host), free_port(host)
        tls: dict[str, Any] = {
            "acme": True,
            "acme_directory": pebble.directory,
            "acme_ca_file": str(pebble.ca_file),
            "acme_email": f"hostmaster@{DOMAIN}",
        }
        if http01:
            tls["acme_http_listen"] = f"{host}:{http_port}"
        extra: dict[str, Any] = {"queue": queue} if queue else {}
        if tls_alpn:
            extra["mta_sts"] = {"listen": f"{host}:{sts_port}"}
        server = make_server(
            hostname=HOST,
            listen=[
                {"kind": "smtp", "address": f"{host}:{smtp_port}"},
                {"kind": "submissions", "address": f"{host}:{smtps_port}"},
            ],
            domain=[{"name": DOMAIN, "mailboxes": ["alice", "postmaster"]}],
            relay={"trusted_networks": ["127.0.0.0/8"]},
            tls=tls,
            admin={"listen": f"{host}:{admin_port}"},
            dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
            **extra,
        )
        lab = AcmeLab(dns, pebble, server, smtp_port, smtps_port, sts_port, admin_port, host)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.server.stop()
    for lab in labs:
        lab.pebble.stop()
        lab.dns.stop()


def _wait_state(lab: AcmeLab, attempts: int, timeout: float = 90.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        status = lab.status()
        return status if status.get("attempts", 0) >= attempts else None

    try:
        return wait_until(done, timeout=timeout, what="the ACME attempt")
    except TimeoutError:
        raise AssertionError(
            f"no ACME result\nserver:\n{lab.server.stderr()}\npebble:\n{lab.pebble.log()}"
        ) from None


def test_obtained_served_and_renewed_without_restart(
    acme_lab: Callable[..., AcmeLab],
) -> None:
    lab = acme_lab()
    lab.server.start()
    status = _wait_state(lab, 1)
    assert status["state"] == "ok", status
    assert sorted(status["names"]) == sorted([HOST, f"mta-sts.{DOMAIN}"])
    # Validated over TLS-ALPN-01 on the MTA-STS socket (preferred when it is configured).
    assert "answering the TLS-ALPN-01 challenge for mx.acme.test" in lab.server.maillog()
    # 465: verified against Pebble's root, for the hostname.
    first = lab.smtps_certificate()
    assert "Pebble Intermediate" in first.issuer.rfc4514_string()
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {HOST, f"mta-sts.{DOMAIN}"}
    # STARTTLS on 25 presents the same certificate (smtplib checks the name it connected
    # to, 127.0.0.1: check the chain with ssl, then the name by hand). This session stays
    # up across the renewal.
    held = smtplib.SMTP("127.0.0.1", lab.smtp_port, timeout=30)
    held.starttls(context=_no_name_check(lab))
    sock = held.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None and x509.load_der_x509_certificate(der) == first
    held.ehlo("client.test")

    renew = lab.server.cli("tls", "renew", "--wait", "120", check=False)
    assert renew.returncode == 0, renew.stdout + renew.stderr + lab.server.stderr()
    assert "renewed" in renew.stdout

    second = lab.smtps_certificate()
    assert second.serial_number != first.serial_number
    assert "Pebble Intermediate" in second.issuer.rfc4514_string()
    # The MTA-STS policy server presents the new one too (SNI mta-sts.DOMAIN).
    with (
        socket.create_connection(("127.0.0.1", lab.sts_port), timeout=10) as raw,
        lab.trust().wrap_socket(raw, server_hostname=f"mta-sts.{DOMAIN}") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        assert x509.load_der_x509_certificate(der).serial_number == second.serial_number
    # A reload keeps presenting the ACME certificate (not the self-signed stand-in).
    reload = lab.server.cli("reload", "--api", env={"POSTILLON_ADMIN_TOKEN": _token(lab)})
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert lab.smtps_certificate().serial_number == second.serial_number
    # The old session still carries a message, on its first certificate.
    held.sendmail(f"postmaster@{DOMAIN}", [f"alice@{DOMAIN}"], b"Subject: held\r\n\r\nhi\r\n")
    held.quit()
    lab.server.wait_for_mail(f"alice@{DOMAIN}")

    code, body = lab.admin("/healthz")
    health = json.loads(body)
    assert code == 200 and health["certificate"]["state"] == "ok"
    token = lab.server.cli("admin", "token").stdout.strip()
    code, metrics = lab.admin("/metrics", token)
    assert code == 200
    assert b"postillon_acme_renewal_failures 0.0" in metrics
    expiry = _metric(metrics, "postillon_tls_certificate_expiry_timestamp_seconds")
    assert expiry == second.not_valid_after_utc.timestamp()
    # Kept for the next start: the files are the server's only.
    for name in ("account-key.pem", "cert.pem", "key.pem", "status.json"):
        assert (lab.server.data_dir / "acme" / name).stat().st_mode & 0o777 == 0o600


def _token(lab: AcmeLab) -> str:
    return lab.server.cli("admin", "token").stdout.strip()


def _metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _no_name_check(lab: AcmeLab) -> ssl.SSLContext:
    ctx = lab.trust()
    ctx.check_hostname = False
    return ctx


def test_refused_challenge_keeps_the_old_certificate_and_says_so(
    acme_lab: Callable[..., AcmeLab],
) -> None:
    # HTTP-01 only (no MTA-STS listener): issuance through port "80" works too.
    lab = acme_lab(tls_alpn=False)
    lab.server.start()
    status = _wait_state(lab, 1)
    assert status["state"] == "ok", status
    first = lab.smtps_certificate()

    # The hostname now points where nothing answers the challenge: Pebble refuses.
    lab.dns.set_records(HOST, "A", "127.0.0.2")
    renew = lab.server.cli("tls", "renew", "--wait", "120", check=False)
    assert renew.returncode == 1, renew.stdout + renew.stderr
    assert "renewal failed" in renew.stdout and HOST in renew.stdout

    assert lab.smtps_certificate().serial_number == first.serial_number
    code, body = lab.admin("/healthz")
    health = json.loads(body)
    assert code == 200, health
    assert health["certificate"]["state"] == "failing"
    assert HOST in health["certificate"]["last_error"]
    assert any("renewal failing" in w for w in health["warnings"])
    token = lab.server.cli("admin", "token").stdout.strip()
    code, metrics = lab.admin("/metrics", token)
    assert b"postillon_acme_renewal_failures 1.0" in metrics
    assert "could not obtain a certificate" in lab.server.maillog()


def test_cluster_node_loads_the_certificate_another_node_obtained(
    acme_lab: Callable[..., AcmeLab], postgres_dsn: str
) -> None:
    """Two nodes on one PostgreSQL queue: the first obtains the certificate (holding the
    store's lease) and shares it; the second, started later, loads it from the store and
    presents it without ordering one (the CA would reach only the first: DNS names it)."""
    queue = {"store": "postgresql", "dsn": postgres_dsn}
    first = acme_lab(queue=queue)
    first.server.write_config()
    assert "applied migration" in first.server.cli("db", "migrate").stdout
    first.server.start()
    assert _wait_state(first, 1)["state"] == "ok"
    obtained = first.smtps_certificate()

    second = acme_lab(queue=queue, beside=first, host="127.0.0.2")
    second.server.start()
    wait_until(lambda: second.status().get("state") == "ok", timeout=30, what="the second node")
    assert second.status()["attempts"] == 0  # it ordered nothing
    assert second.smtps_certificate().serial_number == obtained.serial_number
    assert "loaded the certificate another node renewed" in second.server.maillog()
    assert "ordering a certificate" not in second.server.maillog()
