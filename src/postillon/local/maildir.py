"""Maildir delivery (https://cr.yp.to/proto/maildir.html).

Design note
-----------
One message for one mailbox, as a transaction (the caller runs it in a thread; it
blocks on the disk and never raises)::

    deliver(address, body, return_path=..., original_recipient=...)
      1. mailbox_path(address)            invalid / could escape root -> PermFail 550 5.1.1
      2. convert CRLF -> LF chunk by chunk, scanning the header section for
         "Delivered-To: <address>"        found -> PermFail 554 5.4.6, nothing written
      3. create <root>/<domain>/<local>/{tmp,new,cur} (0700) as needed, fsync new parents
      4. write tmp/<unique> (0600): Return-Path, [X-Original-To], Delivered-To, the body
      5. fsync the file, link it to new/<unique>,S=<size>, unlink tmp   (``stage``)
      6. fsync new/, one fsync shared by the deliveries linking into the
         same new/ meanwhile (dirsync.py)                                 (``commit``)
      7. Delivered 250 2.0.0
    any OSError: ENOSPC/EDQUOT -> TempFail 452 4.2.2, others (EIO, EACCES, ...) ->
    TempFail 451 4.3.0; the tmp file is removed and the message stays queued.

Nothing is visible in ``new/`` until it is complete and on disk, so a mail reader never
sees half a message and a crash leaves at most a stale file in ``tmp/`` (readers clean
those after 36 hours). If the directory fsync fails after the link, the new file is
unlinked again and the delivery is reported temporary: a retry may at worst duplicate
the message, never lose it (SMTP's at-least-once).

With a ``delivery_key`` (the queue's deliveries) the ``tmp/`` name is the same on every
attempt, so the retry after a crash (``kill -9``, power cut) meets the file the dead
attempt left when step 4 creates it exclusively (no lookup on the normal path). It is
ours, and no other attempt can be writing it (the queue's lease), so it is recovered
at once instead of failing with ``File exists`` and waiting a retry interval:

- more than one link: the crash came after step 5's link (the file is in ``new/``, or
  a mail reader already moved it to ``cur/``, which keeps the inode): the message was
  delivered; ``new/`` is fsynced, the tmp name unlinked, and the outcome is Delivered
  without writing it again;
- one link: a half-written (or complete but never linked) file: unlinked, and the
  delivery starts afresh.

The body's CRLF line endings become LF (Maildir files use the local convention); a
CR that ends one chunk is held back until the next chunk shows whether an LF follows.
Bare CRs and bare LFs are left as they are. The ``Delivered-To:`` loop check looks only
at the header section (up to the first empty line), unfolds continuation lines and
compares case-insensitively; it buffers at most :data:`_BUFFER_LIMIT` bytes before the
decision, so a normal message's file is created only once the header has been checked.

File names follow the modern Maildir form ``<sec>.M<usec>P<pid>Q<n>R<random>.<host>``
(time, process, a per-process counter and 32 random bits: unique across threads,
processes and clock steps); the name in ``new/`` adds ``,S=<size in bytes>``
(Dovecot/Courier size hint).
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from postillon.core.address import unquote_local_part
from postillon.core.outcome import Delivered, Outcome, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.local.dirsync import DirectorySync, fsync_dir

__all__ = [
    "DELIVERED",
    "MAILBOX_UNAVAILABLE",
    "MaildirDelivery",
    "MaildirPathError",
    "Staged",
]

DELIVERED = Reply.of(250, "2.0.0", "delivered to maildir")
MAILBOX_UNAVAILABLE = Reply.of(550, "5.1.1", "Recipient mailbox unavailable")
DISK_FULL = Reply.of(452, "4.2.2", "Insufficient storage for the mailbox, try again later")
QUOTA = Reply.of(452, "4.2.2", "Mailbox over quota, try again later")
LOCAL_ERROR = Reply.of(451, "4.3.0", "Temporary local problem writing the mailbox")

_DIR_MODE = 0o700
_FILE_MODE = 0o600
_WRITE_SIZE = 256 * 1024  # bytes gathered before one write(2)
_BUFFER_LIMIT = 1024 * 1024  # body bytes held while the header is still being scanned
_MAX_HEADER_LINE = 64 * 1024  # a longer unterminated header line ends the loop scan
_PATH_CACHE = 10_000  # mailbox paths remembered
_NAME_MAX = 255  # bytes in one path component (Linux NAME_MAX)
_UNSAFE_CHARS = frozenset('/\\@%!"')
_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@dataclass(frozen=True, slots=True)
class Staged:
    """One message staged by :meth:`MaildirDelivery.stage`: its outcome, and, for a
    message linked into ``new/``, that directory and the file, which count as
    delivered only once :meth:`MaildirDelivery.commit` has fsync'd the directory."""

    outcome: Outcome
    new_dir: Path | None = None
    final: Path | None = None


