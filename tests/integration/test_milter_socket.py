"""The milter driver's socket (``checks/milter_socket.py``, an asyncio Protocol feeding the
sans-IO client) over real loopback sockets.

What the Protocol-based driver must keep from the stream-based one: steps the milter does
not answer (SMFIP_NR_*) are not waited for (no timer, no future); the batched write
carries exactly the bytes the protocol module produces step by step; a milter that goes
away while idle or resets mid-answer gives a failure at once, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import pytest

from postillon.checks.context import ClientFacts, SessionContext
from postillon.checks.milter_check import MilterCheck
from postillon.checks.milter_driver import MilterConnection
from postillon.checks.milter_socket import MilterSocket
from postillon.config.milter import MilterConfig
from postillon.protocol.milter import MilterClient
from postillon.protocol.milter_wire import Negotiated
from support.milter_pipeline import milter_pipeline, run_session

from .test_milter_batching import NR_ALL, recording_milter

pytestmark = pytest.mark.integration

FIELDS = [("From", " a@example.net"), ("Subject", " hi\r\n there")]
BODY = [b"body line\r\n" * 20]
EOH_MACROS = {"i": "Q1"}
EOM_MACROS = {"i": "Q1"}
OPTNEG_ANSWER = struct.pack(">IcIII", 13, b"O", 6, 0, NR_ALL)  # rspamd-like: NR everywhere


def _steps() -> list[tuple[str, dict[str, object]]]:
    """The envelope of one session as (MilterClient method, keyword arguments)."""
    return [
        ("connect", {"hostname": "client.example", "address": "192.0.2.1", "port": 40000,
                     "macros": {"j": "mx.example.org", "{client_addr}": "192.0.2.1"}}),
        ("helo", {"name": "client.example", "macros": {}}),
        ("mail", {"sender": "<a@example.net>", "args": ["SIZE=10"], "macros": {"i": "Q1"}}),
        ("rcpt", {"recipient": "<b@example.org>", "macros": {"{rcpt_addr}": "b@example.org"}}),
        ("data", {"macros": {"i": "Q1"}}),
    ]  # fmt: skip


async def _envelope(conn: MilterConnection) -> None:
    for method, kwargs in _steps():
        outcome = await conn.step(lambda c, m=method, k=kwargs: getattr(c, m)(**k))
        assert outcome.kind == "continue", outcome


def _one_step_at_a_time() -> bytes:
    """What the protocol module produces for the same session, drained after every step
    (as a driver that wrote each command at once would send it)."""
    client = MilterClient()
    client.start()
    client.data_to_send()
    client.receive_data(OPTNEG_ANSWER)
    assert isinstance(client.next_event(), Negotiated)
    out = b""
    for method, kwargs in _steps():
        getattr(client, method)(**kwargs)
        out += client.data_to_send()
    for name, value in FIELDS:
        client.header(name, value)
        out += client.data_to_send()
    client.end_of_headers(macros=EOH_MACROS)
    client.body(BODY[0])
    client.end_of_message(macros=EOM_MACROS)
    return out + client.data_to_send()


async def test_unanswered_steps_arm_no_timer_and_await_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[str] = []
    arms: list[str] = []
    real_wait, real_arm = MilterSocket.wait, MilterSocket.arm

    async def counting_wait(self: MilterSocket) -> None:
        waits.append(phase)
        await real_wait(self)

    def counting_arm(self: MilterSocket, when: float) -> None:
        arms.append(phase)
        real_arm(self, when)

    monkeypatch.setattr(MilterSocket, "wait", counting_wait)
    monkeypatch.setattr(MilterSocket, "arm", counting_arm)
    async with recording_milter(no_reply=True) as (_milter, address):
        conn = MilterConnection("rec", address, timeout=5)
        phase = "open"
        assert not (await conn.open()).failed
        phase = "envelope"
        await _envelope(conn)
        phase = "message"
        outcome = await conn.message(FIELDS, BODY, EOH_MACROS, EOM_MACROS)
        assert outcome.kind == "accept"
        await conn.close()
    assert "envelope" not in waits and "envelope" not in arms
    assert arms == ["open", "message"]  # one timer per answer: OPTNEG, end of message


async def test_the_batched_write_carries_the_same_bytes() -> None:
    received = bytearray()

    async def milter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 + 13)  # the negotiation
        writer.write(OPTNEG_ANSWER)
        while True:
            header = await reader.readexactly(4)
            (length,) = struct.unpack(">I", header)
            packet = await reader.readexactly(length)
            received.extend(header + packet)
            if packet[:1] == b"E":
                writer.write(struct.pack(">Ic", 1, b"a"))
                await writer.drain()
                break
        writer.close()

    server = await asyncio.start_server(milter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = MilterConnection("bytes", f"inet:127.0.0.1:{port}", timeout=5)
        assert not (await conn.open()).failed
        await _envelope(conn)
        assert (await conn.message(FIELDS, BODY, EOH_MACROS, EOM_MACROS)).kind == "accept"
        await conn.close()
    finally:
        server.close()
        await server.wait_closed()
    assert bytes(received) == _one_step_at_a_time()


async def test_a_milter_gone_while_idle_fails_the_next_answer_at_once() -> None:
    closed = asyncio.Event()

    async def milter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 + 13)
        writer.write(struct.pack(">IcIII", 13, b"O", 6, 0, 0))  # answers every step
        await writer.drain()
        writer.close()
        closed.set()

    server = await asyncio.start_server(milter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = MilterConnection("gone", f"inet:127.0.0.1:{port}", timeout=30)
        assert not (await conn.open()).failed
        await closed.wait()
        for _ in range(50):  # until the loop has seen the end of the connection
            if not conn.still_open_while_idle():
                break
            await asyncio.sleep(0.01)
        assert not conn.still_open_while_idle()
        async with asyncio.timeout(5):  # far below the milter's 30 s timeout
            outcome = await conn.step(lambda c: c.connect("c.example", "192.0.2.1", 1))
        assert outcome.failed
        assert not conn.is_open
    finally:
        server.close()
        await server.wait_closed()


async def test_a_reset_during_the_answer_is_reported_as_such() -> None:
    async def milter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 + 13)
        writer.write(struct.pack(">IcIII", 13, b"O", 6, 0, 0))
        await writer.drain()
        await reader.read(1)  # SMFIC_CONNECT has arrived: reset instead of answering
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(milter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        conn = MilterConnection("reset", f"inet:127.0.0.1:{port}", timeout=30)
        assert not (await conn.open()).failed
        async with asyncio.timeout(5):
            outcome = await conn.step(lambda c: c.connect("c.example", "192.0.2.1", 1))
        assert outcome.failed
        assert "Reset" in outcome.failed or "closed" in outcome.failed, outcome.failed
    finally:
        server.close()
        await server.wait_closed()


async def test_a_quiet_connect_milter_is_opened_while_the_greeting_goes_out() -> None:
    """After one negotiation with NR_CONN, the next session's connect phase does not
    wait for the milter's connection and OPTNEG answer; HELO does, and the message
    still gets the milter's verdict. A milter that is gone by then gets its
    default_action at MAIL, as a failure at connect does."""
    release = asyncio.Event()
    negotiations = 0

    async def milter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal negotiations
        await reader.readexactly(4 + 13)
        negotiations += 1
        if negotiations > 1:
            await release.wait()  # the second session's OPTNEG answer is held back
        writer.write(OPTNEG_ANSWER)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                command = (await reader.readexactly(length))[:1]
                if command == b"E":
                    writer.write(struct.pack(">Ic", 1, b"a"))
                elif command == b"Q":
                    break
        writer.close()

    server = await asyncio.start_server(milter, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = MilterConfig(name="quiet", address=f"inet:127.0.0.1:{port}", timeout=5)
    pipeline = milter_pipeline(config)
    (check,) = pipeline.checks
    assert isinstance(check, MilterCheck)
    raw = b"From: a@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    try:
        first = await run_session(pipeline, raw)
        assert first.refused == "" and "quiet" in check.quiet_connect
        # Second session: connect returns while the milter still holds its answer back.
        s = SessionContext("S2", ClientFacts(ip="192.0.2.7", port=1, listener="smtp:x"))
        async with asyncio.timeout(2):
            verdict = await pipeline.connect(s)
        assert verdict.reply is None and negotiations <= 2
        release.set()
        await pipeline.close(s)
        second = await run_session(pipeline, raw)
        assert second.refused == "" and second.message is not None
    finally:
        server.close()
        await server.wait_closed()
    # The milter is gone: the background open fails, and MAIL gets default_action.
    third = await run_session(pipeline, raw)
    assert third.refused.startswith("451 4.7.1"), third.refused
