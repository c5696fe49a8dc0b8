"""Destinations that misbehave: every fault is a deferral with its reason
recorded, never a lost message; DSN 'relayed' notices for hops without DSN;
mail loops refused.

    smtplib ──▶ postillon ──smtp:[127.0.0.1]:port──▶ smtp-sink -q/-Q/-e, a staller, a babbler
"""

from __future__ import annotations

import email
import json
import smtplib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from support.ports import free_port
from support.server import ServerProcess

if TYPE_CHECKING:
    from sink_fixtures import Sink

pytestmark = pytest.mark.integration

MESSAGE = b"From: alice@example.org\r\nSubject: faults\r\n\r\nbody\r\n"


def routed(make_server: Callable[..., ServerProcess], port: int, **extra: Any) -> ServerProcess:
    return make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[{"domain": "dest.test", "route": f"smtp:[127.0.0.1]:{port}"}],
        outbound={
            "greeting_timeout": 1.0,
            "command_timeout": 1.0,
            "data_end_timeout": 1.0,
            "connect_timeout": 1.0,
        },
        **extra,
    ).start()


def send(
    server: ServerProcess,
    rcpt: str = "x@dest.test",
    body: bytes = MESSAGE,
    options: tuple[str, ...] = (),
) -> str:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.ehlo("client.test")
        s.mail("alice@example.org")
        assert s.rcpt(rcpt, list(options))[0] == 250
        code, msg = s.data(body)
    assert code == 250, msg
    return msg.decode().rsplit(" ", 1)[1]


def deferred_reply(server: ServerProcess, qid: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = json.loads(server.cli("queue", "show", qid, "--json").stdout)
        rcpt = shown["recipients"][0]
        if rcpt["state"] == "deferred":
            return str(rcpt["last_reply"])
        time.sleep(0.1)
    raise AssertionError(f"{qid} not deferred:\n{server.maillog()[-2000:]}")


@pytest.fixture
def fake_server() -> Iterator[Callable[[bytes | None], int]]:
    """A TCP server that sends ``greeting`` (or nothing: a staller) and never reads."""
    sockets: list[socket.socket] = []

    def start(greeting: bytes | None) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        sockets.append(listener)

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                sockets.append(conn)
                if greeting is not None:
                    conn.sendall(greeting)

        threading.Thread(target=serve, daemon=True).start()
        return int(listener.getsockname()[1])

    yield start
    for s in sockets:
        s.close()


@pytest.mark.parametrize(
    ("options", "expected"),
    [(("-q", "DATA"), "4.4.2"), (("-Q", "RCPT"), "421")],
    ids=["drop-at-data", "421-at-rcpt"],
)
def test_sink_faults_defer(make_server, sink: Callable[..., Sink], options, expected) -> None:  # type: ignore[no-untyped-def]
    target = sink(*options)
    server = routed(make_server, target.port)
    qid = send(server)
    reply = deferred_reply(server, qid)
    assert reply.startswith("4"), reply
    assert server.maildir_messages("alice@example.org") == []  # no bounce for a fault


@pytest.mark.parametrize(
    "greeting",
    [None, b"garbage without a code\r\n", b"220-half a greeting\r\n"],
    ids=["stalls", "garbage", "never-finishes-greeting"],
)
def test_broken_servers_defer(make_server, fake_server, greeting) -> None:  # type: ignore[no-untyped-def]
    port = fake_server(greeting)
    server = routed(make_server, port)
    qid = send(server)
    reply = deferred_reply(server, qid)
    assert reply.startswith("4"), reply


def test_a_stalled_destination_does_not_block_others(make_server, fake_server, sink) -> None:  # type: ignore[no-untyped-def]
    stall = fake_server(None)
    good = sink()
    server = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[
            {"domain": "stuck.test", "route": f"smtp:[127.0.0.1]:{stall}"},
            {"domain": "dest.test", "route": f"smtp:[127.0.0.1]:{good.port}"},
        ],
        outbound={"greeting_timeout": 30.0, "per_destination": 2},
        queue={"concurrency": 8},
    ).start()
    for _ in range(10):
        send(server, "x@stuck.test")
    qid = send(server, "y@dest.test")
    deadline = time.monotonic() + 15
    while f"{qid}: delivered" not in server.maillog():
        assert time.monotonic() < deadline, server.maillog()[-2000:]
        time.sleep(0.1)


def test_relayed_notice_when_next_hop_has_no_dsn(make_server, sink: Callable[..., Sink]) -> None:  # type: ignore[no-untyped-def]
    target = sink("-e")  # HELO only: no DSN extension
    server = routed(make_server, target.port)
    qid = send(server, options=("NOTIFY=SUCCESS,FAILURE",))
    deadline = time.monotonic() + 20
    while not server.maildir_messages("alice@example.org"):
        assert time.monotonic() < deadline, server.maillog()[-2000:]
        time.sleep(0.1)
    (path,) = server.maildir_messages("alice@example.org")
    text = email.message_from_bytes(path.read_bytes()).as_string()
    assert "Action: relayed" in text and "Final-Recipient: rfc822; x@dest.test" in text
    assert f"X-Postillon-Queue-ID: {qid}" in text


def test_mail_loop_is_refused(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(limits={"max_hops": 10}).start()
    hops = b"".join(
        b"Received: from hop%d by hop%d; Sat, 28 Nov 2026 10:00:00 +0000\r\n" % (i, i)
        for i in range(11)
    )
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.ehlo("client.test")
        s.mail("carol@sender.test")
        s.rcpt("alice@example.org")
        code, msg = s.data(hops + MESSAGE)
    assert code == 554 and msg.startswith(b"5.4.6")
    assert free_port()  # the server is still fine
