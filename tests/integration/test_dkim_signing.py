"""DKIM signing through the real program, checked by independent verifiers.

postillon dkim keygen (rsa + ed25519) ──▶ A's <data_dir>/dkim/example.org/*.key
smtplib ──587 STARTTLS + AUTH──▶ A (signs) ──SMTP──▶ B ──▶ Maildir ─┬▶ dkimpy (fixture DNS)
sendmail ──maildrop──────────────▶ A (signs) ──SMTP──▶ B ──▶ Maildir ─┴▶ opendkim-testmsg
smtplib ──25, not authenticated──▶ A ──▶ A's Maildir                    (not signed)

and the other way round: opendkim-testmsg signs, postillon's verifier (and dkimpy) verify.
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dkim_tools import (
    dkimpy_verify_all,
    key_zone,
    listed_keys,
    opendkim_testmsg,
    postillon_verify,
    require_root_for_opendkim,
    to_crlf,
    txt_rdata,
    without_signature,
)
from postillon.testing.dns_server import DnsServer
from support.metrics import scrape, value
from support.ports import free_port, wait_until
from support.server import ServerProcess

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"
SENDMAIL = Path(sys.executable).parent / "sendmail"


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def servers(make_server: Any) -> tuple[ServerProcess, ServerProcess, list[dict[str, Any]]]:
    """B receives example.net; A signs for example.org and relays example.net to B."""
    b_port = free_port()
    b = make_server(
        listen=[{"kind": "smtp", "address": f"127.0.0.1:{b_port}"}],
        domain=[{"name": "example.net", "mailboxes": ["bob"]}],
    ).start()
    smtp, sub = free_port(), free_port()
    a = make_server(
        listen=[
            {"kind": "smtp", "address": f"127.0.0.1:{smtp}"},
            {"kind": "submission", "address": f"127.0.0.1:{sub}"},
        ],
        transport=[{"domain": "example.net", "route": f"smtp:[127.0.0.1]:{b_port}"}],
    )
    a.ports = {"smtp": smtp, "submission": sub}
    a.write_config()
    a.data_dir.mkdir(exist_ok=True)
    for args in (
        ["dkim", "keygen", "example.org", "--selector", "rsa1"],
        ["dkim", "keygen", "example.org", "--selector", "ed1", "--algorithm", "ed25519"],
    ):
        made = a.cli(*args)
        assert "._domainkey.example.org." in made.stdout
    added = subprocess.run(
        [*a.cli_command(), "user", "add", "alice@example.org", "--password-stdin"],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    keys = listed_keys(a.cli("dkim", "list", "--json").stdout)
    assert {(k["selector"], k["algorithm"]) for k in keys} == {("rsa1", "rsa"), ("ed1", "ed25519")}
    return a.start(), b, keys


def test_submitted_and_local_mail_is_signed_and_verifies(
    servers: tuple[ServerProcess, ServerProcess, list[dict[str, Any]]],
) -> None:
    a, b, keys = servers
    with smtplib.SMTP("127.0.0.1", a.ports["submission"], timeout=10) as s:
        s.starttls(context=_tls())
        s.login("alice@example.org", PASSWORD)
        s.sendmail(
            "alice@example.org",
            ["bob@example.net"],
            b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n"
            b"Subject: signed   by\r\n postillon\r\n\r\nHello  Bob, \r\n\r\n\r\n",
        )
    env = dict(os.environ, POSTILLON_CONFIG=str(a.config_path))
    sent = subprocess.run(
        [str(SENDMAIL), "-t", "-i", "-f", "alice@example.org"],
        input=b"From: alice@example.org\nTo: bob@example.net\nSubject: from cron\n\nnightly\n",
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    with smtplib.SMTP("127.0.0.1", a.ports["smtp"], timeout=10) as s:
        s.sendmail(
            "someone@example.org",  # claims our domain, but is not ours to vouch for
            ["alice@example.org"],
            b"From: someone@example.org\r\nSubject: inbound\r\n\r\nhi\r\n",
        )

    delivered = [to_crlf(p.read_bytes()) for p in b.wait_for_mail("bob@example.net", count=2)]
    zones = key_zone(keys)
    with DnsServer(zones) as dns_server:
        for message in delivered:
            header = message.split(b"\r\n\r\n")[0]
            assert header.count(b"DKIM-Signature:") == 2, header.decode()
            assert b"a=ed25519-sha256" in header and b"a=rsa-sha256" in header
            assert b"c=relaxed/relaxed" in header
            # From, Subject, To and Date are oversigned (one more than present).
            assert b"h=from:from:" in header.replace(b"\r\n\t", b"")
            assert dkimpy_verify_all(message, dns_server.nameserver) == [True, True]
            assert postillon_verify(message, dns_server.nameserver) == ["pass", "pass"]
            tampered = message.replace(b"nightly", b"NIGHTLY").replace(b"Hello", b"Jello")
            assert dkimpy_verify_all(tampered, dns_server.nameserver) == [False, False]

    (inbound,) = a.wait_for_mail("alice@example.org")
    assert b"DKIM-Signature" not in inbound.read_bytes()  # port 25, not authenticated
    signed_lines = [line for line in a.maillog().splitlines() if "dkim=" in line]
    assert len(signed_lines) == 2 and "dkim=example.org:ed1+rsa1" in signed_lines[0]

    # OpenDKIM, an independent implementation, verifies each signature on its own.
    require_root_for_opendkim()
    for message in delivered:
        for keep in (b"a=rsa-sha256", b"a=ed25519-sha256"):
            one = without_signature(message, keep)
            assert one.count(b"DKIM-Signature:") == 1
            checked = opendkim_testmsg(one, zones)
            assert checked.returncode == 0, (keep, checked.stderr.decode())
        bad = opendkim_testmsg(message.replace(b"Bob", b"Rob").replace(b"nightly", b"n"), zones)
        assert bad.returncode != 0 and b"signature" in bad.stderr.lower()


def test_mail_signed_by_opendkim_verifies_here(tmp_path: Path) -> None:
    """opendkim-genkey + opendkim-testmsg sign; postillon's verifier (checks/dkim_check.py,
    on dkimcore) and plain dkimpy verify against the record opendkim-genkey wrote, served
    by the fixture DNS.

    opendkim-testmsg can only sign a=rsa-sha1 (it has no option for sha256), so the key
    is generated to allow sha1 (h=sha1:sha256). With opendkim-genkey's default record
    (h=sha256) the key itself forbids a sha1 signature (RFC 6376 3.6.1, h=): postillon
    says permerror where dkimpy, which ignores the key's h=, says it verifies."""
    require_root_for_opendkim()
    subprocess.run(
        [
            "opendkim-genkey",
            "-b",
            "2048",
            "-d",
            "example.net",
            "-s",
            "od",
            "-D",
            str(tmp_path),
            "--hash-algorithms=sha1:sha256",
        ],
        check=True,
        timeout=60,
    )
    record = (tmp_path / "od.txt").read_text()
    value = "".join(part for i, part in enumerate(record.split('"')) if i % 2 == 1)
    assert "h=sha1:sha256;" in value
    sha256_only = value.replace("h=sha1:sha256;", "h=sha256;")
    zones = {
        "example.net": {
            "od._domainkey.example.net": {"TXT": txt_rdata(value)},
            "only256._domainkey.example.net": {"TXT": txt_rdata(sha256_only)},
        }
    }
    message = (
        b"From: Carol <carol@example.net>\r\nTo: alice@example.org\r\nSubject: from OpenDKIM\r\n"
        b"Date: Sat, 28 Nov 2026 18:00:00 +0000\r\n\r\nSigned   elsewhere.\r\n"
    )
    signed = opendkim_testmsg(
        message, zones, "-C", "-d", "example.net", "-s", "od", "-k", str(tmp_path / "od.private")
    )
    assert signed.returncode == 0, signed.stderr.decode()
    assert signed.stdout.startswith(b"DKIM-Signature:")
    assert b"a=rsa-sha1;" in signed.stdout
    with DnsServer(zones) as dns_server:
        assert dkimpy_verify_all(signed.stdout, dns_server.nameserver) == [True]
        assert postillon_verify(signed.stdout, dns_server.nameserver) == ["pass"]
        forged = signed.stdout.replace(b"elsewhere", b"here")
        assert dkimpy_verify_all(forged, dns_server.nameserver) == [False]
        assert postillon_verify(forged, dns_server.nameserver) == ["fail"]
        # The same signature under a selector whose record allows sha256 only.
        renamed = signed.stdout.replace(b"s=od;", b"s=only256;", 1)
        assert renamed != signed.stdout
        assert postillon_verify(renamed, dns_server.nameserver) == ["permerror"]


