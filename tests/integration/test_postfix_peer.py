"""Interoperability with a real Postfix MTA, both ways, over loopback only.

Postfix runs as a private instance (``tests/support/postfix.py``, fixtures in
``tests/support/postfix_fixtures.py``): SMTP on 127.0.0.4:25 with STARTTLS (self-signed
certificate), Maildir delivery for ``pf.test``, relaying to postillon only for the domains a
test routes there (``transport_maps``), and no DNS at all. postillon finds Postfix through an
MX record served by the test DNS server (``make_dns_server``), so its real MX path is exercised.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from postillon.testing.dns_server import DnsServer
from support.postfix import PostfixInstance, smtp_route
from support.server import ServerProcess

pytestmark = pytest.mark.integration

PF_HOST = "mx.pf.test"
PF_ADDRESS = "127.0.0.4"
ZONES: dict[str, Any] = {
    "pf.test": {"@": {"MX": f"10 {PF_HOST}"}, PF_HOST: {"A": PF_ADDRESS}},
}
MAILBOXES = ("user", "sender", "busy", "postmaster")
# What Postfix's access table answers at RCPT for busy@pf.test, and how smtpd words it.
BUSY_ACTION = "450 4.2.0 Mailbox busy, try again later"
BUSY_REPLY = "450 4.2.0 <busy@pf.test>: Recipient address rejected: Mailbox busy, try again later"
MESSAGE = (
    b"From: alice@example.org\r\n"
    b"To: someone@example.net\r\n"
    b"Subject: postfix interop\r\n"
    b"\r\n"
    b"hello postfix\r\n"
    b".a line starting with a dot\r\n"
)
BODY_AS_STORED = b"hello postfix\n.a line starting with a dot\n"  # both store LF endings


def smtp_address(server: ServerProcess) -> tuple[str, int]:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return host, int(port)


def send_via_postillon(server: ServerProcess, rcpts: list[str]) -> str:
    """Submit MESSAGE from alice@example.org with smtplib; return postillon's queue id."""
    with smtplib.SMTP(*smtp_address(server), timeout=10) as client:
        client.ehlo("client.test")
        client.mail("alice@example.org")
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250, rcpt
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def wait_log(server: ServerProcess, needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = server.maillog()
        if needle in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in postillon's log:\n{server.maillog()[-3000:]}")


def queue_show(server: ServerProcess, queue_id: str) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(server.cli("queue", "show", queue_id, "--json").stdout)
    return shown


def received_headers(raw: bytes) -> list[str]:
    """The message's Received: headers, newest first, unfolded."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return [re.sub(r"\s+", " ", h) for h in msg.get_all("Received") or []]


@pytest.fixture
def postillon_to_postfix(make_server, make_dns_server, make_postfix):  # type: ignore[no-untyped-def]
    """A started Postfix (pf.test) and a started postillon that relays for loopback clients
    and finds pf.test's MX (mx.pf.test = 127.0.0.4) through the test DNS server."""
    pf: PostfixInstance = make_postfix(
        address=PF_ADDRESS, mailboxes=MAILBOXES, recipient_access={"busy@pf.test": BUSY_ACTION}
    )
    dns: DnsServer = make_dns_server(ZONES)
    server: ServerProcess = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        # Postfix listens on port 25 (root); no connection reuse, so postillon's QUIT
        # comes at once and Postfix logs the session's command counts.
        outbound={"port": pf.port, "connect_timeout": 2.0, "idle_reuse": 0},
        # A deferred recipient stays deferred while the test looks at it.
        queue={"first_retry": 60.0, "max_retry": 120.0},
    )
    return server.start(), pf


