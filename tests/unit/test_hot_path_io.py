"""Hot-path I/O helpers (issue 19): the mail log's lean emit, the once-per-second
timestamps, and writes that skip the drain when the kernel took every byte."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from postillon.config.model import LogConfig
from postillon.intake.headers import ClientInfo, received_header
from postillon.observability.logtext import SafeFormatter
from postillon.observability.maillog import configure_logging
from postillon.osutil.streams import ReadDeadline, write_nowait, write_out


def test_mail_log_events_do_not_walk_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_file = tmp_path / "mail.log"
    maillog = configure_logging(LogConfig(format="text", file=log_file))

    def no_stack_walk(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("findCaller called for a mail log event")

    monkeypatch.setattr(logging.Logger, "findCaller", no_stack_walk)
    maillog.event("delivered", "QID1", to="a@b.example", relay="x, y", pct="100%")
    maillog.set_format("json")
    maillog.event("received", "QID2", size=5)
    lines = log_file.read_text().splitlines()
    assert lines[0].endswith("QID1: delivered: to=<a@b.example>, relay=(x, y), pct=100%")
    assert " postillon[" in lines[0]
    assert '"queue_id": "QID2"' in lines[1]


def test_log_timestamp_is_formatted_once_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    formatter = SafeFormatter("%(asctime)s %(message)s", "%b %d %H:%M:%S")
    calls = []
    real = logging.Formatter.formatTime

    def counting(self: logging.Formatter, record: logging.LogRecord, datefmt: str | None) -> str:
        calls.append(record.created)
        return real(self, record, datefmt)

    monkeypatch.setattr(logging.Formatter, "formatTime", counting)

    def record(at: float) -> logging.LogRecord:
        r = logging.LogRecord("postillon.mail", logging.INFO, "", 0, "m", (), None)
        r.created = at
        return r

    texts = [formatter.format(record(at)) for at in (1000.1, 1000.5, 1000.9, 1001.0)]
    assert len(calls) == 2  # one per second seen
    assert texts[0] == texts[1] == texts[2] != texts[3]


def test_received_header_date_is_the_seconds_date() -> None:
    client = ClientInfo(ip="192.0.2.1", helo="h.example")
    first = received_header(client, "mx.example", "Q1", "a@b.example", 1_800_000_000.2)
    again = received_header(client, "mx.example", "Q2", "a@b.example", 1_800_000_000.9)
    assert first.endswith(b"; Fri, 15 Jan 2027 08:00:00 GMT\r\n")
    assert again.endswith(b"; Fri, 15 Jan 2027 08:00:00 GMT\r\n")


async def test_write_skips_the_drain_only_when_everything_was_sent() -> None:
    server_side: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    connected = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_side.append((reader, writer))
        connected.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await connected.wait()
    try:
        # A small reply goes to the kernel whole: nothing to drain.
        assert write_nowait(writer, b"250 ok\r\n")
        assert await server_side[0][0].readexactly(8) == b"250 ok\r\n"
        # The peer does not read: the kernel buffers fill and the rest waits in the
        # transport, so the caller must drain (with its timeout).
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        assert not write_nowait(writer, b"x" * (8 * 1024 * 1024))
        drained = asyncio.ensure_future(write_out(writer, b"y"))
        await asyncio.sleep(0.05)
        assert not drained.done()  # waits for the peer, as drain() does
        peer_reader = server_side[0][0]
        total = 8 * 1024 * 1024 + 1
        while total:
            total -= len(await peer_reader.read(1 << 20))
        await asyncio.wait_for(drained, 10)
    finally:
        writer.close()
        server_side[0][1].close()
        server.close()
        await server.wait_closed()


async def test_read_deadline_one_timer_per_connection() -> None:
    reader = asyncio.StreamReader()
    reads = ReadDeadline(reader, 1024)
    loop = asyncio.get_running_loop()
    reader.feed_data(b"EHLO x\r\n")
    assert await reads.read(0.2) == b"EHLO x\r\n"  # the timer stays armed after it
    # A read that gets its data within its own deadline is not cut short, even when
    # an earlier read's timer fires meanwhile (it re-arms at the later deadline).
    await asyncio.sleep(0.1)
    loop.call_later(0.15, reader.feed_data, b"MAIL FROM:<a@b>\r\n")
    assert await reads.read(0.2) == b"MAIL FROM:<a@b>\r\n"
    # Idle between reads past a deadline: nothing happens to the connection.
    await asyncio.sleep(0.3)
    reader.feed_data(b"RCPT TO:<c@d>\r\n")
    assert await reads.read(0.2) == b"RCPT TO:<c@d>\r\n"
    # A read past its deadline raises TimeoutError.
    started = loop.time()
    with pytest.raises(TimeoutError):
        await reads.read(0.1)
    assert loop.time() - started >= 0.09
    reads.close()


async def test_read_deadline_close_leaves_no_timer() -> None:
    reader = asyncio.StreamReader()
    reads = ReadDeadline(reader, 1024)
    reader.feed_data(b"x")
    assert await reads.read(0.05) == b"x"
    reads.close()
    await asyncio.sleep(0.1)
    reader.feed_data(b"y")  # no exception was set by a timer left behind
    assert await reader.read(10) == b"y"
