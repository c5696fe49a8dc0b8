"""Intake's end-of-data hooks for the inbound checks: the message as received
(without our Received:), and the header section rewritten (results on top,
forged fields gone) before the commit."""

from __future__ import annotations

from pathlib import Path

from postillon.core.envelope import MailParams, RcptParams
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import Intake
from postillon.queue.memory_store import MemoryStore
from postillon.queue.store import NewRecipient

HEADER = b"From: a@x.example\r\nAuthentication-Results: mx; forged\r\nSubject: s\r\n"
BODY = b"\r\nline one\r\n" + b"x" * 300_000 + b"\r\n"  # spills the spool to disk


async def test_message_bytes_and_rewrite(tmp_path: Path) -> None:
    store = MemoryStore()
    intake = Intake(store, "mx", tmp_path)
    tx = intake.begin("a@x.example", MailParams(), ClientInfo(ip="192.0.2.1"))
    tx.add_recipient(NewRecipient("bob@y.example", RcptParams()))
    tx.start_body()
    for i in range(0, len(HEADER + BODY), 7000):  # arrives in pieces
        tx.write((HEADER + BODY)[i : i + 7000])
    assert tx.message_bytes() == HEADER + BODY
    assert tx.header_block == HEADER
    cleaned = b"From: a@x.example\r\nSubject: s\r\n"
    tx.rewrite_header(b"Authentication-Results: mx; spf=pass\r\n", cleaned)
    queue_id = await tx.commit()
    stored = b"".join([c async for c in store.read_body(queue_id)])
    assert stored.startswith(b"Authentication-Results: mx; spf=pass\r\nReceived: from ")
    assert stored.endswith(cleaned + BODY)
    assert b"forged" not in stored
    info = await store.get_message(queue_id)
    assert info is not None and info.size == len(stored)