@pytest.fixture
def postfix_to_postillon(make_server, make_postfix):  # type: ignore[no-untyped-def]
    """A started postillon (local domain example.org: alice, bob, postmaster) and a started
    Postfix whose transport_maps send example.org to it: smtp:[127.0.0.1]:PORT."""
    server: ServerProcess = make_server()
    pf: PostfixInstance = make_postfix(
        address=PF_ADDRESS,
        mailboxes=MAILBOXES,
        transports={"example.org": smtp_route(*smtp_address(server))},
    )
    return server.start(), pf


# ---------------------------------------------------------------- postillon → Postfix


def test_postillon_delivers_to_postfix_over_starttls(postillon_to_postfix) -> None:  # type: ignore[no-untyped-def]
    """
    smtplib ──▶ postillon 127.0.0.1 (trusted client)
      ──DNS: MX pf.test → mx.pf.test, A 127.0.0.4──▶ Postfix smtpd 127.0.0.4:25
        (postillon: EHLO, STARTTLS, EHLO, MAIL, RCPT, BDAT LAST, QUIT)
      ──virtual(8)──▶ <postfix tmp>/mail/pf.test/user/new/
    """
    server, pf = postillon_to_postfix
    qid = send_via_postillon(server, ["user@pf.test"])

    (raw,) = pf.wait_for_messages("user")
    assert raw.endswith(BODY_AS_STORED)
    postfix_received, our_received = received_headers(raw)
    # Postfix's header (smtpd_tls_received_header) says postillon came over TLS ...
    assert "by postfix.pf.test (Postfix) with ESMTPS" in postfix_received
    assert "(using TLSv1.3 with cipher" in postfix_received
    assert postfix_received.startswith("from mx.test.example (unknown [127.0.0.1])")
    # ... below ours, from the smtplib client.
    assert f"by mx.test.example (postillon) with ESMTP id {qid}" in our_received

    log = pf.wait_log(re.compile(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=2 starttls=1"))
    assert "Anonymous TLS connection established from unknown[127.0.0.1]: TLSv1.3" in log
    # postillon used CHUNKING, which Postfix's smtpd offers: one BDAT LAST, no DATA.
    session = re.search(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=2 starttls=1 .*", log)
    assert session is not None
    assert session.group(0).endswith("mail=1 rcpt=1 bdat=1 quit=1 commands=7"), session.group(0)
    assert "status=sent (delivered to maildir)" in pf.wait_log("status=sent")

    mine = wait_log(server, f"{qid}: delivered: to=<user@pf.test>")
    delivered = next(line for line in mine.splitlines() if f"{qid}: delivered:" in line)
    relay = f"relay=({PF_HOST}[{PF_ADDRESS}]:{pf.port} tls=TLSv1.3/unverified"
    assert f"{relay} policy=opportunistic)" in delivered
    assert "status=250 2.0.0" in delivered and "bytes queued as" in delivered  # BDAT's reply
    assert server.cli("queue", "list", "--json").stdout.strip() == "[]"


def test_postfix_rejection_makes_postillon_bounce(postillon_to_postfix) -> None:  # type: ignore[no-untyped-def]
    """
    smtplib ──▶ postillon ──MX──▶ Postfix: RCPT nobody@pf.test → 550 5.1.1 (not a mailbox)
      postillon ──DSN (Postfix's reply, Remote-MTA)──▶ its own Maildir alice@example.org
    """
    server, pf = postillon_to_postfix
    qid = send_via_postillon(server, ["user@pf.test", "nobody@pf.test"])
    pf.wait_for_messages("user")

    wait_log(server, f"{qid}: bounce:")
    (path,) = server.wait_for_mail("alice@example.org")
    dsn = email.message_from_bytes(path.read_bytes())
    assert dsn.get_content_type() == "multipart/report"
    text = dsn.as_string()
    assert "Final-Recipient: rfc822; nobody@pf.test" in text
    assert f"Remote-MTA: dns; {PF_HOST}[{PF_ADDRESS}]" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 <nobody@pf.test>: Recipient address rejected" in text
    pf.wait_log("reject: RCPT from unknown[127.0.0.1]: 550 5.1.1 <nobody@pf.test>")


def test_postfix_4xx_leaves_recipient_deferred_with_postfix_reply(postillon_to_postfix) -> None:  # type: ignore[no-untyped-def]
    """
    smtplib ──▶ postillon ──MX──▶ Postfix: RCPT user@pf.test → 250,
                                           RCPT busy@pf.test → 450 4.2.0 (access table)
      user ──▶ Postfix Maildir;  busy ──▶ deferred in postillon's queue, Postfix's reply kept
      Postfix stops deferring, `postillon queue flush` ──▶ busy ──▶ Postfix Maildir
    """
    server, pf = postillon_to_postfix
    qid = send_via_postillon(server, ["user@pf.test", "busy@pf.test"])

    pf.wait_for_messages("user")
    log = wait_log(server, f"{qid}: deferred: to=<busy@pf.test>")
    deferred = next(line for line in log.splitlines() if f"{qid}: deferred:" in line)
    relay = f"relay=({PF_HOST}[{PF_ADDRESS}]:{pf.port} tls=TLSv1.3/unverified"
    assert f"{relay} policy=opportunistic)" in deferred
    code, _, text = BUSY_REPLY.partition(" <")
    assert f"status={code}, reply=(<{text})" in deferred
    shown = queue_show(server, qid)
    states = {r["recipient"]: r for r in shown["recipients"]}
    busy = states["busy@pf.test"]
    assert busy["state"] == "deferred", shown
    assert busy["attempts"] == 1
    assert busy["last_reply"] == BUSY_REPLY
    assert busy["next_try"]
    assert states["user@pf.test"]["state"] == "delivered"
    assert states["user@pf.test"]["last_reply"].startswith("250 2.0.0 Ok: ")
    pf.wait_log(f"reject: RCPT from unknown[127.0.0.1]: {BUSY_REPLY}")
    assert pf.messages("busy") == []

    # The mailbox is free again: the retry (forced by `queue flush`) gets through.
    pf.set_recipient_access({})
    server.cli("queue", "flush")
    (raw,) = pf.wait_for_messages("busy")
    assert raw.endswith(BODY_AS_STORED)
    wait_log(server, f"{qid}: delivered: to=<busy@pf.test>")


# ---------------------------------------------------------------- Postfix → postillon


def test_postfix_relays_to_postillon_with_starttls_and_pipelining(postfix_to_postillon) -> None:  # type: ignore[no-untyped-def]
    """
    smtplib ──▶ Postfix smtpd 127.0.0.4:25
      ──transport_maps: example.org → smtp:[127.0.0.1]:P──▶ postillon 127.0.0.1:P
        (Postfix's smtp client: EHLO, STARTTLS, EHLO, then MAIL+RCPT+DATA pipelined)
      ──▶ <postillon var>/mail/example.org/alice/new/
    """
    server, pf = postfix_to_postillon
    pf_id = pf.send("sender@pf.test", ["alice@example.org"], MESSAGE)

    (path,) = server.wait_for_mail("alice@example.org")
    raw = path.read_bytes()
    assert raw.endswith(BODY_AS_STORED)
    ours, postfix_received = received_headers(raw)
    assert ours.startswith("from postfix.pf.test (unknown [127.0.0.1]) (using TLSv1.3")
    assert "by mx.test.example (postillon) with ESMTPS id" in ours
    assert f"by postfix.pf.test (Postfix) with ESMTP id {pf_id}" in postfix_received
    mine = server.maillog()
    assert "received: from=<sender@pf.test>" in mine and "proto=ESMTPS" in mine

    log = pf.wait_log(f"{pf_id}: to=<alice@example.org>, relay=127.0.0.1[127.0.0.1]")
    port = smtp_address(server)[1]
    peer = f"127.0.0.1[127.0.0.1]:{port}"
    assert f"Untrusted TLS connection established to {peer}: TLSv1.3" in log
    sent = re.search(rf"{pf_id}: to=<alice@example.org>, .*status=sent \(250 2\.0\.0 .*\)", log)
    assert sent is not None, log
    # The client's side of the dialogue (debug_peer_list): it saw our extensions and
    # pipelined MAIL, RCPT and DATA (all three sent before the first reply came back).
    dialogue = [line.split(f"{peer}: ", 1)[1] for line in log.splitlines() if f"{peer}: " in line]
    assert "250-CHUNKING" in dialogue and "250 STARTTLS" in dialogue
    assert "Using ESMTP PIPELINING" in log
    after_tls = dialogue[dialogue.index("220 2.0.0 Ready to start TLS") + 1 :]
    commands = [line for line in after_tls if line.startswith(("MAIL", "RCPT", "DATA", "BDAT"))]
    first_reply = next(i for i, line in enumerate(after_tls) if line.startswith("250 2.1.0"))
    assert commands[0].startswith("MAIL FROM:<sender@pf.test>")
    assert commands[1].startswith("RCPT TO:<alice@example.org>")
    assert after_tls.index(commands[-1]) < first_reply, after_tls  # pipelined
    # Postfix 3.7's SMTP client sends DATA even to a server offering CHUNKING (BDAT is in
    # its smtpd only), so this direction does not exercise postillon's BDAT receiving.
    assert commands[-1] == "DATA" or commands[-1].startswith("BDAT "), commands


def test_postfix_bounces_mail_for_unknown_postillon_user(postfix_to_postillon) -> None:  # type: ignore[no-untyped-def]
    """
    smtplib ──▶ Postfix ──smtp:[127.0.0.1]:P──▶ postillon: RCPT nobody@example.org → 550 5.1.1
      Postfix ──bounce (postillon's reply)──▶ its own Maildir sender@pf.test
    """
    server, pf = postfix_to_postillon
    pf_id = pf.send("sender@pf.test", ["nobody@example.org"], MESSAGE)

    log = pf.wait_log(f"{pf_id}: to=<nobody@example.org>")
    line = next(x for x in log.splitlines() if f"{pf_id}: to=<nobody@example.org>" in x)
    assert "dsn=5.1.1, status=bounced (host 127.0.0.1[127.0.0.1] said: 550 5.1.1" in line
    assert "(in reply to RCPT TO command)" in line
    (bounce,) = pf.wait_for_messages("sender")
    report = email.message_from_bytes(bounce)
    assert report.get_content_type() == "multipart/report"
    assert report["From"] == "Mail Delivery System <MAILER-DAEMON@postfix.pf.test>"
    text = report.as_string()
    assert "Final-Recipient: rfc822; nobody@example.org" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1" in text
    assert list(server.iter_all_mail()) == []
    assert "rejected: from=<sender@pf.test>, to=<nobody@example.org>, reason=(550 5.1.1" in (
        server.maillog()
    )


# ---------------------------------------------------------------- the instance itself


def test_postfix_instance_is_loopback_only_and_leaves_nothing(make_postfix) -> None:  # type: ignore[no-untyped-def]
    """PostfixInstance: `postfix check` is clean, only 127.0.0.4:25 listens, and stop()
    leaves no process and no directory behind."""
    pf: PostfixInstance = make_postfix(address=PF_ADDRESS)
    assert pf.check_output == ""
    directory = pf.directory
    assert isinstance(directory, Path)
    pids = pf.processes()
    assert pf.master_pid in pids
    listening = subprocess.run(
        ["ss", "-Hltnup"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    ours = [line for line in listening if any(f"pid={pid}," in line for pid in pids)]
    assert len(ours) == 1, ours
    assert f" {PF_ADDRESS}:{pf.port} " in ours[0]

    pf.stop()
    assert pf.processes() == []
    assert not directory.exists()
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split(") ", 1)[1].startswith("Z"), pid
