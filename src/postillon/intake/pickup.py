"""Pickup: the server side of the maildrop (Postfix's ``pickup``).

Every ``interval`` seconds (or at once after ``wake()``) the task scans the
maildrop directory and hands each complete file (see ``intake.maildrop``) to
``Intake``, like any other message: source ``sendmail``, a ``Received: from
local (uid N)`` trace, and ``Date:``, ``Message-ID:`` and ``From:`` added when
missing. The file is removed only after the queue commit, so a crash in
between gives at most a duplicate, never a loss. A file that cannot be used
(not a maildrop file, no valid recipient, refused by intake with a 5xx) is
moved to ``maildrop/corrupt/`` and logged; a 4xx leaves it for the next scan.

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
    decode,
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
# A maildrop file larger than this is refused (the command already enforces
# the configured message size; this guards the server's memory).
MAX_FILE = 512 * 1024 * 1024


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
    ) -> None:
        self.directory = directory
        self.intake = intake
        self.hostname = hostname
        self.clock: Clock = clock or SystemClock()
        self.expand = expand
        self.trusted_uids = frozenset(trusted_uids or {0, os.geteuid()})
        self.interval = interval
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------
    def reconfigure(self, hostname: str) -> None:
        """A reload's hostname: for unqualified addresses and added headers."""
        self.hostname = hostname

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
            uid, data = await asyncio.to_thread(_read_owned, path)
        except FileNotFoundError:
            return False
        except (OSError, MaildropError) as exc:
            self._corrupt(path, f"unreadable: {exc}")
            return False
        try:
            envelope, message = decode(data)
        except MaildropError as exc:
            self._corrupt(path, str(exc))
            return False
        try:
            queue_id = await self._submit(uid, envelope, message)
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

    async def _submit(self, uid: int, envelope: DropEnvelope, message: bytes) -> str:
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
        tx.write(header + warning + self._missing_headers(message, envelope, sender or own, now))
        tx.write(message)
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


def _read_owned(path: Path) -> tuple[int, bytes]:
    """Open without following links; return (owner uid, content). Only a plain
    file with one link counts: a (hard or symbolic) link could make the server
    read something the submitter may not."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise MaildropError("not a regular file with one link")
        if st.st_size > MAX_FILE:
            raise MaildropError(f"file too large ({st.st_size} octets)")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        return st.st_uid, b"".join(chunks)
    finally:
        os.close(fd)


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
