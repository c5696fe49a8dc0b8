"""The MTA-STS policy server's limits on clients (DESIGN principle 8), in process on a
free loopback port: a connection lives at most CONNECTION_SECONDS whatever it does
(here shortened), and no more than MAX_CONNECTIONS are open at once.

test ──TLS──▶ StsServer (127.0.0.1:random) ──▶ closed at the deadline / over the cap
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest

from postillon.dnsrecords import sts_server
from postillon.dnsrecords.records import mta_sts_policy
from postillon.dnsrecords.sts_server import StsServer
from support.https_server import make_tls_files

pytestmark = pytest.mark.integration


async def _started(tmp_path: Path) -> tuple[StsServer, ssl.SSLContext]:
    ca, cert, key = make_tls_files(tmp_path, ["mta-sts.example.org"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = StsServer("127.0.0.1:0", context, ["example.org"], mta_sts_policy("mx.example.org"))
    await server.bind()
    await server.start()
    return server, ssl.create_default_context(cafile=str(ca))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the server closed the connection (reads return EOF)."""
    start = time.monotonic()
    async with asyncio.timeout(seconds):
        while await reader.read(1024):
            pass
    return time.monotonic() - start


async def test_a_slow_client_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sts_server, "CONNECTION_SECONDS", 0.5)
    server, client = await _started(tmp_path)
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client, server_hostname="mta-sts.example.org"
        )
        # A request begun and never finished: the whole connection still ends on time.
        writer.write(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.exa")
        await writer.drain()
        assert await _closed_within(reader, 5.0) < 3.0
        writer.close()
    finally:
        await server.stop()


async def test_connections_over_the_cap_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sts_server, "MAX_CONNECTIONS", 2)
    server, client = await _started(tmp_path)
    try:
        held = [
            await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=client, server_hostname="mta-sts.example.org"
            )
            for _ in range(2)
        ]
        # The third gets through TCP and TLS, then is dropped without an answer.
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError)):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", server.port, ssl=client, server_hostname="mta-sts.example.org"
            )
            writer.write(
                b"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: mta-sts.example.org\r\n\r\n"
            )
            await writer.drain()
            answer = await reader.read()
            if not answer:
                raise ConnectionError("closed without an answer")
        # One closes: a new client is served again.
        held[0][1].close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=client, server_hostname="mta-sts.example.org"
        )
        writer.write(b"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: mta-sts.example.org\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.0 200 OK")
        writer.close()
        held[1][1].close()
    finally:
        await server.stop()
