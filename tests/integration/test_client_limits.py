"""Per-client connection limits against the real server (issue 18, items 4 and 14).

raw TCP / smtplib ──▶ postillon serve (connections_per_ip) ──▶ 220, 421 or a closed socket

* implicit TLS (port 465) is counted at accept, before the handshake: a client
  that never finishes handshakes used to hold sockets outside every limit;
* the limit counts an IPv6 /64 as one client, as the AUTH failure budget does.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest

from support.ports import free_port
from support.server import ServerProcess

pytestmark = pytest.mark.integration


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's self-signed certificate
    return ctx


# The clients of a test come from an address of their own: start() probed the
# port from 127.0.0.1, and the server may still count that probe.
CLIENT = "127.0.0.2"


def _tls_greeting(port: int) -> int | None:
    """The greeting code over implicit TLS, or None when the server closed first."""
    try:
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, timeout=10, context=_tls(), source_address=(CLIENT, 0)
        ) as s:
            return s.noop()[0] and 220
    except (OSError, smtplib.SMTPException):
        return None


def test_implicit_tls_is_counted_before_the_handshake(make_server) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    server: ServerProcess = make_server(
        listen=[{"kind": "submissions", "address": f"127.0.0.1:{port}"}],
        limits={"connections_per_ip": 2},
    ).start()
    # Two clients that connect and never start the handshake fill the budget...
    silent = [
        socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT, 0))
        for _ in range(2)
    ]
    try:
        # ...so a third client is closed at accept, before any TLS work.
        assert _tls_greeting(port) is None
        assert "too many connections from your address" in server.wait_for_log("too many")
    finally:
        for s in silent:
            s.close()
    # Their slots come back when their (failed) handshakes end: poll, no fixed wait.
    deadline = time.monotonic() + 20
    while (code := _tls_greeting(port)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert code == 220


@pytest.fixture
def ipv6_net() -> Iterator[list[str]]:
    """Three addresses of one /64 on loopback, in the test's own network namespace only."""
    if socket.if_nameindex() != [(1, "lo")]:
        pytest.skip("needs the loopback-only network namespace of scripts/run-tests.sh")
    # The server in another /64 than its clients, so start()'s probe is not one of them.
    addrs = ["2001:db8:19::1", "2001:db8:18::2", "2001:db8:18::3"]
    for addr in addrs:
        done = subprocess.run(
            ["ip", "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0 and "File exists" not in done.stderr:
            pytest.skip(f"cannot add {addr} to lo: {done.stderr.strip()}")
    yield addrs
    for addr in addrs:
        subprocess.run(["ip", "-6", "addr", "del", f"{addr}/128", "dev", "lo"], check=False)


def _greeting(server_addr: str, port: int, source: str) -> bytes:
    with socket.create_connection((server_addr, port), timeout=10, source_address=(source, 0)) as s:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_connections_per_ip_counts_an_ipv6_slash_64_as_one_client(
    make_server,  # type: ignore[no-untyped-def]
    ipv6_net: list[str],
) -> None:
    server_addr, first, second = ipv6_net
    port = free_port(server_addr)
    make_server(
        listen=[{"kind": "smtp", "address": f"[{server_addr}]:{port}"}],
        limits={"connections_per_ip": 1},
    ).start()
    with socket.create_connection((server_addr, port), timeout=10, source_address=(first, 0)) as s:
        assert s.recv(4096).startswith(b"220")
        # Another address of the same /64 is the same client.
        assert _greeting(server_addr, port, second).startswith(b"421 4.7.0")
