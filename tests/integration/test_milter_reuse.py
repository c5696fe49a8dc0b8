"""Milter connections reused across SMTP sessions (SMFIC_QUIT_NC, checks/milter_pool.py).

Against libmilter's reference implementation (pymilter): consecutive sessions share one
TCP connection when the milter answered the end of message "continue" (libmilter then
takes QUIT_NC and a new SMFIC_CONNECT), and do not after "accept" (libmilter would
silently ignore both). Against milters that drop idle connections: the next session
opens a fresh connection and its message gets the milter's verdict, never the
default_action."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from postillon.checks.context import ClientFacts
from postillon.checks.milter_check import MilterCheck
from postillon.checks.milter_socket import MilterSocket
from postillon.config.milter import MilterConfig
from support.milter_pipeline import milter_pipeline, run_session
from support.milters import ReferenceMilter

pytestmark = pytest.mark.integration

MESSAGE = b"From: a@example.net\r\nTo: alice@example.org\r\nX-Milter-Test: %s\r\n\r\nHello.\r\n"


@pytest.fixture(scope="module")
def reference() -> Iterator[ReferenceMilter]:
    with ReferenceMilter() as milter:
        yield milter


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every TCP connection the driver opens (host, port)."""
    opened: list[tuple[str, int]] = []
    real = MilterSocket.connection_made

    def counting(self: MilterSocket, transport: asyncio.BaseTransport) -> None:
        opened.append(transport.get_extra_info("peername")[:2])
        real(self, transport)

    monkeypatch.setattr(MilterSocket, "connection_made", counting)
    return opened


def client(n: int) -> ClientFacts:
    return ClientFacts(
        ip=f"192.0.2.{n}", port=40000 + n, listener="smtp:127.0.0.1:25", helo=f"c{n}.example"
    )


def check_of(pipeline: Any) -> MilterCheck:
    (check,) = [c for c in pipeline.checks if isinstance(c, MilterCheck)]
    return check


async def test_sessions_share_one_libmilter_connection(
    reference: ReferenceMilter, connects: list[tuple[str, int]]
) -> None:
    before = len(reference.records())
    config = MilterConfig(name="reference", address=reference.address, timeout=5)
    pipeline = milter_pipeline(config)
    for n in range(1, 6):
        run = await run_session(pipeline, MESSAGE % b"addheader", client=client(n))
        assert run.refused == ""
        assert run.message is not None and b"X-Reference" in run.message.header
    records = reference.wait_records(before + 5)
    # libmilter saw five sessions, each with its own connect information ...
    assert [r["macros"]["connect"]["{client_addr}"] for r in records[-5:]] == [
        f"192.0.2.{n}" for n in range(1, 6)
    ]
    # ... over one TCP connection.
    assert len(connects) == 1
    assert check_of(pipeline).pools["reference"].reused == 4
    check_of(pipeline).pools["reference"].close_all()


async def test_no_reuse_after_the_milter_accepted_the_message(
    reference: ReferenceMilter, connects: list[tuple[str, int]]
) -> None:
    """After SMFIR_ACCEPT at end of message libmilter ignores QUIT_NC (and the next
    CONNECT): the connection is closed with SMFIC_QUIT instead."""
    before = len(reference.records())
    pipeline = milter_pipeline(MilterConfig(name="reference", address=reference.address, timeout=5))
    for n in range(1, 4):
        run = await run_session(pipeline, MESSAGE % b"accept", client=client(n))
        assert run.refused == ""
    reference.wait_records(before + 3)
    assert len(connects) == 3
    assert check_of(pipeline).pools["reference"].reused == 0


# -- milters that drop idle connections -------------------------------------------------
async def _packet(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    return await reader.readexactly(length)


@contextlib.asynccontextmanager
async def dropping_milter(when: str) -> AsyncIterator[tuple[str, list[int]]]:
    """A version 6 milter answering "continue" to everything, that closes a connection
    either ``idle`` (0.1 s after an end of message) or on ``quit_nc`` (SMFIC_QUIT_NC
    arrives: the close races the MTA's reuse). Yields the address and, per connection,
    how many end-of-message packets it answered."""
    messages: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(messages)
        messages.append(0)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await _packet(reader)
            writer.write(struct.pack(">IcIII", 13, b"O", 6, 0x1FF, 0))
            while True:
                data = await _packet(reader)
                command = data[:1]
                if command in (b"Q",) or (command == b"K" and when == "quit_nc"):
                    break
                if command in (b"D", b"A", b"K"):
                    continue
                writer.write(struct.pack(">Ic", 1, b"c"))
                await writer.drain()
                if command == b"E":
                    messages[index] += 1
                    if when == "idle":
                        await asyncio.sleep(0.1)
                        break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"inet:127.0.0.1:{port}", messages
    finally:
        server.close()


@pytest.mark.parametrize("when", ["idle", "quit_nc"])
async def test_a_dropped_idle_connection_is_replaced_transparently(
    when: str, connects: list[tuple[str, int]]
) -> None:
    async with dropping_milter(when) as (address, messages):
        config = MilterConfig(name="dropper", address=address, timeout=2, default_action="reject")
        pipeline = milter_pipeline(config)
        for n in range(1, 4):
            run = await asyncio.wait_for(
                run_session(pipeline, MESSAGE % b"none", client=client(n)), 20
            )
            assert run.refused == ""  # never the default_action
            assert run.message is not None
            await asyncio.sleep(0.3)  # the "idle" milter has closed by now
        check_of(pipeline).pools["dropper"].close_all()
    assert len(connects) == 3
    assert messages == [1, 1, 1]  # each message reached the milter exactly once


async def test_reuse_always_on_libmilter_costs_a_timeout_never_a_verdict(
    reference: ReferenceMilter, connects: list[tuple[str, int]]
) -> None:
    """``reuse_connections = "always"`` against libmilter after an accept: libmilter
    ignores QUIT_NC and the CONNECT (the reason "auto" does not do this); the reused
    connection times out before its first answer, a fresh one is opened and the
    session's steps are sent again, so the message still gets the milter's verdict."""
    before = len(reference.records())
    config = MilterConfig(
        name="reference",
        address=reference.address,
        timeout=1,
        reuse_connections="always",
        default_action="reject",
    )
    pipeline = milter_pipeline(config)
    for n in range(1, 3):
        run = await run_session(pipeline, MESSAGE % b"accept", client=client(n))
        assert run.refused == ""
    records = reference.wait_records(before + 2)
    assert [r["macros"]["connect"]["{client_addr}"] for r in records[-2:]] == [
        "192.0.2.1",
        "192.0.2.2",
    ]
    # The second session took the idle connection, which failed over to a fresh one.
    assert check_of(pipeline).pools["reference"].reused == 1
    assert len(connects) == 2
    check_of(pipeline).pools["reference"].close_all()


async def test_reuse_never_closes_every_connection(
    reference: ReferenceMilter, connects: list[tuple[str, int]]
) -> None:
    config = MilterConfig(
        name="reference", address=reference.address, timeout=5, reuse_connections="never"
    )
    pipeline = milter_pipeline(config)
    for n in range(1, 3):
        run = await run_session(pipeline, MESSAGE % b"none", client=client(n))
        assert run.refused == ""
    assert len(connects) == 2
    assert check_of(pipeline).pools == {}
