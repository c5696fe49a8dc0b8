"""Real clients beyond smtplib: swaks (with STARTTLS and pipelining) and a raw
socket client speaking BDAT (RFC 3030), which neither smtplib nor swaks does.

    swaks / raw socket ──SMTP──▶ postillon serve ──▶ queue ──▶ Maildir
"""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration

SWAKS = shutil.which("swaks")


def _addr(server: ServerProcess) -> tuple[str, int]:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return host, int(port)


def swaks(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    if SWAKS is None:
        pytest.fail("swaks is not installed: run `make system-deps` (Debian package swaks)")
    host, port = _addr(server)
    return subprocess.run(
        [SWAKS, "--server", host, "--port", str(port), "--helo", "client.test", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_swaks_plain(server: ServerProcess) -> None:
    result = swaks(
        server,
        "--from",
        "carol@sender.test",
        "--to",
        "alice@example.org",
        "--header",
        "Subject: from swaks",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    (path,) = server.wait_for_mail("alice@example.org")
    assert b"Subject: from swaks" in path.read_bytes()


def test_swaks_starttls_and_pipelining(server: ServerProcess) -> None:
    result = swaks(
        server,
        "--tls",
        "--pipeline",
        "--from",
        "carol@sender.test",
        "--to",
        "alice@example.org,bob@example.org",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "220 2.0.0 Ready to start TLS" in result.stdout
    server.wait_for_mail("alice@example.org")
    server.wait_for_mail("bob@example.org")


def test_swaks_relay_denied(server: ServerProcess) -> None:
    result = swaks(server, "--from", "spam@sender.test", "--to", "victim@elsewhere.test")
    assert result.returncode != 0
    assert "554 5.7.1" in result.stdout


class RawClient:
    def __init__(self, server: ServerProcess) -> None:
        self.sock = socket.create_connection(_addr(server), timeout=10)
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> bytes:
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def test_bdat_chunks(server: ServerProcess) -> None:
    c = RawClient(server)
    assert c.reply().startswith(b"220")
    c.send(b"EHLO client.test\r\n")
    assert c.reply().startswith(b"250")
    part1 = b"Subject: chunked\r\n\r\nfirst part\r\n"
    part2 = b".this dot is not stuffed in BDAT\r\nlast\r\n"
    c.send(b"MAIL FROM:<carol@sender.test>\r\nRCPT TO:<alice@example.org>\r\n")
    assert c.reply().startswith(b"250 2.1.0")
    assert c.reply().startswith(b"250 2.1.5")
    c.send(b"BDAT %d\r\n" % len(part1) + part1)
    assert c.reply().startswith(b"250")
    c.send(b"BDAT %d LAST\r\n" % len(part2) + part2)
    final = c.reply()
    assert final.startswith(b"250 2.0.0 Ok: queued as"), final
    c.send(b"QUIT\r\n")
    assert c.reply().startswith(b"221")
    c.close()
    (path,) = server.wait_for_mail("alice@example.org")
    body = path.read_bytes()
    assert b"first part\n.this dot is not stuffed in BDAT\nlast\n" in body


def test_smuggling_attempt_is_not_a_second_message(server: ServerProcess) -> None:
    c = RawClient(server)
    c.reply()
    c.send(
        b"EHLO client.test\r\nMAIL FROM:<carol@sender.test>\r\n"
        b"RCPT TO:<alice@example.org>\r\nDATA\r\n"
    )
    for _ in range(3):
        c.reply()
    assert c.reply().startswith(b"354")
    c.send(
        b"Subject: smuggle\r\n\r\nhello\r\n\n.\r\n"
        b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n.\r\n"
    )
    reply = c.reply()
    assert reply.startswith(b"550") or reply.startswith(b"554"), reply
    c.send(b"QUIT\r\n")
    c.close()
    assert server.maildir_messages("bob@example.org") == []
