"""Issue 18 items 1-3 and 14 through the real server: what a client or a
remote server sends never becomes a line of its own in a DSN or the mail log,
and a URL's password never shows in an error.

    smtplib ──ENVID/ORCPT──▶ postillon ──error: route──▶ bounce ──▶ Maildir (alice)
    smtplib ──▶ postillon ──smtp:[127.0.0.1]:port──▶ hostile MX (multi-line 550, forged log line)
    postillon check-config / SIGHUP reload ──▶ a smarthost URL with its password
"""

from __future__ import annotations

import email
import signal
import smtplib
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from email.message import Message

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration

MESSAGE = b"From: alice@example.org\r\nSubject: injection\r\n\r\nbody\r\n"
FORGED = "ABCDEF1234: delivered: to=<ceo@victim.test>, relay=local, status=sent"


def _address(server: ServerProcess) -> tuple[str, int]:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return host, int(port)


def _wait_log(server: ServerProcess, needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in (log := server.maillog()):
            return log
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in log:\n{server.maillog()[-3000:]}")


def _report(server: ServerProcess) -> tuple[str, Message]:
    """The text and the delivery-status part of the one notice alice got."""
    (path,) = server.wait_for_mail("alice@example.org")
    raw = path.read_bytes()
    notice = email.message_from_bytes(raw)
    status = next(p for p in notice.walk() if p.get_content_type() == "message/delivery-status")
    return raw.decode(), status


# -- item 1 --------------------------------------------------------------------


def test_envid_and_orcpt_with_line_breaks_are_refused(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server().start()
    with smtplib.SMTP(*_address(server), timeout=10) as client:
        client.ehlo("client.test")
        code, _ = client.docmd("MAIL FROM:<carol@sender.test> ENVID=x+0D+0ABcc:+20v@victim.test")
        assert code == 501
        code, _ = client.docmd("MAIL FROM:<carol@sender.test> ENVID=ok")
        assert code == 250
        code, _ = client.docmd("RCPT TO:<alice@example.org> ORCPT=rfc822;a@b+0D+0AX-Evil:+20yes")
        assert code == 501
        code, _ = client.docmd("RCPT TO:<alice@example.org> ORCPT=rfc822;alice@example.org")
        assert code == 250


def test_bounce_carries_envid_and_orcpt_as_xtext(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[
            {"domain": "gone.test", "route": "error:5.1.2 This domain no longer takes mail"}
        ],
    ).start()
    with smtplib.SMTP(*_address(server), timeout=10) as client:
        client.ehlo("client.test")
        client.mail("alice@example.org", ["ENVID=id+2B1+3Dx+20y"])
        assert client.rcpt("x@gone.test", ["ORCPT=rfc822;x+2Btag@gone.test"])[0] == 250
        assert client.data(MESSAGE)[0] == 250
    text, status = _report(server)
    assert "Original-Envelope-Id: id+2B1+3Dx+20y" in text
    assert "Original-Recipient: rfc822;x+2Btag@gone.test" in text
    groups = status.get_payload()
    assert groups[0]["Original-Envelope-Id"] == "id+2B1+3Dx+20y"


# -- item 2 --------------------------------------------------------------------


@pytest.fixture
def hostile_mx() -> Iterator[Callable[[bytes], int]]:
    """An SMTP server that refuses every recipient with ``reply`` (raw bytes)."""
    sockets: list[socket.socket] = []

    def start(reply: bytes) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        sockets.append(listener)

        def session(conn: socket.socket) -> None:
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 evil.test ESMTP\r\n")
                for line in lines:
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        conn.sendall(b"250-evil.test\r\n250 ENHANCEDSTATUSCODES\r\n")
                    elif verb == b"RCPT":
                        conn.sendall(reply)
                    elif verb == b"QUIT":
                        conn.sendall(b"221 2.0.0 bye\r\n")
                        return
                    elif verb == b"DATA":
                        conn.sendall(b"554 5.5.1 no valid recipients\r\n")
                    else:
                        conn.sendall(b"250 2.0.0 ok\r\n")

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=session, args=(conn,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for s in sockets:
        s.close()


def test_hostile_multiline_reply_cannot_forge_log_lines_or_dsn_fields(  # type: ignore[no-untyped-def]
    make_server, hostile_mx
) -> None:
    port = hostile_mx(
        b"550-5.1.1 no such user\r\n"
        + f"550-5.1.1 {FORGED}\r\n".encode()
        + b"550-5.1.1 X-Forged-Field: yes\r\n"
        + b"550 5.1.1 \x1b]0;owned\x07\x1b[2J done\r\n"
    )
    server = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[{"domain": "dest.test", "route": f"smtp:[127.0.0.1]:{port}"}],
    ).start()
    with smtplib.SMTP(*_address(server), timeout=10) as client:
        client.sendmail("alice@example.org", ["x@dest.test"], MESSAGE)
    log = _wait_log(server, ": bounce:")
    for line in log.splitlines():
        assert FORGED not in line.split(": ", 1)[1][:60], line  # no line starts with it
    assert "\x1b" not in log and "\x07" not in log
    assert "no such user\\n" in log  # the reply is there, escaped
    text, status = _report(server)
    per_recipient = status.get_payload()[1]
    diagnostic = per_recipient["Diagnostic-Code"]
    assert "no such user" in diagnostic and FORGED in diagnostic and "done" in diagnostic
    assert "X-Forged-Field" not in per_recipient and "ABCDEF1234" not in per_recipient
    assert "\x1b" not in text


# -- item 3 --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("smtp://bob:Pa#ss99word@relay.test:587", "ss99word"),  # used to pass, then fail at start
        ("smtp:/bob:Secret99@relay.test", "Secret99"),  # a typo: the URL was echoed whole
        ("smtp://bob:Secret99@relay.test:99999", "Secret99"),  # port out of range
    ],
)
def test_check_config_refuses_a_bad_smarthost_without_its_password(  # type: ignore[no-untyped-def]
    make_server, url, secret
) -> None:
    server = make_server(relay={"smarthost": url})
    server.write_config()
    result = server.cli("check-config", check=False)
    assert result.returncode == 2, result.stdout
    assert "relay.smarthost" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_encoded_password_passes_check_config_and_starts(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(relay={"smarthost": "smtp://bob:Pa%23ss99word@127.0.0.1:9"})
    server.write_config()
    assert server.cli("check-config").returncode == 0
    server.start()  # what passes check-config starts


def test_refused_reload_does_not_log_the_password(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server().start()
    assert server.proc is not None
    good = server.config_path.read_text()
    server.config_path.write_text(
        good.replace("[relay]", '[relay]\nsmarthost = "smtp:/bob:Secret99@relay.test"', 1)
    )
    server.proc.send_signal(signal.SIGHUP)
    log = _wait_log(server, "reload refused")
    assert "relay.smarthost" in log and "Secret99" not in log
    cli = server.cli("reload", check=False)
    assert cli.returncode == 2 and "Secret99" not in cli.stderr + cli.stdout


# -- item 14 -------------------------------------------------------------------


def test_mail_log_is_created_0640(server: ServerProcess) -> None:
    with smtplib.SMTP(*_address(server), timeout=10) as client:
        client.sendmail("carol@sender.test", ["alice@example.org"], MESSAGE)
    _wait_log(server, "received:")
    assert stat.S_IMODE(server.log_path.stat().st_mode) == 0o640
