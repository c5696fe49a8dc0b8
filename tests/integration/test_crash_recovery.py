"""kill -9 in the middle of a load: every message that got its 250 is
delivered exactly once after restart, none is lost.

    8 smtplib clients ──▶ postillon serve ──▶ queue ──▶ Maildir
                              X SIGKILL mid-load, then restart on the same data_dir
"""

from __future__ import annotations

import os
import re
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from support.server import ServerProcess

pytestmark = pytest.mark.integration

CLIENTS = 8
PER_CLIENT = 300  # 2,400 messages in all
KILL_AFTER = 800  # acknowledged messages before the SIGKILL


def test_kill_9_loses_nothing(make_server) -> None:  # type: ignore[no-untyped-def]
    server: ServerProcess = make_server().start()
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    acked: set[str] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def client(n: int) -> None:
        i = 0
        while i < PER_CLIENT and not killed.is_set():
            try:
                with smtplib.SMTP(host, int(port), timeout=10) as s:
                    while i < PER_CLIENT:
                        token = f"c{n}-m{i}"
                        body = f"Subject: crash {token}\r\nX-Token: {token}\r\n\r\n" + "x" * 4000
                        s.sendmail("load@sender.test", ["alice@example.org"], body)
                        with lock:
                            acked.add(token)
                        i += 1
            except (OSError, smtplib.SMTPException):
                if killed.is_set():
                    return
                time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    while len(acked) < KILL_AFTER:
        time.sleep(0.01)
    server.kill()
    killed.set()
    for t in threads:
        t.join(30)
    acked_at_kill = set(acked)

    server.start()
    deadline = time.monotonic() + 120
    tokens: Counter[str] = Counter()
    while time.monotonic() < deadline:
        tokens = Counter()
        for path in server.maildir_messages("alice@example.org"):
            m = re.search(rb"X-Token: (\S+)", path.read_bytes())
            assert m is not None
            tokens[m.group(1).decode()] += 1
        queued = server.cli("queue", "list", "--json").stdout
        if acked_at_kill <= set(tokens) and queued.strip() == "[]":
            break
        time.sleep(0.5)
    missing = acked_at_kill - set(tokens)
    duplicates = {t: c for t, c in tokens.items() if c > 1}
    print(
        f"acked before kill: {len(acked_at_kill)}, delivered: {len(tokens)}, "
        f"duplicates: {len(duplicates)}, missing: {len(missing)}"
    )
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    assert not duplicates, f"delivered twice: {duplicates}"


# -- a crash in the middle of a Maildir delivery ------------------------------------
#
#   smtplib ──▶ postillon ──▶ queue ──▶ Maildir  tmp/<key>.<host>   (X SIGKILL here)
#                   restart ──▶ queue ──▶ Maildir  new/<key>.<host>,S=<size>
#
# The queue's Maildir deliveries use a tmp/ name derived from the queue record, so the
# retry after the crash meets the file the killed attempt left. It must be recovered at
# once: the retry interval here is an hour, so a message that waited for it would
# never arrive within the poll.

HOUR = {"first_retry": 3600.0, "max_retry": 3600.0}


def _queued_record(server: ServerProcess) -> tuple[str, int, float]:
    """(queue id, record id, received_at) of the one queued message, read from the
    store while the server is down."""
    import asyncio

    from postillon.app import open_queue_store
    from postillon.config.loader import load_config

    async def read() -> tuple[str, int, float]:
        store = open_queue_store(load_config(server.config_path))
        try:
            (info,) = await store.list_messages()
            (record,) = info.records
            return info.queue_id, record.record_id, info.received_at
        finally:
            await store.close()

    return asyncio.run(read())


def _crash_during_delivery(make_server) -> tuple[ServerProcess, Path, Path]:  # type: ignore[no-untyped-def]
    """A server whose first delivery to alice was deferred, then killed with SIGKILL;
    returns it (stopped) with alice's Maildir and the tmp/ path of the queued record."""
    server: ServerProcess = make_server(queue=HOUR).start()
    box = server.data_dir / "mail" / "example.org" / "alice"
    box.mkdir(parents=True)
    # The first attempt fails before writing (new/ is a file), so the message is
    # queued with its record; the kill then lands where the retry would be writing.
    (box / "new").write_bytes(b"")
    host, _, port = server.config["listen"][0]["address"].rpartition(":")
    with smtplib.SMTP(host, int(port), timeout=10) as s:
        s.sendmail("carol@sender.test", ["alice@example.org"], "Subject: crash\r\n\r\nbody\r\n")
    assert "deferred" in server.wait_for_log("deferred"), server.maillog()
    server.kill()
    queue_id, record_id, received_at = _queued_record(server)
    (box / "new").unlink()
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(mode=0o700, exist_ok=True)
    tmp = box / "tmp" / f"{int(received_at)}.{queue_id}R{record_id}.mx.test.example"
    # The queue must offer it again now, as an expired lease after a crash would be.
    server.cli("queue", "flush")
    return server, box, tmp


def _wait_for_empty_queue(server: ServerProcess, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while (queued := server.cli("queue", "list", "--json").stdout.strip()) != "[]":
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return queued


def test_stale_maildir_tmp_file_does_not_wait_a_retry(make_server) -> None:  # type: ignore[no-untyped-def]
    server, box, tmp = _crash_during_delivery(make_server)
    tmp.write_bytes(b"Return-Path: <carol@sender.test>\nDelivered-To: alice@exa")  # cut short
    server.start()
    (path,) = server.wait_for_mail("alice@example.org", timeout=20)
    assert path.read_bytes().endswith(b"Subject: crash\n\nbody\n")
    assert list((box / "tmp").iterdir()) == []
    assert _wait_for_empty_queue(server) == "[]"


def test_message_linked_before_the_crash_is_not_delivered_again(make_server) -> None:  # type: ignore[no-untyped-def]
    # The kill came after the link into new/ and before the queue recorded the
    # delivery; since then the user's mail reader moved the message to cur/.
    server, box, tmp = _crash_during_delivery(make_server)
    content = b"Return-Path: <carol@sender.test>\nDelivered-To: alice@example.org\n\nbody\n"
    tmp.write_bytes(content)
    read = box / "cur" / f"{tmp.name},S={len(content)}:2,S"
    os.link(tmp, read)
    server.start()
    assert _wait_for_empty_queue(server) == "[]", server.maillog()[-2000:]
    assert ": delivered: " in server.maillog()
    assert list((box / "new").iterdir()) == []
    assert list((box / "tmp").iterdir()) == []
    assert list((box / "cur").iterdir()) == [read]
