"""Outbound delivery end to end: postillon A relays over SMTP to postillon B,
found through MX records served by a DNS server on loopback.

    smtplib ──▶ A (trusted client) ──DNS MX──▶ 127.0.0.2 (down) ──▶ 127.0.0.3 = B ──▶ Maildir
                 │ bounces (RFC 3464) back into A's local mailboxes
"""

from __future__ import annotations

import email
import os
import smtplib
import time
from typing import Any

import pytest

from postillon.testing.dns_server import DnsServer
from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration

MESSAGE = b"From: alice@example.org\r\nSubject: outbound\r\n\r\nhello remote\r\n.dot line\r\n"


def zones(port_b_host: str = "127.0.0.3") -> dict[str, Any]:
    return {
        "remote.test": {
            "@": {"MX": ["10 mx1.remote.test", "20 mx2.remote.test"]},
            "mx1.remote.test": {"A": "127.0.0.2"},  # nothing listens there
            "mx2.remote.test": {"A": port_b_host},
        },
        "nullmx.test": {"@": {"MX": "0 ."}},
        # faß.de in IDNA 2008 / UTS 46; IDNA 2003 would ask for fass.de, served to catch it.
        "xn--fa-hia.de": {"@": {"MX": "10 mx2.remote.test"}},
        "fass.de": {"@": {"MX": "10 mx1.remote.test"}},
        "implicit.test": {"@": {"A": "127.0.0.3"}},
        "broken.test": {"@": {"A": "127.0.0.9"}},
    }


@pytest.fixture
def pair(make_server, make_dns_server):  # type: ignore[no-untyped-def]
    """A relays for 127.0.0.0/8; B is the MX of remote.test on 127.0.0.3."""
    dns: DnsServer = make_dns_server(zones())
    # As root (CI) B is a real "host" 127.0.0.3 on port 25 and A uses the
    # standard port; otherwise both agree on a free port via [outbound] port.
    port = 25 if os.geteuid() == 0 else free_port("127.0.0.3")
    b = make_server(
        listen=[{"kind": "smtp", "address": f"127.0.0.3:{port}"}],
        domain=[
            {"name": "remote.test", "mailboxes": ["bob", "carol"]},
            {"name": "implicit.test", "mailboxes": ["dave"]},
            {"name": "faß.de", "mailboxes": ["user"]},
        ],
    )
    a = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={"port": port, "connect_timeout": 2.0},
    )
    b.start()
    a.start()
    return a, b, dns


def send(server: ServerProcess, rcpts: list[str], sender: str = "alice@example.org") -> str:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.ehlo("client.test")
        s.mail(sender)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, msg = s.data(MESSAGE)
    assert code == 250
    return msg.decode().rsplit(" ", 1)[1]


def wait_log(server: ServerProcess, needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.maillog()
        if needle in log:
            return log
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in log:\n{server.maillog()[-3000:]}")


def test_mx_order_fallback_and_opportunistic_tls(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = pair
    qid = send(a, ["bob@remote.test", "carol@remote.test"])
    (path,) = b.wait_for_mail("bob@remote.test")
    b.wait_for_mail("carol@remote.test")
    content = path.read_bytes()
    assert b"hello remote\n.dot line\n" in content
    assert b"with ESMTPS id" in content  # A used STARTTLS to B
    log = wait_log(a, f"{qid}: delivered: to=<carol@remote.test>")
    assert "relay=(mx2.remote.test[127.0.0.3]" in log and "tls=TLSv1.3/unverified" in log
    # both recipients travelled in one transaction: B logged one message
    assert b.maillog().count("received:") == 1


def test_idn_domain_is_routed_by_the_mx_of_its_idna_2008_a_label(pair) -> None:  # type: ignore[no-untyped-def]
    """smtplib ─SMTPUTF8─▶ A ──DNS MX xn--fa-hia.de (not fass.de)──▶ B (faß.de) ──▶ Maildir"""
    a, b, dns = pair
    host, _, port = a.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("alice@example.org", ["SMTPUTF8"])[0] == 250
        assert s.rcpt("user@faß.de")[0] == 250
        code, msg = s.data(MESSAGE)
    assert code == 250
    qid = msg.decode().rsplit(" ", 1)[1]
    wait_log(a, f"{qid}: delivered: to=<user@faß.de>")
    assert dns.query_count("xn--fa-hia.de", "MX") >= 1
    assert dns.query_count("fass.de") == 0
    assert b.maillog().count("received:") == 1


def test_implicit_mx_from_a_record(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = pair
    send(a, ["dave@implicit.test"])
    b.wait_for_mail("dave@implicit.test")


def _bounce_for(a: ServerProcess, qid: str) -> email.message.Message:
    wait_log(a, f"{qid}: bounce:")
    (path,) = a.wait_for_mail("alice@example.org")
    return email.message_from_bytes(path.read_bytes())


def test_null_mx_bounces_at_once(pair) -> None:  # type: ignore[no-untyped-def]
    a, _, _ = pair
    qid = send(a, ["someone@nullmx.test"])
    dsn = _bounce_for(a, qid)
    assert dsn.get_content_type() == "multipart/report"
    report = dsn.get_payload()[1].get_payload()[1]  # type: ignore[index, union-attr]
    assert report["Status"] == "5.1.10"
    assert report["Action"] == "failed"
    assert a.cli("queue", "list", "--json").stdout.strip() == "[]"


def test_remote_rejection_bounces_with_remote_reply(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = pair
    # B knows bob, not nobody: B refuses at RCPT, A bounces with B's reply.
    qid = send(a, ["bob@remote.test", "nobody@remote.test"])
    b.wait_for_mail("bob@remote.test")
    dsn = _bounce_for(a, qid)
    text = dsn.as_string()
    assert "Final-Recipient: rfc822; nobody@remote.test" in text
    assert "Remote-MTA: dns; mx2.remote.test[127.0.0.3]" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1" in text
    assert "bob@remote.test" not in text.split("message/delivery-status")[1].split("--")[0]


def test_unreachable_is_deferred_then_flushed_when_back(pair) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = pair
    b.stop()
    qid = send(a, ["bob@remote.test"])
    wait_log(a, f"{qid}: deferred: to=<bob@remote.test>")
    shown = a.cli("queue", "show", qid, "--json").stdout
    assert '"state": "deferred"' in shown and "4.4.1" in shown
    b.start()
    a.cli("queue", "flush")
    b.wait_for_mail("bob@remote.test", timeout=30)
    wait_log(a, f"{qid}: delivered: to=<bob@remote.test>")


def test_dns_failure_is_temporary(pair) -> None:  # type: ignore[no-untyped-def]
    a, _, dns = pair
    dns.set_failure("remote.test", "servfail")
    qid = send(a, ["bob@remote.test"])
    log = wait_log(a, f"{qid}: deferred: to=<bob@remote.test>")
    assert "4.4.3" in log
    assert a.maildir_messages("alice@example.org") == []  # never a bounce for a DNS hiccup
