"""ARC keeps DMARC passing across a forwarder (RFC 8617).

    smtplib from 127.0.0.2 ──▶ A (fwd.test; alias list@fwd.test -> carol@dest.test)
        │  SPF pass, DMARC pass for origin.test (p=reject); A seals ARC i=1 with fwd.test's key
        └──DNS MX dest.test──▶ B on 127.0.0.3 (trusts fwd.test as ARC sealer) ──▶ Maildir
              B sees SPF fail (A's address is not in origin.test's SPF) and no DKIM,
              so DMARC fails locally, but the ARC chain passes: accepted, dmarc=pass.

A third server C, which does not trust the sealer, refuses the same forward
with 550 5.7.1 (DMARC p=reject), so the override is what made the difference.
"""

from __future__ import annotations

import os
import re
import smtplib
import time
from typing import Any

import pytest

from dkim_tools import rsa_key_and_record, txt_rdata
from postillon.testing.dns_server import DnsServer
from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration

MESSAGE = (
    b"From: Bob <bob@origin.test>\r\nTo: list@fwd.test\r\nSubject: arc forward\r\n"
    b"Date: Sat, 28 Nov 2026 18:00:00 +0000\r\nMessage-ID: <arc1@origin.test>\r\n\r\n"
    b"forwarded through an alias\r\n"
)


def zones(dkim_record: str, mx_host: str) -> dict[str, Any]:
    return {
        "origin.test": {
            "@": {"TXT": '"v=spf1 ip4:127.0.0.2 -all"'},
            "_dmarc.origin.test": {"TXT": '"v=DMARC1; p=reject"'},
        },
        "fwd.test": {"arc._domainkey.fwd.test": {"TXT": dkim_record}},
        "dest.test": {"@": {"MX": "10 mx.dest.test"}, "mx.dest.test": {"A": mx_host}},
    }


def receiver(make_server: Any, dns: DnsServer, host: str, port: int, **auth: Any) -> Any:
    return make_server(
        hostname=f"mx.{host}.example",
        listen=[{"kind": "smtp", "address": f"{host}:{port}"}],
        domain=[{"name": "dest.test", "mailboxes": ["carol"]}],
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        authentication={"enabled": True, **auth},
    )


def forwarder(make_server: Any, dns: DnsServer, port: int) -> ServerProcess:
    a: ServerProcess = make_server(
        hostname="mx.fwd.example",
        domain=[{"name": "fwd.test", "mailboxes": ["postmaster"], "aliases": {"list": []}}],
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={"port": port, "connect_timeout": 2.0},
        authentication={"enabled": True},
    )
    return a


def send_from_origin(a: ServerProcess) -> None:
    host, _, port = a.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=20, source_address=("127.0.0.2", 0)) as s:
        s.ehlo("mail.origin.test")
        s.sendmail("bob@origin.test", ["list@fwd.test"], MESSAGE)


def install_key(a: ServerProcess, pem: bytes) -> None:
    keydir = a.data_dir / "dkim" / "fwd.test"
    keydir.mkdir(parents=True)
    (keydir / "arc.key").write_bytes(pem)
    (keydir / "arc.key").chmod(0o600)


def run_forward(
    make_server: Any, make_dns_server: Any, receiver_host: str, **receiver_auth: Any
) -> tuple[ServerProcess, ServerProcess]:
    pem, record_value = rsa_key_and_record()
    record = txt_rdata(record_value.decode())
    dns: DnsServer = make_dns_server(zones(record, receiver_host))
    port = 25 if os.geteuid() == 0 else free_port(receiver_host)
    b = receiver(make_server, dns, receiver_host, port, **receiver_auth)
    a = forwarder(make_server, dns, port)
    a.config["domain"][0]["aliases"] = {"list": ["carol@dest.test"]}
    install_key(a, pem)
    b.start()
    a.start()
    send_from_origin(a)
    return a, b


def test_arc_keeps_dmarc_passing_at_the_next_hop(make_server: Any, make_dns_server: Any) -> None:
    a, b = run_forward(make_server, make_dns_server, "127.0.0.3", arc_trusted_sealers=["fwd.test"])
    [path] = b.wait_for_mail("carol@dest.test")
    text = path.read_text()
    unfolded = re.sub(r"\r?\n[ \t]+", " ", text)
    # A's own verdict, sealed into the ARC set it added.
    assert "ARC-Seal: i=1;" in unfolded and "cv=none" in unfolded and "d=fwd.test" in unfolded
    assert re.search(r"ARC-Authentication-Results: i=1; mx\.fwd\.example;.*dmarc=pass", unfolded)
    assert "Authentication-Results: mx.fwd.example;" in unfolded
    # B's verdict: SPF fails after forwarding, the chain passes, DMARC passes thanks to it.
    ours = re.search(r"^Authentication-Results: mx\.127\.0\.0\.3\.example;(.*)$", unfolded, re.M)
    assert ours is not None, text
    results = ours.group(1)
    assert "spf=fail" in results and "smtp.mailfrom=bob@origin.test" in results
    assert "arc=pass" in results and "d=fwd.test" in results
    assert "dmarc=pass (arc override: sealed by fwd.test" in results
    assert "authentication: results=(spf=pass" in a.maillog()


def test_without_trusting_the_sealer_dmarc_reject_applies(
    make_server: Any, make_dns_server: Any
) -> None:
    _a, c = run_forward(make_server, make_dns_server, "127.0.0.4")
    log = ""
    for _ in range(400):
        log = c.maillog()
        if "rejected" in log:
            break
        time.sleep(0.05)
    assert "arc=pass" in log and "dmarc=fail" in log, log
    assert "550 5.7.1 Message rejected per DMARC policy of origin.test" in log
    assert not c.maildir_messages("carol@dest.test")