def test_a_bad_key_stops_the_server_with_a_clear_message(make_server: Any) -> None:
    server = make_server()
    server.write_config()
    keys = server.data_dir / "dkim" / "example.org"
    keys.mkdir(parents=True)
    (keys / "broken.key").write_text("not a key\n")
    checked = server.cli("check-config", check=False)
    assert checked.returncode == 2 and "broken.key" in checked.stderr
    with pytest.raises(RuntimeError, match=r"\[dkim\]: .*broken.key: not an unencrypted PEM"):
        server.start()


def test_a_retry_sends_the_bytes_signed_at_intake(make_server: Any) -> None:
    """A signs at intake; B is down, so the message waits in A's queue; B comes up and gets
    exactly the stored bytes (the signature's t= predates B, and it verifies).

    sendmail ──▶ A (signs, queues) ──✗ B down, deferred ... B up ──▶ B ──▶ Maildir
    """
    b_port = free_port()
    b = make_server(
        listen=[{"kind": "smtp", "address": f"127.0.0.1:{b_port}"}],
        domain=[{"name": "example.net", "mailboxes": ["bob"]}],
    )
    a = make_server(transport=[{"domain": "example.net", "route": f"smtp:[127.0.0.1]:{b_port}"}])
    a.write_config()
    a.data_dir.mkdir(exist_ok=True)
    a.cli("dkim", "keygen", "example.org", "--selector", "ed1", "--algorithm", "ed25519")
    keys = listed_keys(a.cli("dkim", "list", "--json").stdout)
    a.start()
    env = dict(os.environ, POSTILLON_CONFIG=str(a.config_path))
    sent = subprocess.run(
        [str(SENDMAIL), "-i", "-f", "alice@example.org", "bob@example.net"],
        input=b"From: alice@example.org\nSubject: patience\n\nworth the wait\n",
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    deadline = time.monotonic() + 20
    while "deferred" not in a.maillog():
        assert time.monotonic() < deadline, a.maillog()
        time.sleep(0.05)
    signed_at = int(time.time())
    # Until the clock's second moves on, so a signature made now would have a later t=.
    wait_until(lambda: int(time.time()) > signed_at, 5, "the next second")
    b.start()
    (path,) = b.wait_for_mail("bob@example.net")
    message = to_crlf(path.read_bytes())
    stamp = int(message.split(b"; t=")[1].split(b";")[0])
    assert stamp <= signed_at
    with DnsServer(key_zone(keys)) as dns_server:
        assert dkimpy_verify_all(message, dns_server.nameserver) == [True]


def sendmail_to_bob(server: ServerProcess, subject: str, body: str = "x") -> None:
    """alice@example.org -> bob@example.org through ``sendmail`` (local: signed)."""
    sent = subprocess.run(
        [str(SENDMAIL), "-i", "-f", "alice@example.org", "bob@example.org"],
        input=f"From: alice@example.org\nSubject: {subject}\n\n{body}\n".encode(),
        env=dict(os.environ, POSTILLON_CONFIG=str(server.config_path)),
        capture_output=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr


def test_a_key_made_while_running_signs_after_reload(make_server: Any) -> None:
    """sendmail ──▶ A (no key: unsigned); dkim keygen; postillon reload; sendmail ──▶ signed."""
    server = make_server().start()

    sendmail_to_bob(server, "before")
    server.wait_for_mail("bob@example.org", count=1)
    server.cli("dkim", "keygen", "example.org", "--selector", "new1", "--algorithm", "ed25519")
    assert server.cli("reload").returncode == 0
    deadline = time.monotonic() + 20
    while "configuration reloaded" not in server.maillog():
        assert time.monotonic() < deadline, server.maillog()[-2000:]
        time.sleep(0.05)
    sendmail_to_bob(server, "after")
    first, second = sorted(
        server.wait_for_mail("bob@example.org", count=2), key=lambda p: p.stat().st_mtime_ns
    )
    assert b"DKIM-Signature" not in first.read_bytes()
    assert b"s=new1" in second.read_bytes()


def test_rsa_signatures_are_made_by_the_helper_and_survive_its_death(make_server: Any) -> None:
    """postillon.helpers: the RSA operation runs in a helper process (the metrics say who
    signed); killed with SIGKILL, the server signs itself, and the mail verifies the same."""
    admin_port = free_port()
    server = make_server(helper_processes=1, admin={"listen": f"127.0.0.1:{admin_port}"})
    server.write_config()
    server.data_dir.mkdir(exist_ok=True)
    server.cli("dkim", "keygen", "example.org", "--selector", "rsa1")
    keys = listed_keys(server.cli("dkim", "list", "--json").stdout)
    server.start()
    token = server.cli("admin", "token").stdout.strip()

    def signed_by(done_by: str) -> float:
        samples = scrape(f"http://127.0.0.1:{admin_port}/metrics", token)
        return value(samples, "postillon_helper_requests_total", kind="sign", done_by=done_by)

    (helper,) = server.helper_pids()
    sendmail_to_bob(server, "by the helper")
    server.wait_for_mail("bob@example.org", count=1)
    assert (signed_by("helper"), signed_by("server")) == (1, 0)
    os.kill(helper, signal.SIGKILL)
    server.wait_for_log("ended: the server does its work")
    sendmail_to_bob(server, "by the server")
    messages = server.wait_for_mail("bob@example.org", count=2)
    assert (signed_by("helper"), signed_by("server")) == (1, 1)
    with DnsServer(key_zone(keys)) as dns_server:
        for path in messages:
            message = to_crlf(path.read_bytes())
            assert dkimpy_verify_all(message, dns_server.nameserver) == [True]


def test_a_reload_changes_the_number_of_helpers(make_server: Any) -> None:
    """helper_processes 1 -> 2 -> 0 by `postillon reload`: missing helpers start with
    the next request, extra ones stop, and mail is signed throughout."""
    server = make_server(helper_processes=1)
    server.write_config()
    server.data_dir.mkdir(exist_ok=True)
    server.cli("dkim", "keygen", "example.org", "--selector", "rsa1")
    server.start()
    assert len(server.helper_pids()) == 1
    total = 0
    for count, reloads in ((2, 1), (0, 2)):
        server.config["helper_processes"] = count
        server.write_config()
        assert server.cli("reload").returncode == 0
        deadline = time.monotonic() + 20
        while server.maillog().count("configuration reloaded") < reloads:
            assert time.monotonic() < deadline, server.maillog()[-2000:]
            time.sleep(0.05)
        sent = 0
        while len(server.helper_pids()) != count:
            assert time.monotonic() < deadline, (count, server.helper_pids())
            sendmail_to_bob(server, f"step {count}")  # a request starts missing helpers
            sent += 1
            time.sleep(0.2)
        sendmail_to_bob(server, f"after step {count}")
        total += sent + 1
    for message in server.wait_for_mail("bob@example.org", count=total):
        assert b"s=rsa1" in message.read_bytes()
