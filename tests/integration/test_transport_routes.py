"""The transport table and smarthost, against real servers: Dovecot over LMTP
(TCP and unix socket), Postfix's smtp-sink over SMTP, and Postfix's
smtp-source as a real sending client.

    smtplib / smtp-source ──▶ postillon ──lmtp──▶ Dovecot ──▶ Maildir
                                        ──smtp:[127.0.0.1]:port──▶ smtp-sink ──▶ dump files
                                        ──error: / discard──▶ bounce / nothing
"""

from __future__ import annotations

import email
import shutil
import smtplib
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from support.dovecot import DovecotLmtp
from support.server import ServerProcess

if TYPE_CHECKING:
    from sink_fixtures import Sink

pytestmark = pytest.mark.integration

MESSAGE = b"From: alice@example.org\r\nSubject: routed\r\n\r\nrouted body\r\n..two dots\r\n"


def send(server: ServerProcess, rcpts: list[str], sender: str = "alice@example.org") -> str:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.ehlo("client.test")
        s.mail(sender)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250, r
        code, msg = s.data(MESSAGE)
    assert code == 250
    return msg.decode().rsplit(" ", 1)[1]


def wait_log(server: ServerProcess, needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in (log := server.maillog()):
            return log
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in log:\n{server.maillog()[-3000:]}")


def routed_server(
    make_server: Callable[..., ServerProcess], rules: list[dict[str, Any]], **extra: Any
) -> ServerProcess:
    return make_server(
        relay={"trusted_networks": ["127.0.0.0/8"], **extra.pop("relay", {})},
        transport=rules,
        **extra,
    ).start()


@pytest.fixture
def dovecot(make_dovecot) -> DovecotLmtp:  # type: ignore[no-untyped-def]
    """Dovecot with the mailboxes of example.com (a remote domain for postillon)."""
    return make_dovecot(users=["alice@example.com", "bob@example.com"])  # type: ignore[no-any-return]


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_lmtp_to_dovecot(make_server, dovecot: DovecotLmtp, over: str) -> None:  # type: ignore[no-untyped-def]
    host, port = dovecot.lmtp_address
    route = f"lmtp:{host}:{port}" if over == "tcp" else f"lmtp:unix:{dovecot.unix_socket}"
    server = routed_server(make_server, [{"domain": "example.com", "route": route}])
    qid = send(server, ["alice@example.com", "bob@example.com"])
    wait_log(server, f"{qid}: delivered: to=<bob@example.com>")
    for user in ("alice@example.com", "bob@example.com"):
        (msg,) = dovecot.messages(user)
        assert b"routed body\n..two dots\n" in msg.replace(b"\r\n", b"\n")


def test_lmtp_unknown_user_bounces_with_dovecots_reply(make_server, dovecot: DovecotLmtp) -> None:  # type: ignore[no-untyped-def]
    host, port = dovecot.lmtp_address
    server = routed_server(make_server, [{"domain": "example.com", "route": f"lmtp:{host}:{port}"}])
    qid = send(server, ["alice@example.com", "nobody@example.com"])
    wait_log(server, f"{qid}: bounce:")
    (path,) = server.wait_for_mail("alice@example.org")
    text = email.message_from_bytes(path.read_bytes()).as_string()
    assert "Final-Recipient: rfc822; nobody@example.com" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1" in text
    assert len(dovecot.messages("alice@example.com")) == 1


def test_static_smtp_route_to_smtp_sink(make_server, sink: Callable[..., Sink]) -> None:  # type: ignore[no-untyped-def]
    target = sink()
    server = routed_server(
        make_server, [{"domain": "sink.test", "route": f"smtp:[127.0.0.1]:{target.port}"}]
    )
    qids = [send(server, [f"user{i}@sink.test"]) for i in range(3)]
    for qid in qids:
        wait_log(server, f"{qid}: delivered:")
    dumps = target.dumps(3)
    assert len(dumps) == 3
    assert all("routed body\n..two dots\n" in d for d in dumps)
    assert f"relay=(127.0.0.1[127.0.0.1]:{target.port} tls=none policy=opportunistic)" in (
        server.maillog()
    )


def test_error_and_discard_routes(make_server) -> None:  # type: ignore[no-untyped-def]
    server = routed_server(
        make_server,
        [
            {"domain": "gone.test", "route": "error:5.1.2 This domain no longer takes mail"},
            {"domain": "void.test", "route": "discard"},
        ],
    )
    qid_void = send(server, ["x@void.test"])
    wait_log(server, f"{qid_void}: delivered: to=<x@void.test>, relay=discard")
    qid = send(server, ["x@gone.test"])
    wait_log(server, f"{qid}: bounce:")
    (path,) = server.wait_for_mail("alice@example.org")
    assert b"This domain no longer takes mail" in path.read_bytes()


def test_smarthost_with_password_never_sends_it_in_clear(
    make_server, sink: Callable[..., Sink]
) -> None:  # type: ignore[no-untyped-def]
    # smtp-sink offers AUTH but no STARTTLS: the password must not be sent.
    target = sink()
    server = make_server(
        relay={
            "trusted_networks": ["127.0.0.0/8"],
            "smarthost": f"smtp://user:secret@127.0.0.1:{target.port}",
        }
    ).start()
    qid = send(server, ["friend@elsewhere.test"])
    log = wait_log(server, f"{qid}: deferred: to=<friend@elsewhere.test>")
    assert "TLS" in log.split(f"{qid}: deferred:")[1].splitlines()[0]
    assert target.dumps(0, timeout=0.5) == []


def test_smtp_source_as_client(make_server) -> None:  # type: ignore[no-untyped-def]
    smtp_source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    server = routed_server(make_server, [{"domain": "bench.test", "route": "discard"}])
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    result = subprocess.run(
        [
            smtp_source,
            "-s",
            "5",
            "-m",
            "50",
            "-l",
            "4096",
            "-f",
            "load@sender.test",
            "-t",
            "rcpt@bench.test",
            "-M",
            "loadgen.test",
            f"{host}:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 20
    while server.maillog().count("relay=discard") < 50 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.maillog().count("relay=discard") == 50