class MaildirPathError(ValueError):
    """An address that cannot name a mailbox directory under the Maildir root."""


def _check_component(text: str, what: str, address: str) -> None:
    if (
        not text
        or text.startswith(".")  # ".", "..", hidden files, Maildir++ folders
        or any(c in _UNSAFE_CHARS or c < " " or c == "\x7f" for c in text)
        or len(text.encode("utf-8", "surrogateescape")) > _NAME_MAX
    ):
        raise MaildirPathError(f"{what} of {address!r} cannot name a mailbox directory")


def _safe_header_value(text: str) -> str:
    # No CR/LF (header injection) nor other control characters in a header we write.
    return "".join(c if c >= " " and c != "\x7f" else "?" for c in text)


def _host_for_name(hostname: str) -> str:
    # The Maildir spec replaces "/" and ":" in the host part; "," too, as the
    # ",S=" size hint is parsed from the name (Dovecot does the same).
    host = hostname or "localhost"
    host = host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    return _safe_header_value(host).replace(" ", "_")


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _CrlfToLf:
    """CRLF -> LF over a stream of chunks; a CR at a chunk's end waits for the next."""

    def __init__(self) -> None:
        self._cr = False

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            self._cr = True
            chunk = chunk[:-1]
        return chunk.replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        if self._cr:
            self._cr = False
            return b"\r"
        return b""


class _DeliveredToScanner:
    """Looks for ``Delivered-To: <address>`` in the header section (LF line endings)."""

    def __init__(self, address: str) -> None:
        self._address = address.strip().lower()
        self._partial = b""  # the current, unterminated line
        self._field: bytes | None = None  # the current logical header field (unfolded)
        self.done = False
        self.loop = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        data = self._partial + data
        self._partial = b""
        if data.startswith(b"\n"):  # at a line start: an empty line ends the header
            self._finish()
            return
        end = data.find(b"\n\n")
        if end >= 0:
            self._lines(data[: end + 1])
            self._finish()
            return
        last = data.rfind(b"\n")
        self._lines(data[: last + 1])
        self._partial = data[last + 1 :]
        if len(self._partial) > _MAX_HEADER_LINE:
            self._finish()  # not a header line we care about; stop scanning

    def close(self) -> None:
        """End of message: the last line may lack its LF."""
        if not self.done:
            if self._partial:
                self._lines(self._partial + b"\n")
            self._finish()

    def _lines(self, block: bytes) -> None:
        for line in block.split(b"\n")[:-1]:
            if line[:1] in (b" ", b"\t") and self._field is not None:
                if len(self._field) < _MAX_HEADER_LINE:
                    self._field += line
            else:
                self._check_field()
                self._field = line

    def _finish(self) -> None:
        self._check_field()
        self._partial = b""
        self.done = True

    def _check_field(self) -> None:
        field, self._field = self._field, None
        if field is None or self.loop:
            return
        name, colon, value = field.partition(b":")
        if not colon or name.strip().lower() != b"delivered-to":
            return
        text = value.decode("utf-8", "replace").strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1].strip()
        if text.lower() == self._address:
            self.loop = True


