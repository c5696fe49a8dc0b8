"""The milter driver sends steps the milter does not answer (SMFIP_NR_*) together with
the next answered one, over a real loopback socket (``checks/milter_driver.py``).

A recording milter on 127.0.0.1 notes every read. With rspamd's negotiation (no reply
on every step but end of message) nothing after the negotiation reaches it before end of
message, and then every command arrives, in order; an abort goes out at once; a milter
that answers every step still gets (and answers) each one as it happens; and while one
conversation waits for its milter, others on the same event loop go on.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from postillon.checks.milter_driver import MilterConnection
from postillon.protocol.milter import MilterClient

NR_ALL = 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x20000 | 0x40000 | 0x80000 | 0x80
ANSWERED = set(b"CHMRTLNBU")


@dataclass
class Recorder:
    no_reply: bool
    commands: list[bytes] = field(default_factory=list)  # command letters, in order
    reads: int = 0  # reads with data after the negotiation

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if self.commands:  # the negotiation was the first command
                    self.reads += 1
                buffer += data
                while len(buffer) >= 4:
                    (length,) = struct.unpack(">I", buffer[:4])
                    if len(buffer) < 4 + length:
                        break
                    command, buffer = buffer[4:5], buffer[4 + length :]
                    self.commands.append(command)
                    if command == b"O":
                        protocol = NR_ALL if self.no_reply else 0
                        writer.write(struct.pack(">IcIII", 13, b"O", 6, 0, protocol))
                    elif command == b"E":
                        writer.write(struct.pack(">Ic", 1, b"a"))
                    elif command[0] in ANSWERED and not self.no_reply:
                        writer.write(struct.pack(">Ic", 1, b"c"))
                await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def recording_milter(no_reply: bool) -> AsyncIterator[tuple[Recorder, str]]:
    recorder = Recorder(no_reply)
    server = await asyncio.start_server(recorder.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield recorder, f"inet:127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def _envelope(conn: MilterConnection) -> None:
    for step in (
        lambda c: c.connect("client.example", "192.0.2.1", 40000),
        lambda c: c.helo("client.example"),
        lambda c: c.mail("<a@example.net>"),
        lambda c: c.rcpt("<b@example.org>"),
        lambda c: c.data(),
    ):
        outcome = await conn.step(step)
        assert outcome.kind == "continue", outcome


async def _settle() -> None:
    await asyncio.sleep(0.1)  # let the milter's side read anything that was sent


async def test_unanswered_steps_go_out_with_end_of_message() -> None:
    async with recording_milter(no_reply=True) as (milter, address):
        conn = MilterConnection("rec", address, timeout=5)
        assert not (await conn.open()).failed
        await _envelope(conn)
        await _settle()
        assert milter.commands == [b"O"]  # nothing yet: no reply was due
        fields = [("From", "a@example.net"), ("Subject", "hi")]
        outcome = await conn.message(fields, [b"body\r\n"], {}, {})
        assert outcome.kind == "accept"
        await conn.close()
        await _settle()
        assert b"".join(milter.commands) == b"OCHMRTLLNBEQ"
        assert milter.reads <= 2  # the message in one write, then QUIT


async def test_abort_is_sent_at_once_with_what_waited() -> None:
    async with recording_milter(no_reply=True) as (milter, address):
        conn = MilterConnection("rec", address, timeout=5)
        assert not (await conn.open()).failed
        await conn.step(lambda c: c.connect("client.example", "192.0.2.1", 40000))
        await conn.step(lambda c: c.mail("<a@example.net>"))
        await conn.abort()
        await _settle()
        assert b"".join(milter.commands) == b"OCMA"
        await conn.close()


async def test_a_milter_that_answers_gets_every_step_as_it_happens() -> None:
    async with recording_milter(no_reply=False) as (milter, address):
        conn = MilterConnection("rec", address, timeout=5)
        assert not (await conn.open()).failed
        await _envelope(conn)
        assert b"".join(milter.commands) == b"OCHMRT"
        outcome = await conn.message([("Subject", "hi")], [b"body\r\n"], {}, {})
        assert outcome.kind == "accept"
        await conn.close()


async def test_large_unanswered_output_is_not_held_back() -> None:
    # A body of several chunks with no reply due streams out before end of message.
    async with recording_milter(no_reply=True) as (milter, address):
        conn = MilterConnection("rec", address, timeout=5)
        assert not (await conn.open()).failed
        await _envelope(conn)
        for _ in range(3):
            await conn.step(lambda c: c.body(b"x" * 65535))
        await _settle()
        assert milter.commands.count(b"B") >= 1
        assert (await conn.step(lambda c: c.end_of_message())).kind == "accept"
        await conn.close()


def test_pending_output_counts_queued_octets() -> None:
    client = MilterClient()
    assert client.pending_output == 0
    client.start()
    assert client.pending_output > 0
    client.data_to_send()
    assert client.pending_output == 0


async def test_a_milter_round_trip_does_not_block_the_event_loop() -> None:
    # One session waits on a milter that never answers end of message; meanwhile another
    # session's whole message goes through a milter that does, on the same loop.
    stalled = asyncio.Event()

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 + 13)  # the negotiation
        writer.write(struct.pack(">IcIII", 13, b"O", 6, 0, NR_ALL))
        await writer.drain()
        while await reader.read(65536):
            stalled.set()  # end of message has arrived, and no answer will come
        writer.close()

    server = await asyncio.start_server(stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with recording_milter(no_reply=True) as (_milter, address):
            slow = MilterConnection("slow", f"inet:127.0.0.1:{port}", timeout=30)
            fast = MilterConnection("fast", address, timeout=5)
            assert not (await slow.open()).failed and not (await fast.open()).failed
            await _envelope(slow)
            waiting = asyncio.ensure_future(slow.message([("Subject", "a")], [b"x\r\n"], {}, {}))
            await stalled.wait()
            await _envelope(fast)
            outcome = await fast.message([("Subject", "b")], [b"y\r\n"], {}, {})
            assert outcome.kind == "accept"
            assert not waiting.done()  # the first is still waiting for its answer
            waiting.cancel()
            await fast.close()
    finally:
        server.close()
        await server.wait_closed()
