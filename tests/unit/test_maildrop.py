"""The maildrop file format, the sendmail command's parsing, and pickup in memory."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from postillon.cli import sendmail
from postillon.intake import pickup as pickup_module
from postillon.intake.intake import Intake, IntakeTransaction
from postillon.intake.maildrop import (
    DropEnvelope,
    MaildropError,
    decode,
    encode,
    prepare_maildrop,
    to_crlf,
    write_drop,
)
from postillon.intake.pickup import Pickup
from postillon.queue.memory_store import MemoryStore


def test_round_trip() -> None:
    env = DropEnvelope(("alice@example.org", "bob"), "me@example.org", "Ann Ex", 1000, "ann")
    msg = b"Subject: x\r\n\r\nbody\r\n"
    assert decode(encode(env, msg)) == (env, msg)
    null = DropEnvelope(("alice@example.org",), "", "", 0, "root")
    assert decode(encode(null, b"")) == (null, b"")
    default = DropEnvelope(("a@b.c",))
    assert decode(encode(default, msg))[0].sender is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage\n\nbody",
        b"POSTILLON-MAILDROP 1\nRecipient: a@b.c\nSize: 99\n\nshort",
        b"POSTILLON-MAILDROP 1\nSize: 4\n\nbody",  # no recipient
        b"POSTILLON-MAILDROP 1\nRecipient: a@b.c\nSize: 4\nbody",  # no blank line
        b"POSTILLON-MAILDROP 1\nRecipient: a@b.c\nnonsense\nSize: 4\n\nbody",
    ],
)
def test_corrupt_files_are_refused(data: bytes) -> None:
    with pytest.raises(MaildropError):
        decode(data)


def test_values_cannot_inject_lines() -> None:
    with pytest.raises(ValueError):
        encode(DropEnvelope(("a@b.c\nRecipient: evil@x.y",)), b"")


def test_atomic_write_and_permissions(tmp_path: Path) -> None:
    drop = prepare_maildrop(tmp_path / "maildrop")
    assert stat.S_IMODE(drop.stat().st_mode) == 0o1733
    old = os.umask(0o077)
    try:
        path = write_drop(drop, DropEnvelope(("a@b.c",)), b"x\r\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in drop.iterdir() if p.is_file()] == [path.name]
    assert decode(path.read_bytes())[1] == b"x\r\n"


def test_options() -> None:
    o = sendmail.parse_args(["-t", "-i", "-FCron Daemon", "-f", "root", "-oem", "-B8BITMIME"])
    assert (o.extract, o.dot_ends, o.full_name, o.sender) == (True, False, "Cron Daemon", "root")
    o = sendmail.parse_args(["-oi", "-odi", "-ti", "--", "-weird@example.org"])
    assert (o.extract, o.dot_ends, o.recipients) == (True, False, ["-weird@example.org"])
    o = sendmail.parse_args(["-f<>", "bob@example.org", "carol"])
    assert (o.sender, o.recipients) == ("", ["bob@example.org", "carol"])
    assert sendmail.parse_args(["-bs"]).mode == "s"
    assert sendmail.parse_args(["-bp"]).mode == "p"
    assert sendmail.parse_args(["-q30m"]).mode == "q"
    assert sendmail.parse_args(["-bi"]).mode == "i"
    assert sendmail.parse_args(["-I"]).mode == "i"
    for bad in (["-Z"], ["-f"], ["-bd"]):
        with pytest.raises(sendmail.UsageError):
            sendmail.parse_args(bad)


def test_unknown_flag_exits_ex_usage() -> None:
    assert sendmail.run(["-Z"]) == sendmail.EX_USAGE


def test_newaliases_needs_the_config_to_find_the_aliases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTILLON_CONFIG", str(tmp_path / "missing.toml"))
    assert sendmail.run(["-bi"]) == sendmail.EX_CONFIG


def test_dot_handling() -> None:
    data = b"Subject: a\n\nline\n.\nafter\n"
    assert sendmail.read_message(io.BytesIO(data), dot_ends=True) == b"Subject: a\n\nline\n"
    assert sendmail.read_message(io.BytesIO(data), dot_ends=False) == data
    assert sendmail.read_message(io.BytesIO(b"a\n..\nb\n"), dot_ends=True) == b"a\n..\nb\n"
    assert sendmail.read_message(io.BytesIO(b"From x\nA: b\n"), dot_ends=False) == b"A: b\n"


def test_t_extracts_recipients_and_removes_bcc() -> None:
    msg = to_crlf(
        b"From: me@example.org\n"
        b"To: Alice <alice@example.org>, bob@example.org\n"
        b"Cc: carol@example.org\n"
        b"Bcc: secret@example.org,\n"
        b"  hidden@example.org\n"
        b"Subject: Bcc: not a header\n"
        b"\n"
        b"Bcc: body line stays\n"
    )
    rcpts, out = sendmail.extract_recipients(msg)
    assert rcpts == [
        "alice@example.org",
        "bob@example.org",
        "carol@example.org",
        "secret@example.org",
        "hidden@example.org",
    ]
    assert b"secret" not in out and b"hidden" not in out
    assert out.endswith(b"Subject: Bcc: not a header\r\n\r\nBcc: body line stays\r\n")


def test_deliver_writes_maildrop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.toml").write_text('hostname = "mx.test"\ndata_dir = "var"\n')
    monkeypatch.setenv("POSTILLON_CONFIG", str(tmp_path / "c.toml"))
    drop = prepare_maildrop(tmp_path / "var" / "maildrop")
    stdin = io.BytesIO(b"To: a@example.org\nBcc: b@example.org\nSubject: s\n\nhi\n")
    assert sendmail.run(["-t", "-i", "c@example.org"], stdin=stdin) == 0
    (path,) = [p for p in drop.iterdir() if p.is_file()]
    env, msg = decode(path.read_bytes())
    assert env.recipients == ("c@example.org", "a@example.org", "b@example.org")
    assert msg == b"To: a@example.org\r\nSubject: s\r\n\r\nhi\r\n"
    assert sendmail.run([], stdin=io.BytesIO(b"x\n")) == sendmail.EX_USAGE
    assert sendmail.run(["bad address@"], stdin=io.BytesIO(b"x\n")) == sendmail.EX_NOUSER


@pytest.mark.parametrize("options", [["-i"], []], ids=["-i", "dot ends"])
def test_command_reads_no_more_than_the_size_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: list[str]
) -> None:
    # A runaway job piping gigabytes into sendmail: the command stops reading just
    # past [limits] message_size instead of holding it all, and writes nothing.
    (tmp_path / "c.toml").write_text(
        'hostname = "mx.test"\ndata_dir = "var"\n[limits]\nmessage_size = 10000\n'
    )
    monkeypatch.setenv("POSTILLON_CONFIG", str(tmp_path / "c.toml"))
    drop = prepare_maildrop(tmp_path / "var" / "maildrop")
    stdin = io.BytesIO(b"Subject: s\n\n" + (b"y" * 99 + b"\n") * 100_000)  # 10 MB
    assert sendmail.run([*options, "a@example.org"], stdin=stdin) == sendmail.EX_DATAERR
    assert stdin.tell() < 20_000
    assert [p for p in drop.iterdir() if p.is_file()] == []
    # Within the limit (even with a From_ line on top): accepted.
    small = io.BytesIO(b"From me Mon Jan  1 00:00:00 2024\nSubject: s\n\n" + b"z" * 9000)
    assert sendmail.run([*options, "a@example.org"], stdin=small) == 0


def test_bs_dialogue_writes_maildrop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "c.toml").write_text('hostname = "mx.test"\ndata_dir = "var"\n')
    monkeypatch.setenv("POSTILLON_CONFIG", str(tmp_path / "c.toml"))
    drop = prepare_maildrop(tmp_path / "var" / "maildrop")
    dialogue = (
        b"EHLO me\r\nMAIL FROM:<me@example.org>\r\nRCPT TO:<a@example.org>\r\n"
        b"DATA\r\nSubject: s\r\n\r\n..dot\r\n.\r\nQUIT\r\n"
    )
    r, w = os.pipe()
    os.write(w, dialogue)
    os.close(w)
    out = io.BytesIO()
    with os.fdopen(r, "rb") as stdin:
        assert sendmail.run(["-bs"], stdin=stdin, stdout=out) == 0
    assert b"250 2.0.0 Ok: queued" in out.getvalue() and out.getvalue().endswith(b"\r\n")
    (path,) = [p for p in drop.iterdir() if p.is_file()]
    env, msg = decode(path.read_bytes())
    assert (env.sender, env.recipients) == ("me@example.org", ("a@example.org",))
    assert msg == b"Subject: s\r\n\r\n.dot\r\n"


async def test_pickup_queues_and_adds_headers(tmp_path: Path) -> None:
    store = MemoryStore()
    intake = Intake(store, "mx.test", tmp_path / "spool")
    drop = prepare_maildrop(tmp_path / "maildrop")
    me = os.geteuid()
    write_drop(drop, DropEnvelope(("alice",), None, "Ann", me, "x"), b"Subject: s\r\n\r\nhi\r\n")
    (drop / "junk").write_bytes(b"not a maildrop file")
    pickup = Pickup(drop, intake, "mx.test", trusted_uids={-5})  # the owner is not trusted
    assert await pickup.scan_once() == 1
    assert [p.name for p in drop.iterdir() if p.is_file()] == []
    assert (drop / "corrupt" / "junk").exists()
    (info,) = await store.list_messages()
    assert [r.recipient for r in info.records] == ["alice@mx.test"]
    assert info.source == "sendmail"
    body = b"".join([c async for c in store.read_body(info.queue_id)])
    assert body.startswith(f"Received: from local (uid {me})".encode())
    assert b"From: Ann <x@mx.test>" not in body  # the name in the file is not trusted
    assert b"From: Ann <" in body and b"Message-ID: <" in body and b"Date: " in body
    assert body.endswith(b"Subject: s\r\n\r\nhi\r\n")

    # -f from an untrusted uid: not used, recorded.
    write_drop(drop, DropEnvelope(("bob@example.org",), "ceo@bank.example"), b"A: b\r\n\r\n")
    assert await pickup.scan_once() == 1
    messages = await store.list_messages()
    assert sorted(m.sender for m in messages)[0].endswith("@mx.test")
    # ... and from a trusted one, honoured.
    trusting = Pickup(drop, intake, "mx.test", trusted_uids={me})
    write_drop(drop, DropEnvelope(("bob@example.org",), "ceo@bank.example"), b"A: b\r\n\r\n")
    assert await trusting.scan_once() == 1
    assert "ceo@bank.example" in {m.sender for m in await store.list_messages()}


# -- pickup reads at most what it checked, within [limits] message_size ------------


def _pickup(tmp_path: Path, **kwargs: object) -> tuple[Pickup, MemoryStore, Path, list[str]]:
    store = MemoryStore()
    reasons: list[str] = []
    intake = Intake(store, "mx.test", tmp_path / "spool")
    intake.maillog.subscribe(lambda _e, _q, fields: reasons.append(str(fields.get("reason"))))
    drop = prepare_maildrop(tmp_path / "maildrop")
    return Pickup(drop, intake, "mx.test", **kwargs), store, drop, reasons  # type: ignore[arg-type]


async def test_pickup_refuses_a_message_over_the_size_limit(tmp_path: Path) -> None:
    pickup, store, drop, reasons = _pickup(tmp_path, max_message_size=1000)
    path = write_drop(drop, DropEnvelope(("alice",)), b"Subject: s\r\n\r\n" + b"x" * 1000)
    assert await pickup.scan_once() == 0
    assert (drop / "corrupt" / path.name).exists()
    assert await store.list_messages() == []
    assert reasons == [
        f"maildrop file {path.name}: message too large (1014 octets; [limits] message_size is 1000)"
    ]
    # At the limit exactly: queued.
    write_drop(drop, DropEnvelope(("alice",)), b"Subject: s\r\n\r\n" + b"x" * 986)
    assert await pickup.scan_once() == 1


async def test_pickup_streams_the_message_in_bounded_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pickup, store, drop, _ = _pickup(tmp_path)
    message = b"Subject: s\r\n\r\n" + (b"y" * 998 + b"\r\n") * 3000  # 3 MB
    write_drop(drop, DropEnvelope(("alice",)), message)
    chunks: list[int] = []
    real_write = IntakeTransaction.write

    def write(self: IntakeTransaction, data: bytes) -> None:
        chunks.append(len(data))
        real_write(self, data)

    monkeypatch.setattr(IntakeTransaction, "write", write)
    assert await pickup.scan_once() == 1
    assert max(chunks) <= pickup_module.READ_SIZE
    (info,) = await store.list_messages()
    assert b"".join([chunk async for chunk in store.read_body(info.queue_id)]).endswith(message)


async def test_pickup_refuses_a_file_grown_after_the_size_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner appends to the file between pickup's fstat and its reads: only the
    # checked size is read, and the changed file is set aside, not queued.
    pickup, store, drop, reasons = _pickup(tmp_path)
    path = write_drop(drop, DropEnvelope(("alice",)), b"Subject: s\r\n\r\nhi\r\n")
    real_open = pickup_module._DropFile.open

    def open_then_grow(p: Path) -> pickup_module._DropFile:
        opened = real_open(p)
        with open(p, "ab") as f:
            f.write(b"x" * 10_000_000)
        return opened

    monkeypatch.setattr(pickup_module._DropFile, "open", open_then_grow)
    assert await pickup.scan_once() == 0
    assert await store.list_messages() == []
    assert (drop / "corrupt" / path.name).exists()
    assert reasons == [f"maildrop file {path.name}: file changed while being read"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "no maildrop magic line"),
        (b"POSTILLON-MAILDROP 1\nRecipient: a\nSize: 5\n\nabc", "Size 5 does not match"),
        (b"POSTILLON-MAILDROP 1\nRecipient: a\nSize: 2\n\nabc", "Size 2 does not match"),
        (b"POSTILLON-MAILDROP 1\nRecipient: a\n", "header section not terminated"),
    ],
)
async def test_pickup_sets_aside_malformed_files(tmp_path: Path, data: bytes, reason: str) -> None:
    pickup, _store, drop, reasons = _pickup(tmp_path)
    (drop / "f1").write_bytes(data)
    assert await pickup.scan_once() == 0
    assert (drop / "corrupt" / "f1").exists()
    assert len(reasons) == 1 and reason in reasons[0], reasons
