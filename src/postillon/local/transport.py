"""The Maildir transport: the runner's adapter around ``MaildirDelivery``.

One thread hop per message: its recipients' files are written, fsync'd and linked in a
worker thread, then each ``new/`` is fsync'd once, shared with the deliveries into the
same mailbox running in the other worker threads (``dirsync.py``).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import IO

from postillon.core.outcome import Outcome, PermFail
from postillon.core.reply import Reply
from postillon.delivery.transport import DeliveryJob
from postillon.local.maildir import MaildirDelivery, Staged
from postillon.routing.local import LocalRecipients

# Bodies up to this size are held in memory for the delivery; larger ones are
# spooled to a temporary file first, so a big message never sits in memory.
_IN_MEMORY = 1024 * 1024
_READ_SIZE = 256 * 1024


class MaildirTransport:
    def __init__(self, maildir: MaildirDelivery, local: LocalRecipients) -> None:
        self.maildir = maildir
        self.local = local

    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        # The body is read on the event loop (the store's read is async), then the
        # file writes and fsyncs, which block, run in one thread hop per message.
        if job.cached_body is not None or job.message.size <= _IN_MEMORY:
            chunks = [chunk async for chunk in job.body()]
            return await asyncio.to_thread(self._deliver_sync, job, lambda: iter(chunks))
        with tempfile.TemporaryFile() as spool:
            async for chunk in job.body():
                await asyncio.to_thread(spool.write, chunk)
            return await asyncio.to_thread(self._deliver_sync, job, lambda: _read_from(spool))

    def _deliver_sync(self, job: DeliveryJob, body: Callable[[], Iterator[bytes]]) -> list[Outcome]:
        return self.maildir.commit(self._stage(job, body))

    def _stage(self, job: DeliveryJob, body: Callable[[], Iterator[bytes]]) -> list[Staged]:
        """Each recipient's file written, fsync'd and linked (in a worker thread); durable
        once ``MaildirDelivery.commit`` has fsync'd the ``new/`` directories."""
        staged: list[Staged] = []
        for record in job.records:
            if not self.local.mailbox_exists(record.recipient):
                reply = Reply.of(550, "5.1.1", f"<{record.recipient}>: mailbox does not exist")
                staged.append(Staged(PermFail(reply)))
                continue
            staged.append(
                self.maildir.stage(
                    record.recipient,
                    body(),
                    return_path=job.message.sender,
                    original_recipient=record.original_recipient,
                    delivery_key=f"{int(job.message.received_at)}.{record.queue_id}R{record.record_id}",
                )
            )
        return staged


def _read_from(spool: IO[bytes]) -> Iterator[bytes]:
    """The spooled body from the start (called once per recipient, in the thread)."""
    spool.seek(0)
    while data := spool.read(_READ_SIZE):
        yield data
