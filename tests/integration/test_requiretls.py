"""REQUIRETLS (RFC 8689) end to end, with real servers on both sides.

    smtplib ─STARTTLS, MAIL ... REQUIRETLS─▶ A (postillon) ─DNS MX (test server)─┐
      ├─ bob@rtls.test      ─▶ b.mx.test    127.0.0.2  B: postillon, CA-issued, offers REQUIRETLS
      ├─ bob@norequire.test ─▶ rec.mx.test  127.0.0.3  RecordingSmtp, CA-issued, no REQUIRETLS
      └─ bob@self.test      ─▶ self.mx.test 127.0.0.4  RecordingSmtp, self-signed
    A trusts the test CA as its system CAs (SSL_CERT_FILE): that is "WebPKI-valid" here.
    Bounces go to alice@sender.test, whose MX is rec.mx.test (no REQUIRETLS).

A REQUIRETLS message is delivered to B with REQUIRETLS on MAIL, and bounced
(5.7.30 / 5.7.10) toward the others, which never hear MAIL; the bounce itself
is queued with REQUIRETLS, headers only, and (§5) kept, not dropped, when its
own next hop lacks REQUIRETLS. TLS-Required: No goes out opportunistically to
the self-signed host despite a verify policy. REQUIRETLS before STARTTLS: 530.
"""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from support.ports import free_port
from support.recording_smtp import RecordingSmtp
from support.server import ServerProcess
from support.tls_certs import ca_issued, self_signed

pytestmark = pytest.mark.integration


@pytest.fixture
def world(make_server, make_dns_server, tmp_path: Path) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    port = free_port("127.0.0.2")
    b_cert = ca.issue_cert("b.mx.test")
    b_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "b.pem"))
    b_cert.private_key_pem.write_to_path(str(tmp_path / "b.key"))
    b = make_server(
        hostname="b.mx.test",
        listen=[{"kind": "smtp", "address": f"127.0.0.2:{port}"}],
        tls={"certificate": str(tmp_path / "b.pem"), "private_key": str(tmp_path / "b.key")},
        domain=[{"name": "rtls.test", "mailboxes": ["bob"]}],
    ).start()
    self_tls, _ = self_signed(tmp_path, "self.mx.test")
    rec = RecordingSmtp(tls=ca_issued(ca, "rec.mx.test"), host="127.0.0.3", port=port)
    rec.name = "rec.mx.test"
    selfs = RecordingSmtp(tls=self_tls, host="127.0.0.4", port=port, name="self.mx.test")
    rec.start()
    selfs.start()
    hosts = {"b": "127.0.0.2", "rec": "127.0.0.3", "self": "127.0.0.4"}
    zones: dict[str, Any] = {"mx.test": {f"{n}.mx.test": {"A": ip} for n, ip in hosts.items()}}
    for domain, host in [
        ("rtls.test", "b"),
        ("norequire.test", "rec"),
        ("sender.test", "rec"),
        ("self.test", "self"),
    ]:
        zones[domain] = {"@": {"MX": [f"10 {host}.mx.test"]}}
    dns = make_dns_server(zones)
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={"port": port, "connect_timeout": 2.0, "tls": "opportunistic"},
        tls_policy=[
            {"domain": "self.test", "policy": "verify", "ca_file": str(tmp_path / "ca.pem")}
        ],
    )
    a.env["SSL_CERT_FILE"] = str(tmp_path / "ca.pem")  # the test CA is A's "system" CA
    a.start()
    yield {"a": a, "b": b, "rec": rec, "self": selfs}
    rec.stop()
    selfs.stop()


def _client(server: ServerProcess) -> smtplib.SMTP:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return smtplib.SMTP(host, int(port), timeout=10)


