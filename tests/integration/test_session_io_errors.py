"""A local I/O error in the middle of a session: 421 4.3.0 and a log line, not a
silent reset.

    asyncio client ──▶ Session (in process) ──▶ intake.begin ──X OSError(EIO)
                  ◀── 421 4.3.0, then close

The spool and queue paths answer 4xx themselves (test_storage_full.py); this is the
net under every other step that touches a disk.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import Any

import pytest

from postillon.checks.pipeline import Pipeline
from postillon.checks.relay import RelayPolicy
from postillon.checks.relay_check import RelayCheck
from postillon.config.model import DomainConfig, LimitsConfig
from postillon.core.clock import SystemClock
from postillon.inbound.session import Session, SessionDeps
from postillon.intake.intake import Intake, IntakeTransaction
from postillon.observability.maillog import null_maillog
from postillon.protocol.server import ServerSettings
from postillon.queue.memory_store import MemoryStore
from postillon.routing.local import LocalRecipients


class _BrokenDiskIntake(Intake):
    def begin(self, *args: Any, **kwargs: Any) -> IntakeTransaction:
        raise OSError(errno.EIO, "Input/output error")


async def test_local_io_error_is_421_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = LocalRecipients(
        [DomainConfig(name="example.org", mailboxes=("alice",))], {}, hostname="mx.test"
    )
    deps = SessionDeps(
        settings=ServerSettings("mx.test"),
        intake=_BrokenDiskIntake(MemoryStore(), "mx.test", tmp_path / "spool"),
        pipeline=Pipeline([RelayCheck(RelayPolicy(local, []))], SystemClock()),
        maillog=null_maillog(),
        limits=LimitsConfig(),
        listener="smtp",
    )

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await Session(deps, reader, writer).run()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await reader.readline()).startswith(b"220")
        writer.write(b"HELO client.test\r\nMAIL FROM:<bob@remote.test>\r\n")
        assert (await reader.readline()).startswith(b"250")
        with caplog.at_level(logging.WARNING, logger="postillon.inbound"):
            reply = await asyncio.wait_for(reader.readline(), 10)
            assert reply.startswith(b"421 4.3.0"), reply
            assert await reader.read() == b""  # then closed
        assert "local I/O error: [Errno 5] Input/output error" in caplog.text
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
