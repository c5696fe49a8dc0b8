"""A 10 MiB message never sits whole in the server's memory (issue 19, target 5).

    client process ──SMTP──▶ App in this process (checks: SPF, DKIM streamed, DMARC)
      (DKIM-signed,              │ spool → SQLite queue (chunks) → runner
       10 MiB)                   └──SMTP (smarthost)──▶ smtp-sink (dumps to disk)

The server runs in the test's process so that ``tracemalloc`` sees every allocation
it makes, in every thread (session, intake spool, the checks' hashing thread, the
SQLite writer, the reader threads, the outbound session); the client and the sink are
other processes. The peak of traced memory while one 10 MiB message is accepted,
checked, stored and relayed must stay far below the message's size: any step that
reads the body whole again (a ``read()`` of the spool, a ``b"".join`` of the chunks, a
cache of the body) fails this test.
"""

from __future__ import annotations

import asyncio
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from dkim_tools import rsa_key_and_record, txt_rdata
from postillon.app import App
from postillon.config.loader import load_config
from postillon.queue.store import QueueStore
from postillon.testing.dns_server import DnsServer
from sink_fixtures import Sink
from support.server import default_config, to_toml

pytestmark = pytest.mark.integration

MESSAGE_SIZE = 10 * 1024 * 1024
PEAK_LIMIT = 2 * 1024 * 1024  # what the server may hold at once for it, at most

# The client: builds the signed message (in its own memory, not ours) and sends it.
CLIENT = r"""
import smtplib, sys
import dkim
port, size, key_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
line = b"0123456789 abcdefghij  klmnopqrstuvwxyz\tABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n"
head = (b"From: Big <big@big.test>\r\nTo: <rcpt@remote.test>\r\nSubject: big one\r\n"
        b"Message-ID: <big@big.test>\r\nDate: Mon, 07 Dec 2026 02:00:00 +0000\r\n\r\n")
message = head + line * ((size - len(head)) // len(line))
signature = dkim.sign(message, b"sel", b"big.test", open(key_path, "rb").read(),
                      include_headers=[b"from", b"to", b"subject", b"message-id", b"date"])
with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
    s.ehlo("client.big.test")
    s.mail("big@big.test", ["SIZE=%d" % (len(signature) + len(message))])
    s.rcpt("rcpt@remote.test")
    code, reply = s.data(signature + message)
print(code, reply.decode())
"""


async def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _dumped(sink: Sink) -> list[Path]:
    return [p for p in sink.dump.rglob("*") if p.is_file()]


async def test_a_10_mib_message_is_relayed_in_bounded_memory(
    tmp_path: Path, sink: Callable[..., Sink]
) -> None:
    pem, record = rsa_key_and_record()
    key_path = tmp_path / "sel.pem"
    key_path.write_bytes(pem)
    zones = {
        "big.test": {
            "@": {"TXT": '"v=spf1 ip4:127.0.0.1 -all"'},
            "sel._domainkey.big.test": {"TXT": txt_rdata(record.decode())},
            "_dmarc.big.test": {"TXT": '"v=DMARC1; p=reject"'},
        }
    }
    relay_to = sink()
    with DnsServer(zones) as dns:
        root = tmp_path / "srv"
        root.mkdir()
        config = default_config(
            root,
            relay={
                "trusted_networks": ["127.0.0.0/8"],
                "smarthost": f"smtp://127.0.0.1:{relay_to.port}",
            },
            dns={"nameservers": [dns.nameserver], "timeout": 2.0, "attempts": 1},
            # On, and for these relay clients too, so DKIM/DMARC run on the big message.
            authentication={"enabled": True, "check_trusted_networks": True},
            helper_processes=0,
        )
        (root / "postillon.toml").write_text(to_toml(config))
        app = App(load_config(root / "postillon.toml"))
        await app.start()
        try:
            port = int(config["listen"][0]["address"].rpartition(":")[2])
            # A small message first: what loads once (the public suffix list for
            # DMARC, the CA bundle for outbound TLS) is not the big message's cost.
            await _send(port, 20_000, key_path)
            await _wait_for(lambda: len(_dumped(relay_to)) == 1, 60, "the first message")
            assert app.store is not None
            await _wait_for_empty(app.store)
            tracemalloc.start()
            try:
                baseline = tracemalloc.get_traced_memory()[0]
                await _send(port, MESSAGE_SIZE, key_path)
                await _wait_for(lambda: len(_dumped(relay_to)) == 2, 120, "the big message")
                await _wait_for_empty(app.store)
                peak = tracemalloc.get_traced_memory()[1] - baseline
            finally:
                tracemalloc.stop()
        finally:
            await app.stop()
    dump = max(_dumped(relay_to), key=lambda p: p.stat().st_size)
    text = dump.read_bytes()
    assert len(text) > MESSAGE_SIZE * 9 // 10, len(text)  # the dump has LF line ends
    assert b"dkim=pass" in text and b"dmarc=pass" in text, text[:2000]
    assert peak < PEAK_LIMIT, f"peak traced memory {peak / 1048576:.1f} MiB for a 10 MiB message"


async def _send(port: int, size: int, key_path: Path) -> None:
    """Run the client process (the message is built in its memory, not ours)."""
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        str(port),
        str(size),
        str(key_path),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(client.communicate(), 120)
    assert out.startswith(b"250 "), out


async def _wait_for_empty(store: QueueStore) -> None:
    """The message left the queue (delivered: its records final, its body deleted)."""
    deadline = time.monotonic() + 60
    while await store.list_messages():
        if time.monotonic() > deadline:
            raise AssertionError("the message is still queued")
        await asyncio.sleep(0.05)