def send(server: ServerProcess, rcpt: str, *, requiretls: bool = True, header: str = "") -> str:
    with _client(server) as s:
        s.ehlo("client.test")
        s.starttls(context=ssl._create_unverified_context())
        s.ehlo("client.test")
        assert s.has_extn("requiretls")  # RFC 8689 §2: offered after STARTTLS
        code, _ = s.mail("alice@sender.test", ["REQUIRETLS"] if requiretls else [])
        assert code == 250
        assert s.rcpt(rcpt)[0] == 250
        code, msg = s.data(f"{header}Subject: secret\r\n\r\nthe secret body\r\n".encode())
    assert code == 250
    return msg.decode().rsplit(" ", 1)[1]


def mails(rec: RecordingSmtp) -> list[str]:
    return [c for c in list(rec.commands) if c.upper().startswith("MAIL")]


def test_requiretls_refused_before_starttls(world: dict[str, Any]) -> None:
    with _client(world["a"]) as s:
        s.ehlo("client.test")
        assert not s.has_extn("requiretls")
        assert s.mail("alice@sender.test", ["REQUIRETLS"]) == (
            530,
            b"5.7.10 REQUIRETLS needs a TLS session (STARTTLS first)",
        )


def test_requiretls_delivered_to_capable_verified_server(world: dict[str, Any]) -> None:
    a: ServerProcess = world["a"]
    line = a.wait_outcome(send(a, "bob@rtls.test"))
    assert ": delivered:" in line, line
    assert "b.mx.test[127.0.0.2]" in line and "tls=TLSv1.3/verified" in line, line
    assert "policy=verify+requiretls" in line, line  # raised from opportunistic
    assert b"the secret body" in world["b"].wait_for_mail("bob@rtls.test")[0].read_bytes()


def test_requiretls_bounced_without_requiretls_or_verified_tls(world: dict[str, Any]) -> None:
    a: ServerProcess = world["a"]
    rec: RecordingSmtp = world["rec"]
    selfs: RecordingSmtp = world["self"]
    no_ext = a.wait_outcome(send(a, "bob@norequire.test"))
    self_signed_line = a.wait_outcome(send(a, "bob@self.test"))
    # Bounced at once (not deferred), with RFC 8689's codes; MAIL never sent.
    assert ": bounced:" in no_ext and "does not offer REQUIRETLS" in no_ext, no_ext
    assert ": bounced:" in self_signed_line and "status=550" in self_signed_line, self_signed_line
    assert "not verified" in self_signed_line, self_signed_line
    assert "STARTTLS" in selfs.commands and not mails(selfs)
    assert "STARTTLS" in rec.commands
    # The bounces: to alice@sender.test, whose MX (rec) lacks REQUIRETLS. They are
    # queued with REQUIRETLS and, being bounces, kept and retried (§5), not dropped.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        exported = a.cli("queue", "export", "-").stdout
        notices = [m for m in map(json.loads, exported.splitlines()) if m.get("sender") == ""]
        if len(notices) == 2 and all("4.7.30" in a.maillog() for _ in notices):
            break
        time.sleep(0.2)
    assert len(notices) == 2, exported
    statuses = set()
    for notice in notices:
        assert notice["mail_params"].get("requiretls") is True, notice
        body = base64.b64decode(notice["body"])
        assert b"Subject: secret" in body and b"the secret body" not in body  # RET=HDRS
        statuses |= {s for s in ("5.7.30", "5.7.10") if f"Status: {s}".encode() in body}
    assert statuses == {"5.7.30", "5.7.10"}
    assert not any("<>" in m for m in mails(rec))  # never sent without REQUIRETLS
    deferred = [ln for ln in a.maillog().splitlines() if ": deferred:" in ln]
    assert any("to=<alice@sender.test>" in ln and "REQUIRETLS" in ln for ln in deferred), deferred


def test_tls_required_no_goes_out_opportunistically(world: dict[str, Any]) -> None:
    a: ServerProcess = world["a"]
    selfs: RecordingSmtp = world["self"]
    qid = send(a, "bob@self.test", requiretls=False, header="TLS-Required: No\r\n")
    line = a.wait_outcome(qid)
    assert ": delivered:" in line and "policy=opportunistic" in line, line
    assert [m for m in mails(selfs) if "REQUIRETLS" in m.upper()] == []
    assert b"the secret body" in selfs.wait_for_message()
