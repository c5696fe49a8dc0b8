"""End-of-data verifications are bounded (issue 18, item 14).

    smtplib A ──▶ postillon serve ── SPF/DKIM/DMARC lookups ──▶ held DNS (answers on release)
    smtplib B ──▶ postillon serve ── no verification slot within verify_wait ──▶ 451 4.3.2

Each verification may hold a whole message in memory (up to max_verify_size);
with max_verify_concurrency = 1, a second message waits for the first one's
slot, and gets 451 4.3.2 (nothing queued) when none comes free in time.
"""

from __future__ import annotations

import smtplib
import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.rcode
import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration


class HeldDns:
    """A UDP DNS server that holds every query until ``release()``, then answers
    each (held and later ones) with SERVFAIL."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queried = threading.Event()
        self.released = threading.Event()
        self.held: list[tuple[bytes, tuple[str, int]]] = []
        self.names: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _answer(self, wire: bytes, peer: tuple[str, int]) -> None:
        response = dns.message.make_response(dns.message.from_wire(wire))
        response.set_rcode(dns.rcode.SERVFAIL)
        self.sock.sendto(response.to_wire(), peer)

    def _serve(self) -> None:
        while True:
            try:
                wire, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.names.append(str(dns.message.from_wire(wire).question[0].name))
            self.queried.set()
            if self.released.is_set():
                self._answer(wire, peer)
            else:
                self.held.append((wire, peer))

    def release(self) -> None:
        self.released.set()
        for wire, peer in self.held:
            self._answer(wire, peer)

    def close(self) -> None:
        self.release()
        self.sock.close()


@pytest.fixture
def held_dns() -> Iterator[HeldDns]:
    server = HeldDns()
    yield server
    server.close()


MESSAGE = b"From: <a@sender.test>\r\nTo: <alice@example.org>\r\nSubject: s\r\n\r\nhi\r\n"


def _send(port: int, sender: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.sender.test")
        s.mail(sender)
        s.rcpt("alice@example.org")
        return s.data(MESSAGE)


def test_a_message_without_a_verification_slot_gets_451_4_3_2(
    make_server, held_dns: HeldDns
) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server(
        dns={"nameservers": [f"127.0.0.1:{held_dns.port}"], "timeout": 60.0, "attempts": 1},
        authentication={"enabled": True, "max_verify_concurrency": 1, "verify_wait": 0.5},
    ).start()
    port = int(server.config["listen"][0]["address"].rpartition(":")[2])
    first: list[tuple[int, bytes]] = []
    holder = threading.Thread(target=lambda: first.append(_send(port, "a@first.test")))
    holder.start()
    # The first message is in its verification (its lookups are held) ...
    assert held_dns.queried.wait(30)
    try:
        # ... so the second finds no slot.
        code, text = _send(port, "b@second.test")
        assert (code, text[:5]) == (451, b"4.3.2"), (code, text)
        assert not any("second.test" in name for name in held_dns.names)  # never verified
    finally:
        held_dns.release()
        holder.join(60)
    # The first one's checks end in a DNS failure: 451 4.7.x, "defer" by default.
    assert first and first[0][0] == 451 and not first[0][1].startswith(b"4.3.2")
    assert "451 4.3.2" in server.wait_for_log("451 4.3.2")
