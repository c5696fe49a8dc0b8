"""Intake when the disk fails under it: the spool during the body, the store at
commit. A full disk is 452 4.3.1 (the client tries later), other I/O errors
451 4.3.0; both are logged, and the client's next bytes are still taken (no
exception escapes ``write``: it would reset the client's connection)."""

from __future__ import annotations

import errno
import io
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from postillon.core.envelope import MailParams, RcptParams
from postillon.intake import intake as intake_module
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import Intake, IntakeError, IntakeTransaction
from postillon.observability.maillog import null_maillog
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import NewMessage, NewRecipient

STORAGE_FULL = (452, "4.3.1")
LOCAL_ERROR = (451, "4.3.0")
HEADER = b"From: a@x.example\r\nSubject: s\r\n\r\n"


class _FailingSpool:
    """A spool file whose disk fills up after ``room`` bytes."""

    def __init__(self, room: int, code: int) -> None:
        self._file = io.BytesIO()
        self._room = room
        self._code = code
        self.closed = False

    def write(self, data: bytes) -> int:
        if self._file.tell() + len(data) > self._room:
            raise OSError(self._code, "No space left on device")
        return self._file.write(data)

    def close(self) -> None:
        self.closed = True
        self._file.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def _intake(tmp_path: Path, events: list[tuple[str, dict[str, Any]]]) -> Intake:
    log = null_maillog()
    log.subscribe(lambda event, _qid, fields: events.append((event, fields)))
    return Intake(MemoryStore(), "mx.test", tmp_path, maillog=log)


def _begin(intake: Intake) -> IntakeTransaction:
    tx = intake.begin("a@x.example", MailParams(), ClientInfo(ip="192.0.2.1"))
    tx.add_recipient(NewRecipient("bob@y.example", RcptParams()))
    return tx


@pytest.mark.parametrize(
    ("code", "expected"),
    [(errno.ENOSPC, STORAGE_FULL), (errno.EDQUOT, STORAGE_FULL), (errno.EIO, LOCAL_ERROR)],
)
async def test_spool_write_failure_is_a_reply_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, expected: tuple[int, str]
) -> None:
    spools: list[_FailingSpool] = []

    def spool(**_: Any) -> _FailingSpool:
        spools.append(_FailingSpool(10_000, code))
        return spools[-1]

    monkeypatch.setattr(intake_module.tempfile, "SpooledTemporaryFile", spool)
    events: list[tuple[str, dict[str, Any]]] = []
    tx = _begin(_intake(tmp_path, events))
    tx.start_body()
    tx.write(HEADER)
    for _ in range(20):  # the client goes on sending after the disk filled up
        tx.write(b"x" * 998 + b"\r\n")
    assert tx.failure is not None
    assert (tx.failure.code, tx.failure.status) == expected
    assert spools[0].closed  # the space is given back at once
    assert tx.message_bytes() == b""
    with pytest.raises(IntakeError) as refused:
        await tx.commit()
    assert (refused.value.reply.code, refused.value.reply.status) == expected
    assert [e for e, _ in events] == ["error"]
    assert "spool write failed" in events[0][1]["reason"]


async def test_rewrite_header_failure_is_refused_at_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    tx = _begin(_intake(tmp_path, events))
    tx.start_body()
    tx.write(HEADER + b"body\r\n")
    monkeypatch.setattr(
        intake_module.tempfile, "SpooledTemporaryFile", lambda **_: _FailingSpool(0, errno.ENOSPC)
    )
    tx.rewrite_header(b"Authentication-Results: mx; none\r\n", HEADER[:-2])
    with pytest.raises(IntakeError) as refused:
        await tx.commit()
    assert (refused.value.reply.code, refused.value.reply.status) == STORAGE_FULL


async def test_database_full_at_commit_is_452(tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    intake = _intake(tmp_path, events)

    async def commit(message: NewMessage) -> None:
        full = sqlite3.OperationalError("database or disk is full")
        full.sqlite_errorcode = 13  # type: ignore[attr-defined]  # SQLITE_FULL
        raise full

    intake.store.commit = commit  # type: ignore[method-assign]
    tx = _begin(intake)
    tx.start_body()
    tx.write(HEADER + b"body\r\n")
    with pytest.raises(IntakeError) as refused:
        await tx.commit()
    assert (refused.value.reply.code, refused.value.reply.status) == STORAGE_FULL
    assert events[-1][0] == "error" and "452 4.3.1" in events[-1][1]["reply"]
