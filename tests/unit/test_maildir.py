"""Maildir delivery: file content, CRLF -> LF, durability order, names, loops, disk errors.

message chunks --> MaildirDelivery.deliver --> <root>/<domain>/<local>/tmp/<name>
                                                 | fsync, link
                                                 v
                                               new/<name>,S=<size>  (+ fsync new/)
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postillon.core.outcome import Delivered, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.local import maildir as maildir_module
from postillon.local.maildir import DELIVERED, MaildirDelivery, MaildirPathError, _CrlfToLf

DELIVERED_OK = Reply.of(250, "2.0.0", "delivered to maildir")
MAILBOX_UNAVAILABLE = (550, "5.1.1")
STORAGE_FULL = (452, "4.2.2")
LOCAL_ERROR = (451, "4.3.0")
FORWARDING_LOOP = (554, "5.4.6")

ADDRESS = "alice@example.org"


@pytest.fixture
def maildir(tmp_path: Path) -> MaildirDelivery:
    return MaildirDelivery(tmp_path / "mail", hostname="mx.example.org")


def _box(maildir: MaildirDelivery, address: str = ADDRESS) -> Path:
    return maildir.mailbox_path(address)


def _files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


def _only_message(maildir: MaildirDelivery, address: str = ADDRESS) -> Path:
    box = _box(maildir, address)
    (path,) = _files(box / "new")
    assert _files(box / "tmp") == []
    return path


def test_delivers_with_trace_headers(maildir: MaildirDelivery) -> None:
    body = [b"Subject: hi\r\n", b"From: bob@remote.test\r\n\r\n", b"Hello\r\n", b".\r\n"]
    outcome = maildir.deliver(ADDRESS, body, return_path="bob@remote.test")
    assert isinstance(outcome, Delivered)
    assert outcome.reply == DELIVERED == DELIVERED_OK
    path = _only_message(maildir)
    assert outcome.detail == str(path)
    assert path.read_bytes() == (
        b"Return-Path: <bob@remote.test>\n"
        b"Delivered-To: alice@example.org\n"
        b"Subject: hi\nFrom: bob@remote.test\n\nHello\n.\n"
    )
    assert path.name.endswith(f",S={path.stat().st_size}")
    assert path.parent == maildir.root / "example.org" / "alice" / "new"


def test_original_recipient_and_null_sender(maildir: MaildirDelivery) -> None:
    outcome = maildir.deliver(
        ADDRESS,
        [b"Subject: x\r\n\r\nbody\r\n"],
        return_path="",
        original_recipient="sales@example.org",
    )
    assert isinstance(outcome, Delivered)
    assert _only_message(maildir).read_bytes() == (
        b"Return-Path: <>\n"
        b"X-Original-To: sales@example.org\n"
        b"Delivered-To: alice@example.org\n"
        b"Subject: x\n\nbody\n"
    )


@pytest.mark.parametrize(
    ("return_path", "line"),
    [
        ("<a@b.test>", b"Return-Path: <a@b.test>"),  # given with brackets: not doubled
        (" a@b.test ", b"Return-Path: <a@b.test>"),
        ("<>", b"Return-Path: <>"),
        ("a@b.test\r\nBcc: x@evil.test", b"Return-Path: <a@b.test??Bcc: x@evil.test>"),
    ],
)
def test_return_path_forms(maildir: MaildirDelivery, return_path: str, line: bytes) -> None:
    maildir.deliver(ADDRESS, [b"\r\n"], return_path=return_path)
    assert _only_message(maildir).read_bytes().split(b"\n")[0] == line


def test_no_header_injection_through_addresses(maildir: MaildirDelivery) -> None:
    maildir.deliver(ADDRESS, [b"\r\n"], return_path="", original_recipient="x@y.test\nBcc: z")
    lines = _only_message(maildir).read_bytes().split(b"\n")
    assert lines[1] == b"X-Original-To: x@y.test?Bcc: z"


def test_modes(maildir: MaildirDelivery) -> None:
    old = os.umask(0o022)
    try:
        maildir.deliver(ADDRESS, [b"\r\n"], return_path="")
    finally:
        os.umask(old)
    box = _box(maildir)
    for directory in (maildir.root, box.parent, box, box / "tmp", box / "new", box / "cur"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(_only_message(maildir).stat().st_mode) == 0o600


CRLF_CASES: list[tuple[str, list[bytes], bytes]] = [
    ("crlf", [b"a\r\nb\r\n"], b"a\nb\n"),
    ("cr at chunk end", [b"a\r", b"\nb"], b"a\nb"),
    ("cr alone in a chunk", [b"a", b"\r", b"\n", b"b"], b"a\nb"),
    ("empty chunks between", [b"a\r", b"", b"", b"\nb"], b"a\nb"),
    ("bare cr kept", [b"a\rb"], b"a\rb"),
    ("bare cr at chunk end kept", [b"a\r", b"b"], b"a\rb"),
    ("bare lf kept", [b"a\nb"], b"a\nb"),
    ("cr cr lf", [b"a\r", b"\r", b"\n"], b"a\r\n"),
    ("cr at message end kept", [b"a\r"], b"a\r"),
    ("lf cr", [b"a\n\r", b"b"], b"a\n\rb"),
    ("no chunks", [], b""),
]


@pytest.mark.parametrize(
    ("chunks", "expected"), [c[1:] for c in CRLF_CASES], ids=[c[0] for c in CRLF_CASES]
)
def test_crlf_to_lf(maildir: MaildirDelivery, chunks: list[bytes], expected: bytes) -> None:
    outcome = maildir.deliver(ADDRESS, chunks, return_path="s@x.test")
    assert isinstance(outcome, Delivered)
    content = _only_message(maildir).read_bytes()
    header = b"Return-Path: <s@x.test>\nDelivered-To: alice@example.org\n"
    assert content == header + expected


@given(st.binary(max_size=200), st.lists(st.integers(min_value=0, max_value=200), max_size=10))
def test_crlf_conversion_is_chunking_invariant(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    convert = _CrlfToLf()
    out = b"".join(convert.feed(c) for c in chunks) + convert.flush()
    assert out == data.replace(b"\r\n", b"\n")


def test_large_body_streams(maildir: MaildirDelivery) -> None:
    line = b"x" * 998 + b"\r\n"
    chunks = [line * 64 for _ in range(50)]  # 3.2 MB in 64 KB chunks, beyond every buffer
    outcome = maildir.deliver(ADDRESS, iter(chunks), return_path="s@x.test")
    assert isinstance(outcome, Delivered)
    content = _only_message(maildir).read_bytes()
    assert content.endswith(b"x" * 998 + b"\n")
    assert content.count(b"\n") == 2 + 64 * 50
    assert b"\r" not in content


def test_durability_order(maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("link", str(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    # First delivery creates directories (and fsyncs their parents); look at the second.
    maildir.deliver(ADDRESS, [b"\r\nfirst\r\n"], return_path="")
    events.clear()
    outcome = maildir.deliver(ADDRESS, [b"\r\nsecond\r\n"], return_path="")
    assert isinstance(outcome, Delivered)
    box = _box(maildir)
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "link", "fsync"]
    assert Path(events[0][1]).parent == box / "tmp"  # the file, before it is visible
    assert Path(events[1][1]).parent == box / "new"
    assert Path(events[2][1]) == box / "new"  # then the directory entry


def test_new_directories_are_made_durable(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    maildir.deliver(ADDRESS, [b"\r\n"], return_path="")
    box = _box(maildir)
    for parent in (maildir.root, box.parent, box):
        assert str(parent) in synced


def test_unique_names_under_concurrency(maildir: MaildirDelivery) -> None:
    errors: list[object] = []

    def worker(n: int) -> None:
        for i in range(50):
            outcome = maildir.deliver(ADDRESS, [f"\r\n{n}-{i}\r\n".encode()], return_path="")
            if not isinstance(outcome, Delivered):
                errors.append(outcome)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    box = _box(maildir)
    files = _files(box / "new")
    assert len(files) == 400
    assert len({p.read_bytes() for p in files}) == 400
    assert _files(box / "tmp") == []
    names = {maildir._unique_name() for _ in range(10_000)}
    assert len(names) == 10_000


def test_name_format(maildir: MaildirDelivery) -> None:
    name = maildir._unique_name()
    sec, rest = name.split(".", 1)
    assert sec.isdigit()
    assert rest.startswith("M") and f"P{os.getpid()}Q" in rest
    assert name.endswith(".mx.example.org")
    odd = MaildirDelivery(maildir.root, hostname="a/b:c,d")
    assert odd._unique_name().endswith(".a\\057b\\072c\\054d")


LOOP_CASES: list[tuple[str, list[bytes]]] = [
    ("exact", [b"Delivered-To: alice@example.org\r\nSubject: x\r\n\r\nbody\r\n"]),
    ("case and brackets", [b"Subject: x\r\nDELIVERED-TO:  <ALICE@Example.ORG> \r\n\r\nbody\r\n"]),
    (
        "split across chunks",
        [b"Subject: x\r\nDelivered-", b"To: alice@exa", b"mple.org\r", b"\n\r\n"],
    ),
    ("folded", [b"Delivered-To:\r\n alice@example.org\r\n\r\nbody\r\n"]),
    ("no body, no final newline", [b"Delivered-To: alice@example.org"]),
    (
        "second of several",
        [b"Delivered-To: bob@example.org\r\nDelivered-To: alice@example.org\r\n\r\n"],
    ),
]


@pytest.mark.parametrize("chunks", [c[1] for c in LOOP_CASES], ids=[c[0] for c in LOOP_CASES])
def test_forwarding_loop(maildir: MaildirDelivery, chunks: list[bytes]) -> None:
    outcome = maildir.deliver(ADDRESS, chunks, return_path="s@x.test")
    assert isinstance(outcome, PermFail)
    assert (outcome.reply.code, outcome.reply.status) == FORWARDING_LOOP
    assert outcome.reply.text == "mail forwarding loop for alice@example.org"
    box = _box(maildir)
    assert _files(box / "new") == []
    assert _files(box / "tmp") == []


NOT_A_LOOP: list[tuple[str, list[bytes]]] = [
    ("other address", [b"Delivered-To: bob@example.org\r\n\r\nbody\r\n"]),
    ("prefix of address", [b"Delivered-To: alice@example.org.evil\r\n\r\n"]),
    ("in the body", [b"Subject: x\r\n\r\nDelivered-To: alice@example.org\r\n"]),
    (
        "body after split blank line",
        [b"Subject: x\r\n", b"\r\nDelivered-To: alice@example.org\r\n"],
    ),
    ("message without header", [b"\r\nDelivered-To: alice@example.org\r\n"]),
    ("other field", [b"X-Delivered-To: alice@example.org\r\n\r\n"]),
]


@pytest.mark.parametrize("chunks", [c[1] for c in NOT_A_LOOP], ids=[c[0] for c in NOT_A_LOOP])
def test_not_a_loop(maildir: MaildirDelivery, chunks: list[bytes]) -> None:
    assert isinstance(maildir.deliver(ADDRESS, chunks, return_path=""), Delivered)


def test_loop_after_a_huge_header(maildir: MaildirDelivery) -> None:
    # Past the header buffer limit the tmp file is open: the loop must still remove it.
    pad = [b"X-Pad: " + b"p" * 1000 + b"\r\n"] * 1500
    outcome = maildir.deliver(
        ADDRESS, [*pad, b"Delivered-To: alice@example.org\r\n\r\nx\r\n"], return_path=""
    )
    assert isinstance(outcome, PermFail)
    box = _box(maildir)
    assert _files(box / "new") == []
    assert _files(box / "tmp") == []


def _failing(monkeypatch: pytest.MonkeyPatch, name: str, code: int, *, after: int = 0) -> None:
    real = getattr(os, name)
    calls = [0]

    def fail(*args: object) -> object:
        calls[0] += 1
        if calls[0] > after:
            raise OSError(code, os.strerror(code))
        return real(*args)

    monkeypatch.setattr(os, name, fail)


DISK_ERRORS: list[tuple[str, str, int, tuple[int, str]]] = [
    ("write ENOSPC", "write", errno.ENOSPC, STORAGE_FULL),
    ("write EDQUOT", "write", errno.EDQUOT, STORAGE_FULL),
    ("write EIO", "write", errno.EIO, LOCAL_ERROR),
    ("fsync ENOSPC", "fsync", errno.ENOSPC, STORAGE_FULL),
    ("fsync EIO", "fsync", errno.EIO, LOCAL_ERROR),
    ("link EIO", "link", errno.EIO, LOCAL_ERROR),
    ("open EACCES", "open", errno.EACCES, LOCAL_ERROR),
]


@pytest.mark.parametrize(
    ("function", "code", "expected"), [c[1:] for c in DISK_ERRORS], ids=[c[0] for c in DISK_ERRORS]
)
def test_disk_errors_are_temporary_and_leave_nothing(
    maildir: MaildirDelivery,
    monkeypatch: pytest.MonkeyPatch,
    function: str,
    code: int,
    expected: tuple[int, str],
) -> None:
    maildir.deliver(ADDRESS, [b"\r\nfirst\r\n"], return_path="")  # directories exist
    box = _box(maildir)
    before = _files(box / "new")
    _failing(monkeypatch, function, code)
    outcome = maildir.deliver(ADDRESS, [b"Subject: x\r\n\r\nbody\r\n"], return_path="")
    monkeypatch.undo()
    assert isinstance(outcome, TempFail), outcome
    assert (outcome.reply.code, outcome.reply.status) == expected
    assert outcome.detail
    assert _files(box / "tmp") == []
    assert _files(box / "new") == before


def test_enospc_in_the_middle_of_a_large_message(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing(monkeypatch, "write", errno.ENOSPC, after=2)
    chunks = [b"Subject: x\r\n\r\n", *([b"y" * 65536] * 64)]
    outcome = maildir.deliver(ADDRESS, chunks, return_path="")
    monkeypatch.undo()
    assert isinstance(outcome, TempFail)
    assert (outcome.reply.code, outcome.reply.status) == STORAGE_FULL
    box = _box(maildir)
    assert _files(box / "tmp") == []
    assert _files(box / "new") == []


def test_directory_fsync_failure_unlinks_the_new_file(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    maildir.deliver(ADDRESS, [b"\r\nfirst\r\n"], return_path="")
    _failing(monkeypatch, "fsync", errno.EIO, after=1)  # the file syncs, new/ does not
    outcome = maildir.deliver(ADDRESS, [b"\r\nsecond\r\n"], return_path="")
    monkeypatch.undo()
    assert isinstance(outcome, TempFail)
    box = _box(maildir)
    assert [p.read_bytes().endswith(b"first\n") for p in _files(box / "new")] == [True]
    assert _files(box / "tmp") == []


def test_body_error_is_temporary(maildir: MaildirDelivery) -> None:
    def body() -> Iterator[bytes]:
        yield b"Subject: x\r\n\r\n"
        yield b"y" * (2 * 1024 * 1024)  # past the header buffer: the tmp file exists
        raise RuntimeError("spool read failed")

    outcome = maildir.deliver(ADDRESS, body(), return_path="")
    assert isinstance(outcome, TempFail)
    assert (outcome.reply.code, outcome.reply.status) == LOCAL_ERROR
    assert "spool read failed" in outcome.detail
    assert _files(_box(maildir) / "tmp") == []


def test_mailbox_path_is_a_file(maildir: MaildirDelivery) -> None:
    box = _box(maildir)
    box.parent.mkdir(parents=True)
    box.write_bytes(b"not a maildir")
    outcome = maildir.deliver(ADDRESS, [b"\r\n"], return_path="")
    assert isinstance(outcome, TempFail)  # the operator can fix it; keep the mail queued


def test_maildir_removed_behind_our_back(maildir: MaildirDelivery) -> None:
    assert isinstance(maildir.deliver(ADDRESS, [b"\r\n"], return_path=""), Delivered)
    shutil.rmtree(_box(maildir))
    assert isinstance(maildir.deliver(ADDRESS, [b"\r\n"], return_path=""), Delivered)
    _only_message(maildir)


def test_hard_links_unsupported_falls_back_to_rename(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing(monkeypatch, "link", errno.EPERM)
    outcome = maildir.deliver(ADDRESS, [b"\r\nbody\r\n"], return_path="")
    monkeypatch.undo()
    assert isinstance(outcome, Delivered)
    assert _only_message(maildir).read_bytes().endswith(b"\nbody\n")


# -- crash recovery: the queue's deliveries use a deterministic name (delivery_key) -----

KEY = "1700000000.QID0001R7"
BODY = [b"Subject: crash\r\n\r\nthe whole body\r\n"]


def _stale_tmp(maildir: MaildirDelivery, content: bytes) -> Path:
    """tmp/<key>.<host> as a kill -9 in the middle of step 4 leaves it."""
    box = _box(maildir)
    for sub in ("tmp", "new", "cur"):
        (box / sub).mkdir(parents=True, exist_ok=True)
    tmp = box / "tmp" / f"{KEY}.mx.example.org"
    tmp.write_bytes(content)
    tmp.chmod(0o600)
    return tmp


def test_stale_partial_tmp_file_is_replaced_at_once(maildir: MaildirDelivery) -> None:
    _stale_tmp(maildir, b"Return-Path: <>\nDelivered-To: alice@example.org\nSubj")
    outcome = maildir.deliver(ADDRESS, BODY, return_path="", delivery_key=KEY)
    assert isinstance(outcome, Delivered), outcome
    path = _only_message(maildir)
    assert path.name.startswith(f"{KEY}.mx.example.org,S=")
    assert path.read_bytes().endswith(b"Subject: crash\n\nthe whole body\n")


def test_stale_tmp_already_linked_is_not_delivered_twice(maildir: MaildirDelivery) -> None:
    # The crash came after the link into new/, and a mail reader has since moved the
    # message to cur/ (same inode): the retry must not put a second copy in new/.
    content = b"Return-Path: <>\nDelivered-To: alice@example.org\n\nthe whole body\n"
    tmp = _stale_tmp(maildir, content)
    seen = _box(maildir) / "cur" / f"{KEY}.mx.example.org,S={len(content)}:2,S"
    os.link(tmp, seen)
    outcome = maildir.deliver(ADDRESS, BODY, return_path="", delivery_key=KEY)
    assert isinstance(outcome, Delivered), outcome
    assert _files(_box(maildir) / "new") == []
    assert _files(_box(maildir) / "tmp") == []
    assert _files(_box(maildir) / "cur") == [seen]
    assert seen.read_bytes() == content


def test_stale_tmp_already_in_new_is_delivered_once(maildir: MaildirDelivery) -> None:
    content = b"Return-Path: <>\nDelivered-To: alice@example.org\n\nthe whole body\n"
    tmp = _stale_tmp(maildir, content)
    final = _box(maildir) / "new" / f"{KEY}.mx.example.org,S={len(content)}"
    os.link(tmp, final)
    outcome = maildir.deliver(ADDRESS, BODY, return_path="", delivery_key=KEY)
    assert isinstance(outcome, Delivered), outcome
    assert outcome.detail == str(final)
    assert _only_message(maildir) == final


def test_idempotent_retry_without_hard_links(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file system without link(2): the first attempt renamed into new/, the crash
    # came before the queue recorded it; the retry finds the name taken.
    _failing(monkeypatch, "link", errno.EPERM)
    first = maildir.deliver(ADDRESS, BODY, return_path="", delivery_key=KEY)
    again = maildir.deliver(ADDRESS, BODY, return_path="", delivery_key=KEY)
    monkeypatch.undo()
    assert isinstance(first, Delivered), first
    assert isinstance(again, Delivered), again
    assert _only_message(maildir).name == Path(first.detail).name


PATHS: list[tuple[str, str]] = [
    ("alice@example.org", "example.org/alice"),
    ("Alice@Example.ORG", "example.org/alice"),
    ('"alice"@example.org', "example.org/alice"),
    ("jörg@bücher.example", "bücher.example/jörg"),
    ("alice+tag@example.org", "example.org/alice+tag"),
    ("a@b@example.org", ""),
    ("../alice@example.org", ""),
    ("..@example.org", ""),
    (".@example.org", ""),
    (".hidden@example.org", ""),
    ("a/b@example.org", ""),
    ("a\\b@example.org", ""),
    ("a%b@example.org", ""),
    ("a!b@example.org", ""),
    ("a\x00b@example.org", ""),
    ("a\nb@example.org", ""),
    ('"../x"@example.org', ""),
    ("alice@..", ""),
    ("alice@../etc", ""),
    ("alice@.", ""),
    ("alice@", ""),
    ("@example.org", ""),
    ("alice", ""),
    ("x" * 256 + "@example.org", ""),
]


@pytest.mark.parametrize(("address", "relative"), PATHS)
def test_mailbox_path(maildir: MaildirDelivery, address: str, relative: str) -> None:
    if relative:
        assert maildir.mailbox_path(address) == maildir.root / relative
        return
    with pytest.raises(MaildirPathError):
        maildir.mailbox_path(address)
    outcome = maildir.deliver(address, [b"\r\n"], return_path="")
    assert isinstance(outcome, PermFail)
    assert (outcome.reply.code, outcome.reply.status) == MAILBOX_UNAVAILABLE
    assert not maildir.root.exists()  # nothing created anywhere


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    delivery = MaildirDelivery(Path("var/mail"), hostname="h")
    assert delivery.root == tmp_path / "var" / "mail"
    assert isinstance(delivery.deliver(ADDRESS, [b"\r\n"], return_path=""), Delivered)


def test_never_raises_on_unexpected_errors(
    maildir: MaildirDelivery, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom() -> str:
        raise ValueError("surprise")

    monkeypatch.setattr(maildir_module.MaildirDelivery, "_unique_name", lambda self: boom())
    outcome = maildir.deliver(ADDRESS, [b"\r\n"], return_path="")
    assert isinstance(outcome, TempFail)
    assert (outcome.reply.code, outcome.reply.status) == LOCAL_ERROR
