"""SMTPUTF8 without needless bounces (RFC 6531 §3.2), against a real Postfix
with ``smtputf8_enable = no`` (it offers no SMTPUTF8 and refuses the keyword):

    smtplib ─MAIL SMTPUTF8─▶ postillon ──MX bücher.test = xn--bcher-kva.test──▶ Postfix
      user@xn--bcher-kva.test (flag, all ASCII)   → delivered, MAIL without SMTPUTF8
      user@bücher.test (U-label domain)           → delivered as user@xn--bcher-kva.test
      jürgen@bücher.test (non-ASCII local part)   → 550 5.6.7, never sent; an RFC 6533
                                                    notice (global-delivery-status) to alice
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from typing import Any

import pytest

from support.postfix import PostfixInstance
from support.server import ServerProcess

pytestmark = pytest.mark.integration

PF_ADDRESS = "127.0.0.4"
A_LABEL = "xn--bcher-kva.test"  # bücher.test in IDNA 2008
MESSAGE = "From: alice@example.org\r\nSubject: Grüße\r\n\r\nhallo\r\n".encode()


@pytest.fixture
def relay_to_postfix(
    make_server: Any, make_dns_server: Any, make_postfix: Any
) -> tuple[ServerProcess, PostfixInstance]:
    pf: PostfixInstance = make_postfix(
        address=PF_ADDRESS,
        domain=A_LABEL,
        mailboxes=["user", "postmaster"],
        main_cf={"smtputf8_enable": "no"},
    )
    dns = make_dns_server(
        {A_LABEL: {"@": {"MX": f"10 mx.{A_LABEL}"}, f"mx.{A_LABEL}": {"A": PF_ADDRESS}}}
    )
    server: ServerProcess = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        outbound={"port": pf.port, "connect_timeout": 2.0, "idle_reuse": 0},
    )
    return server.start(), pf


def send_utf8(server: ServerProcess, rcpts: list[str]) -> str:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("alice@example.org", ["SMTPUTF8", "BODY=8BITMIME"])[0] == 250
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_ascii_envelope_and_u_label_domains_reach_a_server_without_smtputf8(
    relay_to_postfix: tuple[ServerProcess, PostfixInstance],
) -> None:
    server, pf = relay_to_postfix
    qid = send_utf8(server, [f"user@{A_LABEL}", "user@bücher.test", "jürgen@bücher.test"])
    # Both deliverable recipients arrive, in A-labels, though the message carries
    # the SMTPUTF8 flag (Postfix refuses the keyword: 555 would defer them).
    for raw in pf.wait_for_messages("user", count=2):
        assert "Grüße".encode() in raw
    assert pf.log().count(f"to=<user@{A_LABEL}>") == 2
    assert server.maillog().count(f"{qid}: delivered:") == 2
    bounce_line = server.wait_outcome(qid, ("bounced",))
    assert "to=<jürgen@bücher.test>" in bounce_line and "SMTPUTF8 not supported" in bounce_line

    (path,) = server.wait_for_mail("alice@example.org")
    dsn = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "global-delivery-status"
    text = path.read_bytes().decode()
    assert "Content-Type: message/global-delivery-status" in text
    assert "Final-Recipient: utf-8; jürgen@bücher.test" in text
    assert "Status: 5.6.7" in text
    assert "Content-Type: message/global" in text
    # Postfix never heard of the non-ASCII local part.
    assert "jürgen" not in pf.log() and "j\\303\\274rgen" not in pf.log()
