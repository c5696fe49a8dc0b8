"""Submission through the real program, as a user's mail program sees it.

postillon user add (password on stdin) ──▶ accounts.json
msmtp / smtplib ──587-style STARTTLS + AUTH──▶ postillon serve ──▶ queue ──▶ Maildir
                ──465-style implicit TLS + AUTH──▶
"""

from __future__ import annotations

import hashlib
import shutil
import smtplib
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"


@pytest.fixture
def submit_server(make_server) -> ServerProcess:  # type: ignore[no-untyped-def]
    smtp, sub, subs = free_port(), free_port(), free_port()
    server = make_server(
        listen=[
            {"kind": "smtp", "address": f"127.0.0.1:{smtp}"},
            {"kind": "submission", "address": f"127.0.0.1:{sub}"},
            {"kind": "submissions", "address": f"127.0.0.1:{subs}"},
        ],
        submission={"sender_policy": "enforce", "messages_per_hour": 5},
    )
    server.write_config()
    server.data_dir.mkdir(exist_ok=True)
    added = subprocess.run(
        [*server.cli_command(), "user", "add", "alice@example.org", "--password-stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    server.ports = {"smtp": smtp, "submission": sub, "submissions": subs}
    return server.start()


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's self-signed certificate
    return ctx


def test_msmtp_submits_with_starttls_and_auth(submit_server: ServerProcess, tmp_path) -> None:  # type: ignore[no-untyped-def]
    msmtp = shutil.which("msmtp")
    if msmtp is None:
        pytest.fail("msmtp is not installed: run `make system-deps` (Debian package msmtp)")
    for port, tls_mode in (
        (submit_server.ports["submission"], "off"),
        (submit_server.ports["submissions"], "on"),
    ):
        result = subprocess.run(
            [
                msmtp,
                "--host=127.0.0.1",
                f"--port={port}",
                "--tls=on",
                f"--tls-starttls={'off' if tls_mode == 'on' else 'on'}",
                "--tls-certcheck=off",
                "--auth=plain",
                "--user=alice@example.org",
                "--passwordeval=cat " + str(_pwfile(tmp_path)),
                "--from=alice@example.org",
                "--domain=laptop.test",
                "bob@example.org",
            ],
            input=b"From: alice@example.org\nTo: bob@example.org\nSubject: from msmtp\n\nhi\n",
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr.decode()
    paths = submit_server.wait_for_mail("bob@example.org", count=2)
    content = paths[0].read_bytes()
    assert b"with ESMTPSA id" in content
    assert b"127.0.0.1" not in content.split(b"\n\n")[0].split(b"Received:")[1]  # IP hidden
    assert b"Message-ID:" in content or b"Message-Id:" in content


def _pwfile(tmp_path) -> object:  # type: ignore[no-untyped-def]
    path = tmp_path / "pw"
    path.write_text(PASSWORD + "\n")
    return path


def test_mail_without_auth_is_refused_and_port_25_does_not_offer_auth(
    submit_server: ServerProcess,
) -> None:
    with smtplib.SMTP("127.0.0.1", submit_server.ports["submission"], timeout=10) as s:
        s.ehlo("laptop.test")
        assert not s.has_extn("auth")  # never before TLS
        s.starttls(context=_tls())
        s.ehlo("laptop.test")
        assert "PLAIN" in s.esmtp_features["auth"]
        code, msg = s.docmd("MAIL FROM:<alice@example.org>")
        assert code == 530 and msg.startswith(b"5.7.0")
    with smtplib.SMTP("127.0.0.1", submit_server.ports["smtp"], timeout=10) as s:
        s.ehlo("laptop.test")
        s.starttls(context=_tls())
        s.ehlo("laptop.test")
        assert not s.has_extn("auth")


def test_sender_policy_and_rate_limit(submit_server: ServerProcess) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", submit_server.ports["submissions"], timeout=10, context=_tls()
    ) as s:
        s.ehlo("laptop.test")
        s.login("alice@example.org", PASSWORD)
        code, msg = s.docmd("MAIL FROM:<ceo@example.org>")
        assert code == 553 and msg.startswith(b"5.7.1")  # not alice's address
        s.rset()
        # A forged From: header is refused at the end of data (it still
        # counts against the hourly budget: messages are counted at MAIL).
        with pytest.raises(smtplib.SMTPDataError) as err:
            s.sendmail(
                "alice@example.org",
                ["bob@example.org"],
                b"From: ceo@example.org\r\nSubject: x\r\n\r\nx\r\n",
            )
        assert err.value.smtp_code == 550
        for _ in range(4):
            s.sendmail(
                "alice@example.org",
                ["bob@example.org"],
                b"From: alice@example.org\r\nSubject: n\r\n\r\nx\r\n",
            )
        code, msg = s.docmd("MAIL FROM:<alice@example.org>")
        assert code == 450 and msg.startswith(b"4.7.1")  # 5 per hour in this config


def test_submission_adds_missing_date_and_message_id(submit_server: ServerProcess) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", submit_server.ports["submissions"], timeout=10, context=_tls()
    ) as s:
        s.ehlo("laptop.test")
        s.login("alice@example.org", PASSWORD)
        s.sendmail(
            "alice@example.org",
            ["bob@example.org"],
            b"From: alice@example.org\r\nSubject: bare\r\n\r\nbody\r\n",
        )
    with smtplib.SMTP("127.0.0.1", submit_server.ports["smtp"], timeout=10) as s:
        s.sendmail("x@sender.test", ["alice@example.org"], b"Subject: relayed\r\n\r\nbody\r\n")
    (submitted,) = submit_server.wait_for_mail("bob@example.org")
    header = submitted.read_bytes().split(b"\n\n")[0]
    assert b"\nDate: " in header and b"\nMessage-ID: <" in header
    (relayed,) = submit_server.wait_for_mail("alice@example.org")
    header = relayed.read_bytes().split(b"\n\n")[0]
    assert b"\nDate: " not in header and b"Message-ID" not in header  # MX mail is not rewritten


def test_smarthost_with_auth_through_a_submission_port(make_server) -> None:  # type: ignore[no-untyped-def]
    """postillon A relays all outside mail through B's submission port.

    smtplib ──▶ A (smarthost = smtp://alice:pw@B:587, B's key pinned) ──STARTTLS+AUTH──▶ B
                                                                          ──▶ Maildir
    """
    port = free_port("127.0.0.3")
    b = make_server(
        listen=[{"kind": "submission", "address": f"127.0.0.3:{port}"}],
        domain=[{"name": "remote.test", "mailboxes": ["bob"]}],
    )
    b.write_config()
    b.data_dir.mkdir(exist_ok=True)
    added = subprocess.run(
        [*b.cli_command(), "user", "add", "alice@example.org", "--password-stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    b.start()
    password = PASSWORD.replace(" ", "%20")
    # B's certificate is self-signed: A sends the password only because it
    # pins B's key (without the pin: no AUTH, see test_outbound_smarthost_tls).
    cert = x509.load_pem_x509_certificate((b.data_dir / "tls" / "selfsigned-cert.pem").read_bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    a = make_server(
        relay={
            "trusted_networks": ["127.0.0.0/8"],
            "smarthost": f"smtp://alice%40example.org:{password}@127.0.0.3:{port}",
            "smarthost_fingerprints": ["sha256:" + hashlib.sha256(spki).hexdigest()],
        }
    ).start()
    host, _, a_port = a.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(a_port), timeout=10) as s:
        s.sendmail(
            "alice@example.org",
            ["bob@remote.test"],
            b"From: alice@example.org\r\nSubject: via smarthost\r\n\r\nhi\r\n",
        )
    (path,) = b.wait_for_mail("bob@remote.test")
    assert b"with ESMTPSA id" in path.read_bytes()  # B saw TLS and a login from A
