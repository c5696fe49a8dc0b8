"""Pickup: the server side of the maildrop (Postfix's ``pickup``).

Every ``interval`` seconds (or at once after ``wake()``) the task scans the
maildrop directory and hands each complete file (see ``intake.maildrop``) to
``Intake``, like any other message: source ``sendmail``, a ``Received: from
local (uid N)`` trace, and ``Date:``, ``Message-ID:`` and ``From:`` added when
missing. The file is removed only after the queue commit, so a crash in
between gives at most a duplicate, never a loss. A file that cannot be used
(not a maildrop file, no valid recipient, larger than ``[limits] message_size``,
refused by intake with a 5xx) is moved to ``maildrop/corrupt/`` and logged; a 4xx
leaves it for the next scan.

Reading: the file's owner can still write it while pickup reads, so the size is
taken once, from ``fstat`` on the opened file; the envelope section must end
within :data:`MAX_ENVELOPE` octets and its ``Size:`` must account for exactly the
rest of that size, which must be within the limit. Then exactly that many octets
are read, in chunks streamed into intake (never the whole message in memory), and
a file that changed size meanwhile is refused.

Who sent it: the file owner (``fstat``), never the uid written in the file.
The envelope sender defaults to ``<user>@<hostname>``. ``-f`` is honoured for
trusted uids (root and the server's own user); for anyone else it is not used
as the envelope sender but recorded in an ``X-Authentication-Warning:``
header, as sendmail does. Unqualified addresses get ``@<hostname>``.

Recipients go through ``expand`` (the app passes the relay policy's
resolution as for an authenticated client: aliases expand, any domain may be
relayed to, as Postfix trusts local submission). ``expand`` should return the
address unchanged for a local recipient that does not exist: it is queued as
given, delivery fails and the sender gets a bounce (the ``sendmail`` command
has long exited by then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import stat
import time
from collections.abc import Callable, Collection, Sequence
from email.utils import formataddr, formatdate, make_msgid
from pathlib import Path

from postillon.core.address import Address, AddressError, parse_mailbox
from postillon.core.clock import Clock, SystemClock
from postillon.core.envelope import MailParams
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import Intake, IntakeError
from postillon.intake.maildrop import (
    CORRUPT,
    TEMP_PREFIX,
    DropEnvelope,
    MaildropError,
    decode_envelope,
    field_name,
    split_header,
)
from postillon.queue.store import NewRecipient

log = logging.getLogger("postillon.pickup")

# Recipient → final delivery addresses (alias expansion). The composition root
# passes the relay policy's resolution; intake does not import routing.
Expand = Callable[[Address], Sequence[str]]

# A temporary file this old belongs to a writer that died before its rename.
STALE_TEMP_SECONDS = 3600.0
# A maildrop file larger than this is refused even when [limits] message_size
# is 0 (unlimited): the spool and the queue still have to hold it.
MAX_FILE = 512 * 1024 * 1024
# The envelope section (magic, User/Uid/Sender/Full-Name, one line per recipient,
# Size) ends within this many octets: room for thousands of recipients.
MAX_ENVELOPE = 4 * 1024 * 1024
# One read(2) of the message, handed to intake as one chunk. The first chunk is
# also where missing From:/Date:/Message-ID: are looked for.
READ_SIZE = 1024 * 1024


class Pickup:
    def __init__(
        self,
        directory: Path,
        intake: Intake,
        hostname: str,
        clock: Clock | None = None,
        *,
        expand: Expand | None = None,
        trusted_uids: Collection[int] | None = None,
        interval: float = 0.5,
        max_message_size: int = 0,
    ) -> None:
        self.directory = directory
        self.intake = intake
        self.hostname = hostname
        self.clock: Clock = clock or SystemClock()
        self.expand = expand
        self.trusted_uids = frozenset(trusted_uids or {0, os.geteuid()})
        self.interval = interval
        # [limits] message_size (0 = unlimited); the app updates it on reload.
        self.max_message_size = max_message_size
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------
    def reconfigure(self, hostname: str, max_message_size: int) -> None:
        """A reload's hostname (for unqualified addresses and added headers) and size limit."""
        self.hostname = hostname
        self.max_message_size = max_message_size

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="pickup")

    async def stop(self) -> None:
        """Finish the file in hand, then stop."""
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.scan_once()
            except Exception:  # keep the task alive; the next scan retries
                log.exception("pickup: scan failed")
            if self._stop.is_set():
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()

    # -- one scan -----------------------------------------------------------------
    async def scan_once(self) -> int:
        """Queue every complete file in the maildrop; return how many were queued."""
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except FileNotFoundError:
            return 0
        queued = 0
        for entry in entries:
            if self._stop.is_set():
                break
            if entry.name.startswith(TEMP_PREFIX):
                self._remove_stale(entry)
                continue
            if entry.name.startswith(".") or entry.name == CORRUPT:
                continue
            if await self.process(Path(entry.path)):
                queued += 1
        return queued

    def _remove_stale(self, entry: os.DirEntry[str]) -> None:
        with contextlib.suppress(OSError):
            if time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                os.unlink(entry.path)

    async def process(self, path: Path) -> bool:
        """Queue one file; True if it was committed (and removed)."""
        try:
            drop = await asyncio.to_thread(_DropFile.open, path)
        except FileNotFoundError:
            return False
        except (OSError, MaildropError) as exc:
            self._corrupt(path, f"unreadable: {exc}")
            return False
        try:
            return await self._process(path, drop)
        finally:
            drop.close()

    async def _process(self, path: Path, drop: _DropFile) -> bool:
        try:
            envelope, first = await asyncio.to_thread(drop.read_envelope, self.max_message_size)
        except OSError as exc:
            self._corrupt(path, f"unreadable: {exc}")
            return False
        except MaildropError as exc:
            self._corrupt(path, str(exc))
            return False
        try:
            queue_id = await self._submit(drop, envelope, first)
        except OSError as exc:
            self._corrupt(path, f"unreadable: {exc}")
            return False
        except IntakeError as exc:
            if exc.reply.code < 500:
                log.warning("pickup: %s deferred: %s", path.name, exc.reply)
                return False
            self._corrupt(path, f"refused: {exc.reply}")
            return False
        except MaildropError as exc:
            self._corrupt(path, str(exc))
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log.debug("pickup: %s queued as %s", path.name, queue_id)
        return True

    def _corrupt(self, path: Path, reason: str) -> None:
        self.intake.maillog.event("error", "-", reason=f"maildrop file {path.name}: {reason}")
        target = self.directory / CORRUPT
        try:
            target.mkdir(mode=0o700, exist_ok=True)
            os.rename(path, target / path.name)
        except OSError as exc:
            log.error("pickup: cannot move %s aside (%s); removing it", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()

    # -- the message ---------------------------------------------------------------
    def qualify(self, address: str) -> str:
        return address if "@" in address else f"{address}@{self.hostname}"

    async def _submit(self, drop: _DropFile, envelope: DropEnvelope, first: bytes) -> str:
        """Queue the message whose first chunk is ``first``; the rest is read from
        ``drop`` as it goes into intake. Raises IntakeError, MaildropError, OSError."""
        uid = drop.uid
        user = _user_name(uid)
        own = f"{user}@{self.hostname}"
        requested = envelope.sender
        warning = b""
        if requested is None:
            sender = own
        elif uid in self.trusted_uids:
            sender = self.qualify(requested) if requested else ""
        else:
            sender = own
            if requested and self.qualify(requested).lower() != own.lower():
                warning = (
                    f"X-Authentication-Warning: {self.hostname}: {user} set sender to "
                    f"{requested} using -f\r\n"
                ).encode()
        if sender:
            _check_address(sender, "sender")
        recipients = self._recipients(envelope.recipients)
        if not recipients:
            raise MaildropError("no valid recipient")

        client = ClientInfo(helo=f"uid {uid}", esmtp=False, listener="sendmail")
        tx = self.intake.begin(sender, MailParams(), client, "sendmail")
        for rcpt in recipients:
            tx.add_recipient(rcpt)
        tx.start_body(trace=False)
        now = self.clock.now()
        header = (
            f"Received: from local (uid {uid})\r\n"
            f"\tby {self.hostname} (postillon) with local id {tx.queue_id};\r\n"
            f"\t{formatdate(now, localtime=False, usegmt=True)}\r\n"
        ).encode()
        try:
            tx.write(header + warning + self._missing_headers(first, envelope, sender or own, now))
            tx.write(first)
            while chunk := await asyncio.to_thread(drop.read_chunk):
                tx.write(chunk)
            drop.check_unchanged()
        except BaseException:
            tx.abort()
            raise
        return await tx.commit()

    def _recipients(self, given: tuple[str, ...]) -> list[NewRecipient]:
        out: list[NewRecipient] = []
        seen: set[str] = set()
        for raw in given:
            text = self.qualify(raw)
            try:
                address = parse_mailbox(text, smtputf8=True)
            except AddressError as exc:
                self.intake.maillog.event(
                    "rejected", "-", to=raw, reason=f"bad recipient address: {exc}"
                )
                continue
            targets = self.expand(address) if self.expand is not None else (str(address),)
            for target in targets:
                if target.lower() in seen:
                    continue
                seen.add(target.lower())
                out.append(NewRecipient(target, original=raw if target != raw else None))
        return out

    def _missing_headers(
        self, message: bytes, envelope: DropEnvelope, sender: str, now: float
    ) -> bytes:
        fields, _ = split_header(message)
        present = {field_name(f) for f in fields}
        added: list[str] = []
        if "from" not in present:
            added.append("From: " + formataddr((envelope.full_name, sender), "utf-8"))
        if "date" not in present:
            added.append("Date: " + formatdate(now, localtime=True))
        if "message-id" not in present:
            added.append("Message-ID: " + make_msgid(domain=self.hostname))
        return "".join(f"{line}\r\n" for line in added).encode("utf-8")


class _DropFile:
    """One maildrop file, opened and checked; read at most the size checked.

    The methods block (file I/O): pickup calls them in a thread.
    """

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self._fd = fd
        self._st = st
        self.uid = st.st_uid
        self._left = 0  # message octets not read yet

    @classmethod
    def open(cls, path: Path) -> _DropFile:
        """Open without following links. Only a plain file with one link counts:
        a (hard or symbolic) link could make the server read something the
        submitter may not."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                raise MaildropError("not a regular file with one link")
            if st.st_size > MAX_FILE:
                raise MaildropError(f"file too large ({st.st_size} octets)")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, st)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def read_envelope(self, max_message_size: int) -> tuple[DropEnvelope, bytes]:
        """The envelope and the first chunk of the message (up to READ_SIZE)."""
        total = self._st.st_size
        head = b""
        while b"\n\n" not in head:
            if len(head) >= min(total, MAX_ENVELOPE):
                decode_envelope(head)  # the more precise complaint (magic, a long line)
                raise MaildropError("envelope section not terminated")
            chunk = os.read(self._fd, min(READ_SIZE, min(total, MAX_ENVELOPE) - len(head)))
            if not chunk:
                raise MaildropError("file shrank while being read")
            head += chunk
        envelope, size, offset = decode_envelope(head)
        if offset + size != total:
            raise MaildropError(f"Size {size} does not match the message ({total - offset} octets)")
        if max_message_size and size > max_message_size:
            raise MaildropError(
                f"message too large ({size} octets; [limits] message_size is {max_message_size})"
            )
        first = head[offset:]  # never past the checked size: reads stopped at it
        self._left = size - len(first)
        if len(first) < READ_SIZE and self._left:
            first += self._read(min(READ_SIZE - len(first), self._left))
        return envelope, first

    def read_chunk(self) -> bytes:
        """The next chunk of the message; b"" once all of the checked size is read."""
        return self._read(min(READ_SIZE, self._left)) if self._left else b""

    def _read(self, count: int) -> bytes:
        data = os.read(self._fd, count)
        if not data:
            raise MaildropError("file shrank while being read")
        self._left -= len(data)
        return data

    def check_unchanged(self) -> None:
        """The owner may have written the file while it was read: refuse it then
        (what was read is what was checked, but not what the file now says)."""
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != (self._st.st_size, self._st.st_mtime_ns):
            raise MaildropError("file changed while being read")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _check_address(text: str, what: str) -> None:
    try:
        parse_mailbox(text, smtputf8=True)
    except AddressError as exc:
        raise MaildropError(f"bad {what} address {text!r}: {exc}") from None
