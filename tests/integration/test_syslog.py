"""The mail log to syslog: a real receiver (a unix datagram socket the test
binds, as syslogd binds /dev/log) gets one datagram per event, framed as
RFC 5424 or RFC 3164 says.

    smtplib ──▶ postillon serve ──▶ Maildir
                     │ [log] target = "syslog:<socket>"
                     ▼
                 test's datagram socket
"""

from __future__ import annotations

import json
import re
import shutil
import smtplib
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration

# <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP BOM MSG
RFC5424 = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) "
    rb"(?P<host>\S+) postillon (?P<pid>\d+) - - \xef\xbb\xbf(?P<msg>.*)$",
    re.DOTALL,
)
# <PRI>Mmm dd hh:mm:ss HOSTNAME TAG[PID]: MSG
RFC3164 = re.compile(
    rb"^<(?P<pri>\d{1,3})>(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ 123]\d "
    rb"\d\d:\d\d:\d\d (?P<host>\S+) postillon\[(?P<pid>\d+)\]: (?P<msg>.*)$",
    re.DOTALL,
)
MAIL_INFO = 2 * 8 + 6  # facility mail (2), severity informational (6)


@pytest.fixture
def receiver() -> Iterator[tuple[Path, socket.socket]]:
    # A short directory: unix socket paths are limited to about 100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="pst-syslog-"))
    path = directory / "log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    path.chmod(0o666)
    sock.settimeout(0.2)
    yield path, sock
    sock.close()
    shutil.rmtree(directory, ignore_errors=True)


def _datagrams(sock: socket.socket, until: bytes, timeout: float = 20) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(65536))
        except TimeoutError:
            continue
        if until in got[-1]:
            return got
    raise AssertionError(f"no datagram with {until!r}; got {got[-5:]}")


@pytest.mark.parametrize(
    ("rfc", "fmt", "pattern"),
    [("rfc5424", "json", RFC5424), ("rfc3164", "text", RFC3164)],
    ids=["rfc5424-json", "rfc3164-text"],
)
def test_mail_log_to_syslog(make_server, receiver, rfc, fmt, pattern) -> None:  # type: ignore[no-untyped-def]
    path, sock = receiver
    server: ServerProcess = make_server(
        log={"format": fmt, "target": f"syslog:{path}", "syslog_format": rfc}
    ).start()
    assert server.proc is not None
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as client:
        client.sendmail("a@sender.test", ["alice@example.org"], "Subject: s\r\n\r\nhello\r\n")
    datagrams = _datagrams(sock, b"delivered")
    events = []
    for data in datagrams:
        m = pattern.match(data)
        assert m is not None, f"not {rfc}: {data!r}"
        assert int(m["pid"]) == server.proc.pid
        assert m["host"] in (b"mx.test.example", b"mx")
        events.append((int(m["pri"]), m["msg"].decode()))
    mail = [
        (pri, msg)
        for pri, msg in events
        if "alice@example.org" in msg or "from=" in msg or '"event"' in msg
    ]
    assert mail and all(pri == MAIL_INFO for pri, _ in mail)
    if fmt == "json":
        records = [json.loads(msg) for _, msg in mail]
        received = next(r for r in records if r["event"] == "received")
        delivered = next(r for r in records if r["event"] == "delivered")
        assert received["queue_id"] == delivered["queue_id"]
        assert delivered["to"] == "alice@example.org"
    else:
        received = next(msg for _, msg in mail if ": received: " in msg)
        queue_id = received.split(":", 1)[0]
        assert any(
            msg.startswith(f"{queue_id}: delivered: to=<alice@example.org>") for _, msg in mail
        )
    assert not server.log_path.exists()  # nothing went to the file
