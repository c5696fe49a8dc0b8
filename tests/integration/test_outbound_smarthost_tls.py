"""A smarthost with a password gets AUTH only after it proved who it is.

    smtplib ──▶ A (smarthost = smtp://user:pw@smtp.relay.test:port) ──DNS A──▶ 127.0.0.1
                 └──STARTTLS──▶ RecordingSmtp (self-signed, CA-issued, wrong-name cert)
                                  .commands: AUTH only when the certificate verified for
                                  smtp.relay.test (system CAs or smarthost_ca_file) or its
                                  key matched smarthost_fingerprints

Without proof: no AUTH, no MAIL, the message is deferred with 4.7.5 and the
reason in the log and in the queue's last reply.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from support import tls_certs
from support.recording_smtp import RecordingSmtp
from support.server import ServerProcess
from support.tls_certs import ca_issued, pin

pytestmark = pytest.mark.integration

HOST = "smtp.relay.test"
MESSAGE = b"From: alice@example.org\r\nSubject: via smarthost\r\n\r\nhello\r\n"


@pytest.fixture
def recorders() -> Iterator[Callable[[ssl.SSLContext | None], RecordingSmtp]]:
    started: list[RecordingSmtp] = []

    def make(tls: ssl.SSLContext | None) -> RecordingSmtp:
        rec = RecordingSmtp(tls=tls).start()
        started.append(rec)
        return rec

    yield make
    for rec in started:
        rec.stop()


def self_signed(tmp_path: Path, name: str = HOST) -> tuple[ssl.SSLContext, Path]:
    return tls_certs.self_signed(tmp_path, name)


def relaying_server(
    make_server: Callable[..., ServerProcess],
    make_dns_server: Any,
    port: int,
    **relay: Any,
) -> ServerProcess:
    dns = make_dns_server({"relay.test": {HOST: {"A": "127.0.0.1"}}})
    return make_server(
        relay={
            "trusted_networks": ["127.0.0.0/8"],
            "smarthost": f"smtp://user:s3cret-pw@{HOST}:{port}",
            **relay,
        },
        dns={"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
    ).start()


def send(server: ServerProcess) -> str:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.ehlo("client.test")
        s.mail("alice@example.org")
        assert s.rcpt("friend@elsewhere.test")[0] == 250
        code, msg = s.data(MESSAGE)
    assert code == 250
    return msg.decode().rsplit(" ", 1)[1]


def deferred_line(server: ServerProcess, qid: str, timeout: float = 20) -> str:
    needle = f"{qid}: deferred: to=<friend@elsewhere.test>"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.maillog().splitlines():
            if needle in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in log:\n{server.maillog()[-3000:]}")


def last_reply(server: ServerProcess, qid: str) -> str:
    shown = json.loads(server.cli("queue", "show", qid, "--json").stdout)
    return str(shown["recipients"][0]["last_reply"])


@pytest.mark.parametrize("case", ["self-signed", "wrong-name", "untrusted-ca", "wrong-pin"])
def test_no_auth_to_an_unproven_smarthost(  # type: ignore[no-untyped-def]
    make_server, make_dns_server, recorders, tmp_path: Path, case: str
) -> None:
    ca = trustme.CA()
    relay: dict[str, Any] = {}
    if case == "self-signed":
        tls, _ = self_signed(tmp_path)
    elif case == "wrong-name":  # trusted CA, certificate for another name
        tls = ca_issued(ca, "other.relay.test")
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        relay["smarthost_ca_file"] = str(tmp_path / "ca.pem")
    elif case == "untrusted-ca":  # right name, CA not the configured one
        tls = ca_issued(ca, HOST)
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        relay["smarthost_ca_file"] = str(tmp_path / "ca.pem")
    else:  # a pin of another key
        tls, _ = self_signed(tmp_path)
        _, other = self_signed(tmp_path, "other.relay.test")
        relay["smarthost_fingerprints"] = [pin(other.read_bytes())]
    rec = recorders(tls)
    a = relaying_server(make_server, make_dns_server, rec.port, **relay)
    qid = send(a)
    line = deferred_line(a, qid)
    assert "4.7.5" in line, line
    if case == "wrong-pin":
        assert "matches no configured fingerprint" in line, line
    else:
        assert f"certificate for {HOST} not verified: " in line, line
    assert "policy=verify" in line or "policy=fingerprint" in line, line
    assert "s3cret-pw" not in a.maillog()
    assert "STARTTLS" in rec.commands
    assert not rec.saw("AUTH") and not rec.saw("MAIL"), rec.commands
    assert "4.7.5" in last_reply(a, qid)


def test_no_auth_without_starttls(make_server, make_dns_server, recorders) -> None:  # type: ignore[no-untyped-def]
    rec = recorders(None)
    a = relaying_server(make_server, make_dns_server, rec.port)
    qid = send(a)
    line = deferred_line(a, qid)
    assert "does not offer STARTTLS" in line and "4.7.5" in line, line
    assert not rec.saw("AUTH") and not rec.saw("MAIL"), rec.commands


@pytest.mark.parametrize("case", ["ca-file", "pin"])
def test_auth_to_a_proven_smarthost(  # type: ignore[no-untyped-def]
    make_server, make_dns_server, recorders, tmp_path: Path, case: str
) -> None:
    relay: dict[str, Any] = {}
    if case == "ca-file":
        ca = trustme.CA()
        tls = ca_issued(ca, HOST)
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        relay["smarthost_ca_file"] = str(tmp_path / "ca.pem")
    else:
        tls, cert = self_signed(tmp_path)
        relay["smarthost_fingerprints"] = [pin(cert.read_bytes())]
    rec = recorders(tls)
    a = relaying_server(make_server, make_dns_server, rec.port, **relay)
    qid = send(a)
    assert b"hello" in rec.wait_for_message()
    auth = next(c for c in rec.commands if c.upper().startswith("AUTH"))
    assert rec.commands.index(auth) > rec.commands.index("STARTTLS")
    expected = "pinned policy=fingerprint" if case == "pin" else "verified policy=verify"
    log = a.wait_for_log(f"{qid}: delivered: to=<friend@elsewhere.test>")
    assert expected in log, log[-2000:]
