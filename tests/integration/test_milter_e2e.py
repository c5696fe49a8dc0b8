"""Milters end to end: the real ``postillon serve`` with ``[[milter]]``, a real SMTP
client, real milters. rspamd's GTUBE reject reaches the client with rspamd's text; a
clean message is delivered with rspamd's headers; the reference milter's header, body
and recipient changes, discard and quarantine happen to the stored message; a milter
that is down gets its default_action."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from collections.abc import Iterator

import pytest

from support.milters import ReferenceMilter, Rspamd
from support.ports import free_port
from support.server import ServerProcess

# rspamd's first start compiles its Hyperscan databases (about 25 s here, more on a
# busy machine); later starts reuse them.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

MESSAGE = (
    b"From: Bob <bob@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <lunch-2@example.net>\r\n"
    b"Date: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
    b"X-Remove-Me: yes\r\n"
    b"X-Milter-Test: %s\r\n"
    b"\r\n"
    b"Shall we have lunch tomorrow?\r\n"
)
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def smtp_send(
    server: ServerProcess, body: bytes, rcpts: tuple[str, ...] = ("alice@example.org",)
) -> tuple[int, str]:
    """Send one message; the final reply (code, text) of the transaction."""
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=60) as client:
        client.ehlo("client.example.net")
        code, text = client.mail("bob@example.net")
        if code != 250:
            return code, text.decode()
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, text = client.data(body)
        return code, text.decode()


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    harness = Rspamd()
    try:
        harness.start()
        yield harness
    finally:
        harness.stop()


@pytest.fixture(scope="module")
def reference() -> Iterator[ReferenceMilter]:
    with ReferenceMilter() as milter:
        yield milter


def test_rspamd_rejects_gtube_and_passes_clean_mail(make_server, rspamd: Rspamd) -> None:  # type: ignore[no-untyped-def]
    server = make_server(
        milter=[{"name": "rspamd", "address": rspamd.address, "timeout": 60}]
    ).start()
    code, text = smtp_send(
        server, MESSAGE.replace(b"Shall we have lunch tomorrow?", GTUBE) % b"none"
    )
    assert (code, text) == (554, "5.7.1 Gtube pattern")
    assert not server.maildir_messages("alice@example.org")
    code, text = smtp_send(server, MESSAGE % b"none")
    assert code == 250, text
    [path] = server.wait_for_mail("alice@example.org")
    stored = path.read_bytes()
    assert b"\nX-Spamd-Result: default: False [" in stored
    assert b"\nX-Spam-Status: " in stored


def test_reference_milter_changes_the_stored_message(
    make_server, reference: ReferenceMilter
) -> None:  # type: ignore[no-untyped-def]
    server = make_server(
        milter=[{"name": "reference", "address": reference.address, "timeout": 10}]
    ).start()
    actions = b"insheader, addheader, chgheader, delheader, replbody, addrcpt, delrcpt"
    code, text = smtp_send(
        server, MESSAGE % actions, rcpts=("alice@example.org", "bob@example.org")
    )
    assert code == 250, text
    # addrcpt added added@example.org (not a mailbox here: it bounces), delrcpt removed bob.
    [path] = server.wait_for_mail("alice@example.org")
    stored = path.read_bytes()
    head, _, body = (
        stored.partition(b"\n\n") if b"\r\n\r\n" not in stored else stored.partition(b"\r\n\r\n")
    )
    assert b"X-Inserted: on top" in head
    assert b"X-Reference: added at the bottom" in head
    assert b"Subject: changed by the milter" in head
    assert b"X-Remove-Me" not in head
    assert body.strip() == b"The body was replaced."
    assert not server.maildir_messages("bob@example.org")
    # The milter saw the queue id as the `i` macro.
    record = reference.wait_records(1)[-1]
    assert record["macros"]["eom"]["i"] in text


def test_reject_discard_and_quarantine(make_server, reference: ReferenceMilter) -> None:  # type: ignore[no-untyped-def]
    server = make_server(
        milter=[{"name": "reference", "address": reference.address, "timeout": 10}]
    ).start()
    assert smtp_send(server, MESSAGE % b"reject") == (
        550,
        "5.7.1 Rejected by the reference milter (100% sure)",
    )
    code, _ = smtp_send(server, MESSAGE % b"discard")
    assert code == 250
    code, text = smtp_send(server, MESSAGE % b"quarantine")
    assert code == 250, text
    queue_id = text.rsplit(" ", 1)[1]
    log = server.wait_for_log("quarantined")
    assert f"{queue_id}: quarantined" in log
    assert not server.maildir_messages("alice@example.org")


@pytest.mark.parametrize(
    ("default_action", "code"), [("tempfail", 451), ("reject", 550), ("accept", 250)]
)
def test_milter_down_gets_default_action(make_server, default_action: str, code: int) -> None:  # type: ignore[no-untyped-def]
    server = make_server(
        milter=[
            {
                "name": "down",
                "address": f"inet:127.0.0.1:{free_port()}",
                "timeout": 1,
                "default_action": default_action,
            }
        ]
    ).start()
    got, text = smtp_send(server, MESSAGE % b"none")
    assert got == code, text


def test_submission_milter_sees_tls_and_auth_macros(
    make_server, reference: ReferenceMilter
) -> None:  # type: ignore[no-untyped-def]
    """listeners = ["submission"]: the milter sees the STARTTLS version and cipher and
    the AUTH identity; port 25 of the same server is not filtered by it."""
    smtp, sub = free_port(), free_port()
    server = make_server(
        listen=[
            {"kind": "smtp", "address": f"127.0.0.1:{smtp}"},
            {"kind": "submission", "address": f"127.0.0.1:{sub}"},
        ],
        milter=[
            {
                "name": "reference",
                "address": reference.address,
                "listeners": ["submission"],
                "timeout": 10,
            }
        ],
    )
    server.write_config()
    server.data_dir.mkdir(exist_ok=True)
    password = "correct horse battery staple"
    added = subprocess.run(
        [*server.cli_command(), "user", "add", "alice@example.org", "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    server.start()
    before = len(reference.records())
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # the server's self-signed certificate
    with smtplib.SMTP("127.0.0.1", sub, timeout=30) as client:
        client.ehlo("laptop.example.org")
        client.starttls(context=tls)
        client.ehlo("laptop.example.org")
        client.login("alice@example.org", password)
        client.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            MESSAGE.replace(b"Bob <bob@example.net>", b"<alice@example.org>") % b"addheader",
        )
    record = reference.wait_records(before + 1)[-1]
    assert record["macros"]["helo"]["{tls_version}"].startswith("TLSv1")
    assert record["macros"]["helo"]["{cipher}"]
    assert record["macros"]["envfrom"]["{auth_authen}"] == "alice@example.org"
    [path] = server.wait_for_mail("bob@example.org")
    assert b"X-Reference: added at the bottom" in path.read_bytes()
    # Port 25 of the same server: not filtered (the milter saw nothing more).
    with smtplib.SMTP("127.0.0.1", smtp, timeout=30) as client:
        client.sendmail("bob@example.net", ["alice@example.org"], MESSAGE % b"reject")
    server.wait_for_mail("alice@example.org")
    assert len(reference.records()) == before + 1
