"""pytest fixtures for the admin server: a postillon with ``[admin] listen``, a
token made with the real ``postillon admin token``, and a second postillon as
the destination that can be down (mail deferred) and then up.

    smtplib ──▶ A (admin on 127.0.0.1:P) ──transport smtp:[127.0.0.1]:Q──▶ B ──▶ Maildir
                 │ bounces back into A's local mailboxes
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from support.ports import free_port
from support.server import ServerProcess

MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@remote.test\r\n"
    b"Subject: Quarterly report\r\nMessage-ID: <report-1@example.org>\r\n\r\n"
    b"Numbers attached.\r\n"
)


@dataclass
class AdminSetup:
    a: ServerProcess  # the server under test, with the admin server on
    b: ServerProcess  # remote.test's mail server (started on demand)
    token: str
    base: str  # http://127.0.0.1:port

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def send(
        self,
        rcpts: list[str] | None = None,
        sender: str = "alice@example.org",
        body: bytes = MESSAGE,
    ) -> str:
        host, _, port = self.a.config["listen"][0]["address"].rpartition(":")
        with smtplib.SMTP(host, int(port), timeout=10) as s:
            s.ehlo("client.test")
            s.mail(sender)
            for r in rcpts or ["bob@remote.test"]:
                assert s.rcpt(r)[0] == 250
            code, msg = s.data(body)
        assert code == 250, msg
        return msg.decode().rsplit(" ", 1)[1]

    def wait_log(self, needle: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.a.maillog():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not in log:\n{self.a.maillog()[-3000:]}")
            time.sleep(0.05)


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# The sender's domain publishes SPF and DMARC (on the loopback DNS server), so
# the inbound checks run and show up in each message's history.
SENDER_ZONES: dict[str, Any] = {
    "example.org": {
        "@": {"TXT": '"v=spf1 ip4:127.0.0.0/8 -all"'},
        "_dmarc.example.org": {"TXT": '"v=DMARC1; p=none"'},
    },
    "client.test": {"@": {"TXT": '"v=spf1 ip4:127.0.0.0/8 -all"'}},  # the HELO name
}


@pytest.fixture
def admin_setup(
    make_server: Callable[..., ServerProcess], make_dns_server: Callable[..., Any]
) -> AdminSetup:
    """A started (admin on, token made); B built but not started: remote.test is down."""
    dns = make_dns_server(SENDER_ZONES)
    b_port = free_port()
    b = make_server(
        listen=[{"kind": "smtp", "address": f"127.0.0.1:{b_port}"}],
        domain=[{"name": "remote.test", "mailboxes": ["bob", "carol"]}],
    )
    admin_port = free_port()
    extra: dict[str, Any] = {
        "relay": {"trusted_networks": ["127.0.0.0/8"]},
        "transport": [{"domain": "remote.test", "route": f"smtp:[127.0.0.1]:{b_port}"}],
        # No automatic retry during a test: retries happen when the test asks.
        "queue": {"first_retry": 3600.0, "max_retry": 3600.0},
        "outbound": {"connect_timeout": 2.0},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "dns": {"nameservers": [dns.nameserver], "timeout": 1.0, "attempts": 1},
        # The test client relays (trusted network); check its mail anyway.
        "authentication": {"enabled": True, "check_trusted_networks": True},
    }
    a = make_server(**extra)
    a.start()
    wait_port(admin_port)
    token = a.cli("admin", "token").stdout.strip()
    return AdminSetup(a=a, b=b, token=token, base=f"http://127.0.0.1:{admin_port}")