class _LoopFound(Exception):
    pass


class MaildirDelivery:
    """Deliver into ``<root>/<domain>/<localpart>/`` Maildirs (root = ``<data_dir>/mail``).

    Thread-safe: the runner calls :meth:`deliver` from worker threads.
    """

    def __init__(self, root: Path, *, hostname: str) -> None:
        self._root = Path(os.path.abspath(root))
        self._host = _host_for_name(hostname)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._ready: set[Path] = set()  # mailboxes whose tmp/new/cur exist
        self._paths: dict[str, Path] = {}  # address -> mailbox_path(address)
        self.directory_sync = DirectorySync()  # new/ fsyncs shared by concurrent deliveries

    @property
    def root(self) -> Path:
        return self._root

    def mailbox_path(self, address: str) -> Path:
        """``root/<domain>/<localpart>`` (lower-cased) for ``localpart@domain``.

        Raises :class:`MaildirPathError` for anything that could leave ``root``, hide
        a directory or be ambiguous: ``/``, ``\\``, ``@``, ``%``, ``!``, quotes,
        control characters, a leading ``.`` (so no ``.``/``..``), an empty or overlong
        component. Valid answers are cached (a mailbox gets mail again and again).
        """
        cached = self._paths.get(address)
        if cached is not None:
            return cached
        local, at, domain = address.rpartition("@")
        if not at:
            raise MaildirPathError(f"{address!r} has no domain")
        local = unquote_local_part(local).lower()
        domain = domain.lower()
        _check_component(domain, "the domain", address)
        _check_component(local, "the local part", address)
        path = self._root / domain / local
        # Defence in depth: after the checks above this always holds.
        if Path(os.path.normpath(path)).parent.parent != self._root:
            raise MaildirPathError(f"{address!r} would leave the Maildir root")
        if len(self._paths) >= _PATH_CACHE:
            self._paths.clear()  # crude bound; refilled by the mailboxes still in use
        self._paths[address] = path
        return path

    def deliver(
        self,
        address: str,
        body: Iterable[bytes],
        *,
        return_path: str,
        original_recipient: str | None = None,
        delivery_key: str | None = None,
    ) -> Outcome:
        """Deliver one message; see the module docstring for the transaction.

        ``delivery_key`` makes delivery idempotent: the file name in ``new/`` is
        derived from it (the queue passes "<time>.<queue id>R<record id>"), so a
        retry after a crash between the link and the queue's "delivered" record
        finds the file already there and reports success instead of delivering
        twice. Without it every call gets a fresh unique name.
        """
        staged = self.stage(
            address,
            body,
            return_path=return_path,
            original_recipient=original_recipient,
            delivery_key=delivery_key,
        )
        return self.commit([staged])[0]

    def stage(
        self,
        address: str,
        body: Iterable[bytes],
        *,
        return_path: str,
        original_recipient: str | None = None,
        delivery_key: str | None = None,
    ) -> Staged:
        """Steps 1-5 of :meth:`deliver` but the fsync of ``new/``: the message is
        complete, fsync'd and linked, and counts as delivered only once
        :meth:`commit` has made the link durable (several stagings share it)."""
        try:
            mailbox = self.mailbox_path(address)
        except MaildirPathError as exc:
            return Staged(PermFail(MAILBOX_UNAVAILABLE, str(exc)))
        tmp: Path | None = None
        fd = -1
        try:
            unique = f"{delivery_key}.{self._host}" if delivery_key else self._unique_name()
            header = self._trace_header(address, return_path, original_recipient)
            scanner = _DeliveredToScanner(address)
            convert = _CrlfToLf()
            buffer = bytearray(header)
            size = len(header)

            def scan(data: bytes) -> None:
                if not scanner.done:
                    scanner.feed(data)
                    if scanner.loop:
                        raise _LoopFound

            for chunk in body:
                data = convert.feed(chunk)
                scan(data)
                buffer += data
                size += len(data)
                if fd < 0 and (scanner.done or len(buffer) >= _BUFFER_LIMIT):
                    tmp = mailbox / "tmp" / unique
                    opened = self._open_tmp(mailbox, tmp, idempotent=delivery_key is not None)
                    if isinstance(opened, Path):  # a crashed attempt had delivered it
                        tmp = None
                        return Staged(Delivered(DELIVERED, str(opened)))
                    fd = opened
                if fd >= 0 and len(buffer) >= _WRITE_SIZE:
                    _write_all(fd, buffer)
                    buffer.clear()
            data = convert.flush()
            scan(data)
            scanner.close()
            if scanner.loop:
                raise _LoopFound
            buffer += data
            size += len(data)
            if fd < 0:
                tmp = mailbox / "tmp" / unique
                opened = self._open_tmp(mailbox, tmp, idempotent=delivery_key is not None)
                if isinstance(opened, Path):
                    tmp = None
                    return Staged(Delivered(DELIVERED, str(opened)))
                fd = opened
            _write_all(fd, buffer)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            assert tmp is not None
            new_dir = mailbox / "new"
            final = self._link_into_new(
                tmp, new_dir, f"{unique},S={size}", idempotent=delivery_key is not None
            )
            tmp = None
            return Staged(Delivered(DELIVERED, str(final)), new_dir, final)
        except _LoopFound:
            return Staged(
                PermFail(
                    Reply.of(
                        554, "5.4.6", f"mail forwarding loop for {_safe_header_value(address)}"
                    ),
                    f"the header already has Delivered-To: {address}",
                )
            )
        except OSError as exc:
            return Staged(
                TempFail(_reply_for(exc), f"{exc.filename or mailbox}: {exc.strerror or exc}")
            )
        except Exception as exc:  # never raise across the transport boundary
            return Staged(TempFail(LOCAL_ERROR, f"{mailbox}: {type(exc).__name__}: {exc}"))
        finally:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
            if tmp is not None:
                _unlink_quietly(tmp)

    def commit(self, staged: Sequence[Staged]) -> list[Outcome]:
        """Make the links of ``staged`` durable: one fsync per distinct ``new/``, shared
        with the deliveries linking into it at the same time in other threads (group
        commit, ``dirsync.py``). Where that fsync fails, the linked files are unlinked
        again and the outcome is temporary (a retry may duplicate, never lose). One
        outcome per staging, in order."""
        failed: dict[Path, OSError] = {}
        for new_dir in dict.fromkeys(s.new_dir for s in staged if s.new_dir is not None):
            try:
                self.directory_sync.sync(new_dir)
            except OSError as exc:
                failed[new_dir] = exc
        outcomes: list[Outcome] = []
        for s in staged:
            error = failed.get(s.new_dir) if s.new_dir is not None else None
            if error is None:
                outcomes.append(s.outcome)
                continue
            if s.final is not None:
                _unlink_quietly(s.final)
            outcomes.append(
                TempFail(
                    _reply_for(error), f"{error.filename or s.new_dir}: {error.strerror or error}"
                )
            )
        return outcomes

    # -- internals -------------------------------------------------------------------

    def _unique_name(self) -> str:
        with self._lock:
            n = next(self._counter)
        now = time.time_ns()
        sec, usec = divmod(now // 1000, 1_000_000)
        rand = secrets.randbits(32)
        return f"{sec}.M{usec}P{os.getpid()}Q{n}R{rand:08x}.{self._host}"

    @staticmethod
    def _trace_header(address: str, return_path: str, original_recipient: str | None) -> bytes:
        sender = return_path.strip()
        if sender.startswith("<") and sender.endswith(">"):
            sender = sender[1:-1]
        lines = [f"Return-Path: <{_safe_header_value(sender)}>\n"]
        if original_recipient is not None:
            lines.append(f"X-Original-To: {_safe_header_value(original_recipient)}\n")
        lines.append(f"Delivered-To: {_safe_header_value(address)}\n")
        return "".join(lines).encode("utf-8", "surrogateescape")

    def _recover_stale(self, mailbox: Path, unique: str) -> Path | None:
        """Clear what a crashed attempt left at ``tmp/<unique>`` (see the module note).

        Called when creating ``tmp/<unique>`` met an existing file (no lstat on the
        normal path). Returns the delivered file's path when that attempt had already
        linked it, else None (a partial file, now removed: create it again).
        """
        tmp = mailbox / "tmp" / unique
        try:
            st = os.lstat(tmp)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            return None  # not something a crash of ours leaves; O_EXCL reports it
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            # Linked before the crash: the name in new/ carries the size of that
            # very inode. Make the link durable before forgetting the tmp name.
            fsync_dir(mailbox / "new")
            os.unlink(tmp)
            return mailbox / "new" / f"{unique},S={st.st_size}"
        os.unlink(tmp)
        return None

    def _open_tmp(self, mailbox: Path, tmp: Path, *, idempotent: bool) -> int | Path:
        """``tmp/<unique>`` created exclusively (its fd), or, when ``idempotent`` and a
        crashed attempt had already linked that file into the mailbox, the path it has
        there (the delivery is done; ``_recover_stale`` made it durable)."""
        self._prepare(mailbox)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(tmp, flags, _FILE_MODE)
        except FileNotFoundError:
            # The Maildir was removed behind our back: create it again, once.
            self._ready.discard(mailbox)
            self._prepare(mailbox)
            return os.open(tmp, flags, _FILE_MODE)
        except FileExistsError:
            if not idempotent:
                raise
            delivered = self._recover_stale(mailbox, tmp.name)
            if delivered is not None:
                return delivered
            return os.open(tmp, flags, _FILE_MODE)

    def _prepare(self, mailbox: Path) -> None:
        if mailbox in self._ready:
            return
        if not self._root.is_dir():
            os.makedirs(self._root, _DIR_MODE, exist_ok=True)
        for directory in (
            mailbox.parent,
            mailbox,
            mailbox / "tmp",
            mailbox / "new",
            mailbox / "cur",
        ):
            _mkdir(directory)
        self._ready.add(mailbox)

    def _link_into_new(self, tmp: Path, new_dir: Path, name: str, *, idempotent: bool) -> Path:
        final = new_dir / name
        for attempt in range(3):
            try:
                os.link(tmp, final)
            except FileExistsError:
                if idempotent:
                    # Delivered before a crash kept the queue from recording it.
                    _unlink_quietly(tmp)
                    return final
                # Cannot happen with unique names; never overwrite, pick another.
                final = new_dir / f"{self._unique_name()},{name.rpartition(',')[2]}"
                if attempt == 2:
                    raise
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # A file system without hard links: rename (atomic; the name is unique).
                if final.exists():
                    if idempotent:
                        # Renamed into new/ before a crash kept the queue from recording it.
                        _unlink_quietly(tmp)
                        return final
                    raise
                os.rename(tmp, final)
                return final
            _unlink_quietly(tmp)
            return final
        raise AssertionError("unreachable")  # pragma: no cover


def _mkdir(directory: Path) -> None:
    try:
        os.mkdir(directory, _DIR_MODE)
    except FileExistsError:
        if not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(directory)) from None
        return
    fsync_dir(directory.parent)  # the new directory's entry is durable too


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _reply_for(exc: OSError) -> Reply:
    if exc.errno == errno.ENOSPC:
        return DISK_FULL
    if exc.errno in _FULL_ERRNOS:
        return QUOTA
    return LOCAL_ERROR
