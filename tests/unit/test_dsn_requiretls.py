"""Notices about a REQUIRETLS message (RFC 8689 §5): queued with REQUIRETLS, and
only the header section returned even when RET=FULL was asked."""

from __future__ import annotations

from pathlib import Path

from postillon.core.envelope import DsnRet, MailParams, RcptParams
from postillon.core.reply import Reply
from postillon.dsn.bounce import DsnRecipient, returns_full_message
from postillon.dsn.notify import queue_notice
from postillon.intake.intake import Intake
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import NewMessage, NewRecipient

FAILED = Reply.of(550, "5.7.10", "REQUIRETLS: certificate not verified")
ORIGINAL = b"Subject: secret\r\n\r\nthe secret body\r\n"


def test_requiretls_returns_headers_only() -> None:
    assert returns_full_message(MailParams(ret=DsnRet.FULL), 100, "failed")
    assert not returns_full_message(MailParams(ret=DsnRet.FULL, requiretls=True), 100, "failed")
    assert not returns_full_message(MailParams(requiretls=True), 100, "failed")


async def _notice_for(tmp_path: Path, params: MailParams) -> tuple[MailParams, bytes]:
    import io

    store = MemoryStore()
    await store.commit(
        NewMessage(
            queue_id="QORIG",
            sender="alice@example.org",
            mail_params=params,
            recipients=(NewRecipient("bob@example.net"),),
            body=io.BytesIO(ORIGINAL),
            size=len(ORIGINAL),
            received_at=0.0,
            client="",
            source="smtp",
        )
    )
    info = await store.get_message("QORIG")
    assert info is not None
    intake = Intake(store, "mx.test", tmp_path)
    notice = [DsnRecipient("bob@example.net", None, RcptParams(), FAILED)]
    qid = await queue_notice(store, intake, "mx.test", info, notice, 0.0)
    dsn = await store.get_message(qid)
    assert dsn is not None and dsn.sender == ""
    body = b"".join([c async for c in store.read_body(qid)])
    return dsn.mail_params, body


async def test_notice_queued_with_requiretls(tmp_path: Path) -> None:
    params, body = await _notice_for(tmp_path, MailParams(ret=DsnRet.FULL, requiretls=True))
    assert params.requiretls is True
    assert b"Subject: secret" in body and b"the secret body" not in body
    assert b"Status: 5.7.10" in body


async def test_notice_for_plain_message_has_no_requiretls(tmp_path: Path) -> None:
    params, body = await _notice_for(tmp_path, MailParams(ret=DsnRet.FULL))
    assert params.requiretls is False
    assert b"the secret body" in body
