"""The receiving core end to end, with Python's smtplib as the client.

smtplib ──SMTP──▶ postillon serve ──▶ SQLite queue ──▶ runner ──▶ Maildir
"""

from __future__ import annotations

import smtplib
import ssl

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration

MESSAGE = (
    "From: Carol <carol@sender.test>\r\n"
    "To: Alice <alice@example.org>\r\n"
    "Subject: hello\r\n"
    "Message-ID: <1@sender.test>\r\n"
    "\r\n"
    "Hi Alice,\r\n"
    ".leading dot line\r\n"
    "bye\r\n"
)


def smtp(server: ServerProcess) -> smtplib.SMTP:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return smtplib.SMTP(host, int(port), timeout=10)


def test_message_reaches_maildir_with_trace_headers(server: ServerProcess) -> None:
    with smtp(server) as s:
        s.ehlo("client.sender.test")
        assert s.has_extn("pipelining") and s.has_extn("chunking") and s.has_extn("size")
        assert s.has_extn("starttls") and s.has_extn("enhancedstatuscodes")
        s.sendmail("carol@sender.test", ["alice@example.org"], MESSAGE)
    (path,) = server.wait_for_mail("alice@example.org")
    content = path.read_bytes()
    assert content.startswith(
        b"Return-Path: <carol@sender.test>\nDelivered-To: alice@example.org\n"
    )
    assert b"Received: from client.sender.test (unknown [127.0.0.1])" in content
    assert b"by mx.test.example (postillon) with ESMTP id " in content
    assert b"\n.leading dot line\n" in content  # dot-unstuffed, LF line endings in Maildir
    assert b"\r" not in content
    log = server.wait_for_log("delivered: to=<alice@example.org>")
    assert "received: from=<carol@sender.test>" in log
    assert "delivered: to=<alice@example.org>" in log


def test_unknown_local_user_is_refused_at_rcpt(server: ServerProcess) -> None:
    with smtp(server) as s:
        s.ehlo("client.test")
        s.mail("carol@sender.test")
        code, msg = s.rcpt("nobody@example.org")
        assert code == 550 and msg.startswith(b"5.1.1")


@pytest.mark.parametrize(
    "recipient",
    [
        "victim@elsewhere.test",
        "victim%elsewhere.test@example.org",
        "elsewhere.test!victim@example.org",
        '"victim@elsewhere.test"@example.org',
        "@example.org:victim@elsewhere.test",
    ],
)
def test_no_open_relay(server: ServerProcess, recipient: str) -> None:
    with smtp(server) as s:
        s.ehlo("client.test")
        s.mail("spammer@sender.test")
        # docmd, not rcpt(): smtplib rewrites unusual addresses before sending.
        code, msg = s.docmd(f"RCPT TO:<{recipient}>")
        assert code in (550, 554), (code, msg)
        assert msg[:5] in (b"5.7.1", b"5.1.1")


def test_double_at_is_a_syntax_error(server: ServerProcess) -> None:
    with smtp(server) as s:
        s.ehlo("client.test")
        s.mail("spammer@sender.test")
        code, _ = s.docmd("RCPT TO:<victim@elsewhere.test@example.org>")
        assert code == 501


def test_trusted_network_may_relay(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(relay={"trusted_networks": ["127.0.0.0/8"]}).start()
    with smtp(server) as s:
        s.ehlo("client.test")
        s.mail("carol@sender.test")
        code, _ = s.rcpt("friend@elsewhere.test")
        assert code == 250


def test_alias_catch_all_and_subaddress(server: ServerProcess) -> None:
    with smtp(server) as s:
        s.sendmail("carol@sender.test", ["team@example.org"], MESSAGE)
        s.sendmail("carol@sender.test", ["whoever@catchall.test"], MESSAGE)
        s.sendmail("carol@sender.test", ["bob+news@example.org"], MESSAGE)
    server.wait_for_mail("alice@example.org")
    server.wait_for_mail("bob@example.org", count=2)
    server.wait_for_mail("info@catchall.test")


def test_starttls_then_deliver(server: ServerProcess) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtp(server) as s:
        s.ehlo("client.test")
        s.starttls(context=ctx)
        s.ehlo("client.test")
        assert not s.has_extn("starttls")
        s.sendmail("carol@sender.test", ["alice@example.org"], MESSAGE)
    (path,) = server.wait_for_mail("alice@example.org")
    content = path.read_bytes()
    assert b"with ESMTPS id" in content
    assert b"(using TLSv1.3" in content or b"(using TLSv1.2" in content


def test_size_limit_at_mail_and_during_data(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(limits={"message_size": 2000}).start()
    with smtp(server) as s:
        s.ehlo("client.test")
        assert s.esmtp_features["size"] == "2000"
        code, msg = s.docmd("MAIL FROM:<carol@sender.test> SIZE=5000")
        assert code == 552 and msg.startswith(b"5.3.4")
        s.rset()
        # Without a SIZE parameter the limit is enforced while the data arrives.
        assert s.mail("carol@sender.test")[0] == 250
        assert s.rcpt("alice@example.org")[0] == 250
        code, msg = s.data(MESSAGE + "x" * 3000 + "\r\n")
        assert code == 552 and msg.startswith(b"5.3.4")
        # the session is still usable afterwards
        s.sendmail("carol@sender.test", ["alice@example.org"], MESSAGE)
    server.wait_for_mail("alice@example.org", count=1)


def test_too_many_recipients(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(limits={"recipients": 100}).start()
    with smtp(server) as s:
        s.ehlo("client.test")
        s.mail("carol@sender.test")
        for _ in range(100):
            assert s.rcpt("alice@example.org")[0] == 250
        code, msg = s.rcpt("alice@example.org")
        assert code == 452 and msg.startswith(b"4.5.3")


def test_null_sender_and_postmaster(server: ServerProcess) -> None:
    with smtp(server) as s:
        s.ehlo("client.test")
        assert s.docmd("MAIL FROM:<>")[0] == 250
        assert s.docmd("RCPT TO:<Postmaster>")[0] == 250
        code, _ = s.data(MESSAGE)
        assert code == 250
    (path,) = server.wait_for_mail("postmaster@example.org")
    assert path.read_bytes().startswith(b"Return-Path: <>\n")


def test_vrfy_does_not_enumerate(server: ServerProcess) -> None:
    with smtp(server) as s:
        s.ehlo("client.test")
        assert s.verify("alice@example.org")[0] == 252
        assert s.verify("nobody@example.org")[0] == 252


def test_lmtp_listener_answers_per_recipient(make_server) -> None:  # type: ignore[no-untyped-def]
    from support.ports import free_port

    port = free_port()
    server = make_server(listen=[{"kind": "lmtp", "address": f"127.0.0.1:{port}"}]).start()
    with smtplib.LMTP("127.0.0.1", port, local_hostname="mda-client.test") as s:
        s.ehlo_or_helo_if_needed()
        assert s.docmd("MAIL FROM:<carol@sender.test>")[0] == 250
        assert s.docmd("RCPT TO:<alice@example.org>")[0] == 250
        assert s.docmd("RCPT TO:<bob@example.org>")[0] == 250
        assert s.docmd("DATA")[0] == 354
        s.send(MESSAGE.encode() + b".\r\n")
        first, second = s.getreply(), s.getreply()  # RFC 2033: one reply per recipient
        assert first[0] == 250 and second[0] == 250
    server.wait_for_mail("alice@example.org")
    (path,) = server.wait_for_mail("bob@example.org")
    assert b"with LMTP id" in path.read_bytes()
