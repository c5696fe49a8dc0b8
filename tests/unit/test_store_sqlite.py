"""SqliteStore beyond the common contract: group commit, failure isolation,
several processes on one file, and durability across SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from postillon.core.envelope import MailParams
from postillon.core.reply import Reply
from postillon.core.tlsrpt import TlsResultCount
from postillon.queue.sqlite_store import SCHEMA_VERSION, SqliteStore
from postillon.queue.store import (
    DeliveryState,
    NewMessage,
    NewRecipient,
    OutcomeUpdate,
    QueueEvent,
    StoreError,
)

T0 = 1_800_000_000.0


def message(queue_id: str, body: bytes = b"hello\r\n", rcpts: int = 1) -> NewMessage:
    return NewMessage(
        queue_id=queue_id,
        sender="s@example.org",
        mail_params=MailParams(),
        recipients=[NewRecipient(f"r{i}@example.net") for i in range(rcpts)],
        body=io.BytesIO(body),
        size=len(body),
        received_at=T0,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "queue.db", clock_now=lambda: T0)
    yield s
    await s.close()


class Gate:
    """Blocks the writer thread inside a transaction until opened, so that the
    operations submitted meanwhile form one batch."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.task: asyncio.Future[None] | None = None

    def _block(self, conn: sqlite3.Connection) -> None:
        self.entered.set()
        self.opened.wait(10)

    async def __aenter__(self) -> Gate:
        self.task = asyncio.ensure_future(self.store._write(self._block))
        assert await asyncio.to_thread(self.entered.wait, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.opened.set()
        assert self.task is not None
        with contextlib.suppress(StoreError):  # a test may make the gate's COMMIT fail too
            await self.task


async def read_all(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def settle() -> None:
    """Let every ready task run up to its first real wait (its submission)."""
    for _ in range(5):
        await asyncio.sleep(0)


class ExplodingBody(io.BytesIO):
    def read(self, size: int | None = -1, /) -> bytes:
        if self.tell() > 0:
            raise OSError("spool disk vanished")
        return super().read(size)


# ---------------------------------------------------------------- group commit


async def test_concurrent_commits_share_batches(store: SqliteStore) -> None:
    async with Gate(store):
        tasks = [asyncio.ensure_future(store.commit(message(f"QG{i:03d}"))) for i in range(50)]
        await settle()
    await asyncio.gather(*tasks)
    stats = store.stats()
    assert stats["ops"] == 51
    assert stats["batches"] == 2  # the gate's, and one for all 50 commits
    assert len(await store.list_messages()) == 50


async def test_bookkeeping_commits_without_the_wal_fsync(store: SqliteStore) -> None:
    # A message commit is durable (fsync'd before the 250); its claim and its
    # outcome are bookkeeping (lazy_batches: COMMIT without the WAL fsync). A
    # batch mixing both is durable, and after a lazy batch the next message
    # commit is again durable. Without durable=False every batch would fsync.
    await store.commit(message("QL1"))
    assert store.stats()["lazy_batches"] == 0
    [record] = await store.claim_due(T0 + 1, 10, 60, "node")
    await store.record_outcomes(
        [
            OutcomeUpdate(
                record.record_id,
                record.lease_token or "",
                DeliveryState.DELIVERED,
                Reply(250, "2.0.0", ("ok",)),
                0,
                T0 + 1,
            )
        ]
    )
    assert store.stats()["lazy_batches"] == 2
    await store.commit(message("QL2"))
    async with Gate(store):
        claim = asyncio.ensure_future(store.claim_due(T0 + 1, 10, 60, "node"))
        commit = asyncio.ensure_future(store.commit(message("QL3")))
        await settle()
    await asyncio.gather(claim, commit)
    stats = store.stats()
    assert stats["lazy_batches"] == 2
    assert stats["batches"] == 6  # commit, claim, outcome, commit, gate, claim + commit
    with sqlite3.connect(store.path) as conn:  # what the claim and outcome wrote is there
        assert conn.execute("SELECT count(*) FROM messages").fetchone() == (2,)


async def test_a_big_batch_spans_several_multi_row_inserts(store: SqliteStore) -> None:
    # 600 messages x 10 recipients: 36,000 record values, more than one INSERT may bind
    async with Gate(store):
        tasks = [
            asyncio.ensure_future(store.commit(message(f"QBIG{i:04d}", body=b"%d" % i, rcpts=10)))
            for i in range(600)
        ]
        await settle()
    await asyncio.gather(*tasks)
    assert store.stats()["batches"] == 2
    assert (await store.count_by_state())["pending"] == 6000
    assert b"".join([c async for c in store.read_body("QBIG0599")]) == b"599"


async def test_a_mixed_batch(store: SqliteStore) -> None:
    """Small and large bodies, a claim and a clash on a queue id in one batch."""
    await store.commit(message("QDUE", rcpts=2))
    large = os.urandom(2 * 1024 * 1024)  # too big to join the multi-row INSERTs
    async with Gate(store):
        small = [asyncio.ensure_future(store.commit(message(f"QS{i}"))) for i in range(3)]
        big = asyncio.ensure_future(store.commit(message("QLARGE", body=large)))
        claim = asyncio.ensure_future(store.claim_due(T0, 10, 60, "r"))
        first = asyncio.ensure_future(store.commit(message("QTWICE", body=b"one")))
        second = asyncio.ensure_future(store.commit(message("QTWICE", body=b"two")))
        await settle()
    await asyncio.gather(*small, big, first)
    with pytest.raises(StoreError, match="duplicate"):
        await second
    claimed = await claim
    assert {r.queue_id for r in claimed} <= {"QDUE", "QS0", "QS1", "QS2", "QLARGE", "QTWICE"}
    assert "QDUE" in {r.queue_id for r in claimed}
    assert b"".join([c async for c in store.read_body("QLARGE")]) == large
    assert b"".join([c async for c in store.read_body("QTWICE")]) == b"one"
    assert len(await store.list_messages()) == 6


async def test_a_failing_op_fails_only_its_caller(store: SqliteStore) -> None:
    await store.commit(message("QEXISTS", body=b"original"))
    before = store.stats()
    async with Gate(store):
        good = [asyncio.ensure_future(store.commit(message(f"QOK{i}"))) for i in range(5)]
        exploding = message("QBOOM", rcpts=3)
        exploding = NewMessage(**{**_fields(exploding), "body": ExplodingBody(b"x" * 600_000)})
        bad_body = asyncio.ensure_future(store.commit(exploding))
        duplicate = asyncio.ensure_future(store.commit(message("QEXISTS", body=b"impostor")))
        good += [asyncio.ensure_future(store.commit(message(f"QOK{i}"))) for i in range(5, 10)]
        await settle()
    results = await asyncio.gather(*good, bad_body, duplicate, return_exceptions=True)
    assert results[:10] == [None] * 10
    assert isinstance(results[10], OSError)
    assert isinstance(results[11], StoreError)
    after = store.stats()
    assert after["batches"] - before["batches"] == 2
    assert after["failed_ops"] - before["failed_ops"] == 2
    # the failed ops left nothing behind, the others are all there
    assert await store.get_message("QBOOM") is None
    with pytest.raises(KeyError):
        b"".join([c async for c in store.read_body("QBOOM")])
    assert b"".join([c async for c in store.read_body("QEXISTS")]) == b"original"
    ids = [m.queue_id for m in await store.list_messages()]
    assert ids == ["QEXISTS"] + [f"QOK{i}" for i in range(10)]
    assert (await store.count_by_state())["pending"] == 11


def _fields(m: NewMessage) -> dict[str, Any]:
    return {f: getattr(m, f) for f in NewMessage.__slots__}


async def test_a_single_failing_op_is_rolled_back(store: SqliteStore) -> None:
    bad = NewMessage(**{**_fields(message("QALONE")), "body": ExplodingBody(b"y" * 600_000)})
    with pytest.raises(OSError):
        await store.commit(bad)
    assert await store.get_message("QALONE") is None
    assert await store.count_by_state() == {s.value: 0 for s in DeliveryState}
    await store.commit(message("QAFTER"))
    assert await store.get_message("QAFTER") is not None


class FailingCommit(sqlite3.Connection):
    fail = False

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if FailingCommit.fail and sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return super().execute(sql, *args)


async def test_a_failed_commit_fails_the_whole_batch(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "queue.db")
    store._writer.factory = FailingCommit
    try:
        await store.commit(message("QBEFORE"))
        FailingCommit.fail = True
        async with Gate(store):
            tasks = [asyncio.ensure_future(store.commit(message(f"QLOST{i}"))) for i in range(8)]
            await settle()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results), results
        assert [m.queue_id for m in await store.list_messages()] == ["QBEFORE"]
        FailingCommit.fail = False
        await store.commit(message("QAFTER"))
        assert [m.queue_id for m in await store.list_messages()] == ["QAFTER", "QBEFORE"]
    finally:
        FailingCommit.fail = False
        await store.close()


async def test_a_cancelled_caller_does_not_disturb_the_batch(store: SqliteStore) -> None:
    async with Gate(store):
        keep = asyncio.ensure_future(store.commit(message("QKEEP")))
        gone = asyncio.ensure_future(store.commit(message("QGONE")))
        await settle()
        gone.cancel()
    await keep
    with pytest.raises(asyncio.CancelledError):
        await gone
    # At-least-once: the op had been handed to the writer, so it is committed.
    assert [m.queue_id for m in await store.list_messages()] == ["QGONE", "QKEEP"]


async def test_close_finishes_submitted_work(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "queue.db")
    tasks = [asyncio.ensure_future(store.commit(message(f"QC{i:03d}"))) for i in range(100)]
    await settle()
    await store.close()
    await asyncio.gather(*tasks)
    with pytest.raises(StoreError):
        await store.commit(message("QLATE"))
    reopened = SqliteStore(tmp_path / "queue.db")
    try:
        assert len(await reopened.list_messages()) == 100
    finally:
        await reopened.close()


async def test_close_without_any_write(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "queue.db")
    assert await store.next_due() is None
    await store.close()
    await store.close()


async def test_a_writer_that_cannot_start_fails_its_callers(tmp_path: Path) -> None:
    class Unopenable(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise sqlite3.OperationalError("unable to open database file (injected)")

    store = SqliteStore(tmp_path / "queue.db")
    store._writer.factory = Unopenable
    with pytest.raises(StoreError):
        await store.commit(message("QX"))
    with pytest.raises(StoreError):
        await store.commit(message("QY"))
    await store.close()


# ---------------------------------------------------------------- readers beside the writer


async def test_readers_do_not_wait_for_the_writer(store: SqliteStore) -> None:
    await store.commit(message("QREAD", body=b"z" * 700_000))
    async with Gate(store):  # the writer sits inside an open write transaction
        info = await asyncio.wait_for(store.get_message("QREAD"), 5)
        assert info is not None
        assert await asyncio.wait_for(store.next_due(), 5) == T0
        body = await asyncio.wait_for(read_all(store.read_body("QREAD")), 5)
        assert body == b"z" * 700_000


async def test_body_deleted_while_read_raises_instead_of_truncating(store: SqliteStore) -> None:
    body = os.urandom(900_000)  # four chunks
    await store.commit(message("QSNAP", body=body))
    chunks = store.read_body("QSNAP")
    await anext(chunks)
    assert await store.delete("QSNAP") is True
    with pytest.raises(StoreError, match="deleted"):
        await read_all(chunks)


async def test_a_slow_body_reader_does_not_pin_the_wal(store: SqliteStore, tmp_path: Path) -> None:
    body = os.urandom(900_000)
    await store.commit(message("QSLOW", body=body))
    chunks = store.read_body("QSLOW")
    got = await anext(chunks)  # a delivery to a slow peer, paused between chunks
    for i in range(20):
        await store.commit(message(f"QMORE{i:02d}", body=b"m" * 10_000))
    conn = sqlite3.connect(tmp_path / "queue.db")
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0  # the WAL could be checkpointed and reset to zero
    finally:
        conn.close()
    assert got + await read_all(chunks) == body


async def test_abandoned_body_iterator_returns_its_connection(store: SqliteStore) -> None:
    await store.commit(message("QABANDON", body=b"a" * 600_000))
    for _ in range(20):
        it = store.read_body("QABANDON")
        await anext(it)
        assert isinstance(it, AsyncGenerator)
        await it.aclose()  # what the event loop does with a dropped async generator
    assert await store.delete("QABANDON") is True  # no reader snapshot blocks anything


async def test_writer_waits_for_another_process_lock(store: SqliteStore, tmp_path: Path) -> None:
    await store.commit(message("QFIRST"))
    other = sqlite3.connect(tmp_path / "queue.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. the CLI in the middle of `queue hold`
    commit = asyncio.ensure_future(store.commit(message("QWAITS")))
    await asyncio.sleep(0.3)
    assert not commit.done()
    other.execute("COMMIT")
    other.close()
    await asyncio.wait_for(commit, 5)
    assert await store.get_message("QWAITS") is not None


# ---------------------------------------------------------------- schema and file


async def test_file_schema_and_pragmas(store: SqliteStore, tmp_path: Path) -> None:
    await store.commit(message("QSCHEMA"))
    path = tmp_path / "queue.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds mail
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        plan = " ".join(
            str(row[3])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT record_id FROM records"
                " WHERE state IN ('pending', 'deferred') AND next_try <= ?"
                " ORDER BY next_try LIMIT ?",
                (T0, 10),
            )
        )
        assert "records_due" in plan and "TEMP B-TREE" not in plan  # no sort of the backlog
        plan = " ".join(
            str(row[3])
            for row in conn.execute(
                "EXPLAIN QUERY PLAN SELECT record_id FROM records"
                " WHERE state = 'leased' AND lease_expires <= ? ORDER BY lease_expires LIMIT ?",
                (T0, 10),
            )
        )
        assert "records_leased" in plan
    finally:
        conn.close()


async def test_reopening_keeps_everything(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "queue.db")
    await first.commit(message("QREOPEN", body=b"body", rcpts=2))
    await first.close()
    second = SqliteStore(tmp_path / "queue.db")
    try:
        info = await second.get_message("QREOPEN")
        assert info is not None and len(info.records) == 2
        assert b"".join([c async for c in second.read_body("QREOPEN")]) == b"body"
    finally:
        await second.close()


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(path)


async def test_version_1_queue_gains_the_history_table(tmp_path: Path) -> None:
    """A queue written by a postillon before the history existed opens and keeps its mail."""
    path = tmp_path / "queue.db"
    store = SqliteStore(path)
    await store.commit(message("QOLD"))
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE events")
    conn.execute("DROP TABLE nodes")
    conn.execute("DROP TABLE sts_policies")
    _drop_tls_report_tables(conn)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    try:
        assert await store.get_message("QOLD") is not None
        await store.add_events([QueueEvent("QOLD", T0, "received", {})])
        assert [e.event for e in await store.events("QOLD")] == ["received"]
        await store.heartbeat("me", T0)  # and the heartbeats of version 3
    finally:
        await store.close()


async def test_version_2_queue_gains_the_heartbeats(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    store = SqliteStore(path)
    await store.commit(message("QOLD"))
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE nodes")
    conn.execute("DROP TABLE sts_policies")
    _drop_tls_report_tables(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    try:
        assert await store.get_message("QOLD") is not None
        await store.heartbeat("me", T0)
        assert await store.release_dead_owners(T0 + 60, 30.0) == 0
    finally:
        await store.close()


def _drop_tls_report_tables(conn: sqlite3.Connection) -> None:
    conn.execute("DROP TABLE tls_results")
    conn.execute("DROP TABLE tls_report_claims")
    _drop_version_9(conn)


def _drop_version_9(conn: sqlite3.Connection) -> None:
    """Back to version 8: no shaping tables, no record priority."""
    conn.execute("DROP TABLE suspensions")
    conn.execute("DROP TABLE shaping_buckets")
    conn.execute("DROP INDEX records_due_priority")
    conn.execute("ALTER TABLE records DROP COLUMN priority")


async def test_version_8_queue_gains_shaping_and_priority(tmp_path: Path) -> None:
    """A version-8 queue upgrades to 9, keeps its mail, and claims by priority after."""
    path = tmp_path / "queue.db"
    store = SqliteStore(path)
    await store.commit(message("QOLD"))
    await store.close()
    conn = sqlite3.connect(path)
    _drop_version_9(conn)
    conn.execute("PRAGMA user_version = 8")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    try:
        assert await store.get_message("QOLD") is not None
        await store.commit(replace(message("QNEW"), priority=5))
        claimed = await store.claim_due(T0 + 10, 1, 60, "me")
        assert [r.queue_id for r in claimed] == ["QNEW"]
    finally:
        await store.close()


async def test_version_3_queue_gains_the_tls_report_tables(tmp_path: Path) -> None:
    """A queue of main before MTA-STS and TLS reporting (version 3) upgrades to 5 and
    keeps its mail; the counters work after it."""
    path = tmp_path / "queue.db"
    store = SqliteStore(path)
    await store.commit(message("QOLD"))
    await store.close()
    conn = sqlite3.connect(path)
    _drop_tls_report_tables(conn)
    conn.execute("DROP TABLE sts_policies")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    try:
        assert await store.get_message("QOLD") is not None
        row = TlsResultCount("2027-01-15", "example.net", "no-policy-found", (), "success")
        await store.tls_reports.add([row])
        assert await store.tls_reports.day("2027-01-15") == [row]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 9
    conn.close()


async def test_version_7_queue_gains_the_policy_state_tables(tmp_path: Path) -> None:
    """A queue before greylisting, shared rate counters and DMARC reports (version 7)
    upgrades to the latest and keeps its mail; greylisting works after it."""
    from postillon.queue.store import GreylistPolicy

    path = tmp_path / "queue.db"
    store = SqliteStore(path)
    await store.commit(message("QOLD"))
    await store.close()
    conn = sqlite3.connect(path)
    for table in ("greylist_triplets", "greylist_clients", "rate_counters", "dmarc_results"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("DROP TABLE dmarc_report_claims")
    _drop_version_9(conn)
    conn.execute("PRAGMA user_version = 7")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    try:
        assert await store.get_message("QOLD") is not None
        grey = await store.policy_state.greylist.check("n", "", "r@x", 1.0, GreylistPolicy(1, 9))
        assert grey.status == "new"
    finally:
        await store.close()


# ---------------------------------------------------------------- several processes

CHILD_PRELUDE = textwrap.dedent(
    """
    import asyncio, hashlib, io, sys, time
    from postillon.core.envelope import MailParams
    from postillon.queue.sqlite_store import SqliteStore
    from postillon.queue.store import NewMessage, NewRecipient

    def body_for(qid):
        seed = hashlib.sha256(qid.encode()).digest()
        return seed * (1 + seed[0] * 97)  # 32 B .. ~790 KB: one to four chunks

    def message(qid, rcpts=2):
        body = body_for(qid)
        return NewMessage(
            queue_id=qid, sender="s@example.org", mail_params=MailParams(),
            recipients=[NewRecipient(f"r{i}@example.net") for i in range(rcpts)],
            body=io.BytesIO(body), size=len(body), received_at=time.time(),
        )
    """
)


def body_for(qid: str) -> bytes:
    seed = hashlib.sha256(qid.encode()).digest()
    return seed * (1 + seed[0] * 97)


def run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_second_store_on_the_same_file(store: SqliteStore, tmp_path: Path) -> None:
    other = SqliteStore(tmp_path / "queue.db")  # what the CLI does while the server runs
    try:
        await store.commit(message("QSHARED", rcpts=2))
        info = await other.get_message("QSHARED")
        assert info is not None and len(info.records) == 2
        assert await other.hold("QSHARED", T0) == 2
        assert [r.state for r in (await store.get_message("QSHARED")).records] == [  # type: ignore[union-attr]
            DeliveryState.HELD,
            DeliveryState.HELD,
        ]
        assert await store.claim_due(T0 + 10, 10, 60, "server") == []
        assert await other.release("QSHARED", T0 + 1) == 2
        assert len(await store.claim_due(T0 + 10, 10, 60, "server")) == 2
    finally:
        await other.close()


async def test_another_process_holds_while_the_server_commits(
    store: SqliteStore, tmp_path: Path
) -> None:
    path = tmp_path / "queue.db"
    await store.commit(message("QTARGET", rcpts=3))
    stop = asyncio.Event()

    async def keep_committing() -> int:
        n = 0
        while not stop.is_set():
            await store.commit(message(f"QBUSY{n:05d}"))
            n += 1
        return n

    busy = asyncio.ensure_future(keep_committing())
    cli = await asyncio.to_thread(
        run_child,
        """
        async def main():
            store = SqliteStore(sys.argv[1])
            try:
                info = await store.get_message("QTARGET")
                print("seen", len(info.records))
                print("held", await store.hold("QTARGET", time.time()))
            finally:
                await store.close()
        asyncio.run(main())
        """,
        str(path),
    )
    stop.set()
    committed = await busy
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.split() == ["seen", "3", "held", "3"]
    info = await store.get_message("QTARGET")
    assert info is not None and {r.state for r in info.records} == {DeliveryState.HELD}
    assert committed > 0
    assert (await store.count_by_state())["pending"] == committed


def test_processes_creating_the_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    start_at = time.time() + 1.0
    code = textwrap.dedent(
        """
        while time.time() < float(sys.argv[2]):
            pass
        async def main():
            store = SqliteStore(sys.argv[1])
            await store.commit(message(f"QPROC{sys.argv[3]}"))
            await store.close()
        asyncio.run(main())
        print("ok")
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD_PRELUDE + code, str(path), str(start_at), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "ok"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        ids = sorted(r[0] for r in conn.execute("SELECT queue_id FROM messages"))
        assert ids == [f"QPROC{i}" for i in range(6)]
    finally:
        conn.close()


# ---------------------------------------------------------------- durability


def test_committed_messages_survive_sigkill(tmp_path: Path) -> None:
    """A child commits from 16 tasks and prints each id once commit() returned;
    we kill -9 it mid-stream. Every printed id must be there, whole."""
    path = tmp_path / "queue.db"
    code = textwrap.dedent(
        """
        async def main():
            store = SqliteStore(sys.argv[1])
            async def worker(w):
                n = 0
                while True:
                    qid = f"W{w:02d}N{n:06d}"
                    await store.commit(message(qid))
                    sys.stdout.write(f"committed {qid}\\n")
                    sys.stdout.flush()
                    n += 1
            await asyncio.gather(*(worker(w) for w in range(16)))
        asyncio.run(main())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + code, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    printed: list[str] = []
    try:
        for line in proc.stdout:
            printed.append(line.split()[1])
            if len(printed) >= 400:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
    printed += [line.split()[1] for line in rest.splitlines() if line.startswith("committed ")]
    assert proc.returncode == -signal.SIGKILL
    assert len(printed) >= 400, err

    async def check() -> None:
        store = SqliteStore(path)
        try:
            for qid in printed:
                info = await store.get_message(qid)
                assert info is not None, qid
                assert [r.recipient for r in info.records] == ["r0@example.net", "r1@example.net"]
                assert b"".join([c async for c in store.read_body(qid)]) == body_for(qid), qid
            # and nothing half-written: every stored message is whole
            for info in await store.list_messages(limit=100_000):
                assert len(info.records) == 2
                assert b"".join([c async for c in store.read_body(info.queue_id)]) == body_for(
                    info.queue_id
                )
        finally:
            await store.close()

    asyncio.run(check())


async def test_a_dead_writer_makes_the_store_unhealthy_for_good(store: SqliteStore) -> None:
    class Killed(BaseException):
        pass

    def explode(conn: sqlite3.Connection) -> None:
        raise Killed("a bug in the writer thread")

    await store.commit(message("QBEFORE"))
    assert store.health().ok
    with pytest.raises(StoreError, match="writer failed"):
        await store._write(explode)
    health = store.health()
    assert not health.ok and not health.recoverable
    assert "writer thread died" in health.reason
    with pytest.raises(StoreError):
        await store.commit(message("QAFTER"))
