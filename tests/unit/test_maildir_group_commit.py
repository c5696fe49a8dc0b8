"""Maildir group commit: concurrent deliveries into one mailbox share the fsync of new/,
and none of them is reported delivered before an fsync of new/ that followed its link.

    thread A: write tmp/a, fsync, link new/a --+
    thread B: write tmp/b, fsync, link new/b --+--> DirectorySync.sync(new/) --> Delivered
    thread C: ...                             --+    (one fsync may cover A, B and C)

Also: a crash between the link and that fsync (``stage`` without ``commit``) neither
loses nor duplicates the message, and a failed fsync of new/ unlinks every file of the
batch it should have covered. No wall-clock assertions: threads are ordered with events.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path

import pytest

from postillon.core.envelope import MailParams, RcptParams
from postillon.core.outcome import Delivered, TempFail
from postillon.delivery.transport import DeliveryJob
from postillon.local import dirsync
from postillon.local.dirsync import DirectorySync
from postillon.local.maildir import MaildirDelivery
from postillon.local.transport import MaildirTransport
from postillon.queue.store import DeliveryRecord, DeliveryState, MessageInfo
from postillon.routing.router import Route

ADDRESS = "alice@example.org"
KEY = "1700000000.Q1R1"
BODY = [b"Subject: group\r\n\r\n", b"the whole body\r\n"]


@pytest.fixture
def maildir(tmp_path: Path) -> MaildirDelivery:
    return MaildirDelivery(tmp_path / "mail", hostname="mx.example.org")


def _files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


class _GatedFsync:
    """os.fsync stand-in: records what each call synced and, for directories, blocks
    the first call until released, so other threads pile up behind it."""

    def __init__(self) -> None:
        self.real = os.fsync
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.blocked_once = False

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        with self.lock:
            self.calls.append(path)
            block = os.path.isdir(path) and not self.blocked_once
            self.blocked_once = self.blocked_once or block
        if block:
            self.entered.set()
            assert self.release.wait(10)
        self.real(fd)


def test_directory_sync_shares_one_fsync_between_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _GatedFsync()
    monkeypatch.setattr(os, "fsync", gate)
    sync = DirectorySync()
    done: list[int] = []

    def caller(n: int) -> None:
        sync.sync(tmp_path)
        done.append(n)

    first = threading.Thread(target=caller, args=(0,))
    first.start()
    assert gate.entered.wait(10)  # thread 0's fsync is running (and blocked)
    others = [threading.Thread(target=caller, args=(n,)) for n in range(1, 9)]
    for t in others:
        t.start()
    # The eight late callers take their tickets after thread 0's fsync started: that
    # fsync does not cover them, so none may return before a second one.
    for _ in range(10_000):
        if sync._states[tmp_path].issued == 9:
            break
        time.sleep(0.001)
    assert sync._states[tmp_path].issued == 9
    assert done == []
    gate.release.set()
    for t in [first, *others]:
        t.join(10)
    assert sorted(done) == list(range(9))
    # thread 0's own fsync, then one fsync for all eight waiters
    assert gate.calls.count(str(tmp_path)) == 2
    assert sync.fsyncs == 2
    assert sync._states == {}  # nothing kept once nobody syncs


def test_directory_sync_error_is_raised_to_each_caller_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]
    real = os.fsync

    def failing(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    sync = DirectorySync()
    with pytest.raises(OSError):
        sync.sync(tmp_path)
    sync.sync(tmp_path)  # the next caller runs its own fsync, which succeeds
    assert calls[0] == 2
    assert sync._states == {}


def test_stage_links_but_is_not_durable_until_commit(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    maildir.deliver(ADDRESS, [b"\r\nfirst\r\n"], return_path="")  # creates the Maildir
    monkeypatch.setattr(os, "fsync", fsync)
    box = maildir.mailbox_path(ADDRESS)
    staged = [maildir.stage(ADDRESS, BODY, return_path="", delivery_key=f"K{i}") for i in range(5)]
    assert str(box / "new") not in synced  # linked, file fsync'd, new/ not yet
    assert len([p for p in synced if Path(p).parent == box / "tmp"]) == 5
    outcomes = maildir.commit(staged)
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert synced.count(str(box / "new")) == 1  # one fsync of new/ for all five
    assert _files(box / "tmp") == []


def test_failed_directory_fsync_unlinks_the_whole_batch(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob = "bob@example.org"
    maildir.deliver(ADDRESS, [b"\r\nfirst\r\n"], return_path="")
    maildir.deliver(bob, [b"\r\nfirst\r\n"], return_path="")
    alice_new = maildir.mailbox_path(ADDRESS) / "new"
    before = set(_files(alice_new))
    staged = [maildir.stage(ADDRESS, BODY, return_path="", delivery_key=f"A{i}") for i in range(3)]
    staged.append(maildir.stage(bob, BODY, return_path="", delivery_key="B0"))
    real = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(alice_new):
            raise OSError(errno.EIO, "I/O error")
        real(fd)

    monkeypatch.setattr(dirsync.os, "fsync", fsync)
    outcomes = maildir.commit(staged)
    monkeypatch.undo()
    assert [type(o) for o in outcomes] == [TempFail, TempFail, TempFail, Delivered]
    assert all(o.reply.code == 451 for o in outcomes[:3])
    assert set(_files(alice_new)) == before  # nothing unconfirmed left visible
    assert len(_files(maildir.mailbox_path(bob) / "new")) == 2


def test_crash_between_link_and_directory_fsync_delivers_once(
    maildir: MaildirDelivery,
) -> None:
    # The first attempt linked its file and died before new/ was fsync'd (stage without
    # commit, so the queue never heard): the retry with the same key must neither lose
    # the message nor put a second copy in new/.
    first = maildir.stage(ADDRESS, BODY, return_path="", delivery_key=KEY)
    assert isinstance(first.outcome, Delivered)
    retry = maildir.deliver(ADDRESS, BODY, return_path="", delivery_key=KEY)
    assert isinstance(retry, Delivered), retry
    box = maildir.mailbox_path(ADDRESS)
    (path,) = _files(box / "new")
    assert path.read_bytes().endswith(b"Subject: group\n\nthe whole body\n")
    assert _files(box / "tmp") == []


def test_partial_tmp_file_is_never_counted_as_delivered(maildir: MaildirDelivery) -> None:
    # A crash while writing tmp/ (before the link): nothing in new/; the retry writes
    # the whole message afresh and only that complete copy becomes visible.
    maildir.deliver(ADDRESS, [b"\r\nfirst\r\n"], return_path="")
    box = maildir.mailbox_path(ADDRESS)
    before = set(_files(box / "new"))
    stale = box / "tmp" / f"{KEY}.mx.example.org"
    stale.write_bytes(b"Return-Path: <>\nDelivered-To: alice@example.org\nSubj")
    outcome = maildir.deliver(ADDRESS, BODY, return_path="", delivery_key=KEY)
    assert isinstance(outcome, Delivered)
    (new,) = set(_files(box / "new")) - before
    assert new.read_bytes().endswith(b"Subject: group\n\nthe whole body\n")
    assert new.name == f"{KEY}.mx.example.org,S={new.stat().st_size}"
    assert _files(box / "tmp") == []


class _AllMailboxes:
    def mailbox_exists(self, address: str) -> bool:
        return True


def _job(n: int) -> DeliveryJob:
    record = DeliveryRecord(
        n, f"Q{n}", ADDRESS, None, RcptParams(), DeliveryState.LEASED, 0, 0.0, None, "t", "me", 0, 0
    )
    info = MessageInfo(f"Q{n}", "s@x.test", MailParams(), 40, 1700000000.0, "", "", ())
    body = f"Subject: m{n}\r\n\r\nbody {n}\r\n".encode()
    route = Route("maildir", "maildir", "example.org")
    return DeliveryJob(info, (record,), route, store=None, cached_body=body)  # type: ignore[arg-type]


def test_transport_concurrent_deliveries_are_complete_and_synced(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync
    lock = threading.Lock()

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        real(fd)
        with lock:
            synced.append(path)

    monkeypatch.setattr(os, "fsync", fsync)
    transport = MaildirTransport(maildir, _AllMailboxes())  # type: ignore[arg-type]

    async def run() -> list[object]:
        results = await asyncio.gather(*(transport.deliver(_job(n)) for n in range(40)))
        return [o for outcomes in results for o in outcomes]

    outcomes = asyncio.run(run())
    assert all(isinstance(o, Delivered) for o in outcomes), outcomes
    box = maildir.mailbox_path(ADDRESS)
    files = _files(box / "new")
    assert len(files) == 40
    for n in range(40):  # every message whole, under its queue-derived name
        (path,) = [f for f in files if f.name.startswith(f"1700000000.Q{n}R{n}.")]
        assert path.read_bytes().endswith(f"Subject: m{n}\n\nbody {n}\n".encode())
    assert _files(box / "tmp") == []
    file_syncs = [p for p in synced if Path(p).parent == box / "tmp"]
    assert len(file_syncs) == 40  # each file fsync'd (before its link: test_maildir)
    assert 1 <= synced.count(str(box / "new")) <= 40
    # the last fsync of new/ came after the last file was linked
    assert synced[-1] == str(box / "new")
