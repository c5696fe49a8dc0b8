"""Graceful shutdown: SIGTERM stops accepting, lets a session in DATA finish,
answers 421 to idle sessions, hands leased deliveries back, exits 0.

    client in DATA ──▶ postillon serve ──▶ queue ──▶ stalling SMTP peer
                           ▲ SIGTERM               (never answers the final dot)
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration


def _addr(server: ServerProcess) -> tuple[str, int]:
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    return host, int(port)


class Dialogue:
    """A raw SMTP client: one command, one reply, nothing hidden."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=20)
        self.file = self.sock.makefile("rb")

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline().decode()
            if not line:
                break
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                break
        return "\n".join(lines)

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def command(self, text: str) -> str:
        self.send(text + "\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _queue(server: ServerProcess) -> list[dict[str, object]]:
    return list(json.loads(server.cli("queue", "list", "--json").stdout))


def _refuses_connections(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=1).close()
    except OSError:
        return True
    return False


def test_sigterm_lets_data_finish_and_answers_idle_sessions_421(make_server) -> None:  # type: ignore[no-untyped-def]
    # Mail for remote.test goes to a closed port: it stays queued (deferred),
    # so the message is still in the queue after the restart.
    closed = free_port()
    server: ServerProcess = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[{"domain": "remote.test", "route": f"smtp:[127.0.0.1]:{closed}"}],
        queue={"first_retry": 3600.0, "max_retry": 3600.0},
        shutdown={"grace": 20.0},
    ).start()
    address = _addr(server)
    idle = Dialogue(address)
    assert idle.reply().startswith("220")
    assert idle.command("EHLO idle.test").startswith("250")
    busy = Dialogue(address)
    assert busy.reply().startswith("220")
    assert busy.command("EHLO busy.test").startswith("250")
    assert busy.command("MAIL FROM:<a@sender.test>").startswith("250")
    assert busy.command("RCPT TO:<x@remote.test>").startswith("250")
    assert busy.command("DATA").startswith("354")
    busy.send("Subject: in flight at SIGTERM\r\n\r\nfirst half\r\n")

    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    # The idle session is told at once; the listener is closed.
    assert idle.reply().startswith("421 4.3.2")
    deadline = time.monotonic() + 10
    while not _refuses_connections(address):
        assert time.monotonic() < deadline, "listener still accepting after SIGTERM"
        time.sleep(0.05)
    # The session in DATA finishes its message, then hears 421 too.
    busy.send("second half\r\n.\r\n")
    done = busy.reply()
    assert done.startswith("250 2.0.0 Ok: queued as "), done
    queue_id = done.rsplit(" ", 1)[1]
    assert busy.command("NOOP").startswith("421 4.3.2")
    assert server.proc.wait(30) == 0
    assert "postillon stopped" in server.maillog()

    queued = _queue(server)
    assert [m["queue_id"] for m in queued] == [queue_id]
    server.start()
    assert [m["queue_id"] for m in _queue(server)] == [queue_id]
    idle.close()
    busy.close()


class StallingPeer:
    """An SMTP server that takes the whole message and never answers the final
    dot: a delivery to it stays in flight until someone gives up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.bodies_ended = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        file = conn.makefile("rb")
        try:
            conn.sendall(b"220 stall.test ESMTP\r\n")
            in_data = False
            for raw in file:
                line = raw.rstrip(b"\r\n")
                if in_data:
                    if line == b".":
                        self.bodies_ended.set()  # ...and never answer
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250 stall.test\r\n")
                elif verb == b"DATA":
                    in_data = True
                    conn.sendall(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


@pytest.fixture
def stalling_peer() -> Iterator[StallingPeer]:
    peer = StallingPeer()
    yield peer
    peer.close()


def test_sigterm_hands_leased_deliveries_back(make_server, stalling_peer, sink) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(
        relay={"trusted_networks": ["127.0.0.0/8"]},
        transport=[{"domain": "remote.test", "route": f"smtp:[127.0.0.1]:{stalling_peer.port}"}],
        outbound={"tls": "none"},
        shutdown={"grace": 1.0},
    ).start()
    import smtplib

    host, port = _addr(server)
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.sendmail(
            "a@sender.test", ["x@remote.test", "y@remote.test"], "Subject: slow\r\n\r\nhi\r\n"
        )
    assert stalling_peer.bodies_ended.wait(20), "the delivery never reached the peer"
    # The delivery is in flight (leased) while postillon stops.
    leased = _queue(server)
    states = [r["state"] for m in leased for r in m["recipients"]]  # type: ignore[union-attr]
    assert states == ["leased", "leased"]
    assert server.stop() == 0

    after = _queue(server)
    assert len(after) == 1
    recipients = after[0]["recipients"]
    assert isinstance(recipients, list)
    # Back to pending (the cut-off attempt is not counted), no owner: due at once.
    assert [(r["state"], r["attempts"], r["lease_owner"]) for r in recipients] == [
        ("pending", 0, None),
        ("pending", 0, None),
    ]

    # Restarted with a working next hop, the message is delivered: nothing lost.
    port = sink().port
    server.config["transport"] = [{"domain": "remote.test", "route": f"smtp:[127.0.0.1]:{port}"}]
    server.start()
    deadline = time.monotonic() + 30
    while server.maillog().count(" delivered: ") < 2:
        assert time.monotonic() < deadline, server.maillog()[-2000:]
        time.sleep(0.1)
    assert _queue(server) == []
