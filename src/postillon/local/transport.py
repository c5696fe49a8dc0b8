"""The Maildir transport: the runner's adapter around ``MaildirDelivery``."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from postillon.core.outcome import Outcome, PermFail
from postillon.core.reply import Reply
from postillon.delivery.transport import DeliveryJob
from postillon.local.maildir import MaildirDelivery
from postillon.routing.local import LocalRecipients


class MaildirTransport:
    def __init__(self, maildir: MaildirDelivery, local: LocalRecipients) -> None:
        self.maildir = maildir
        self.local = local

    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        # File writes and fsyncs block: one thread hop per message, not per chunk.
        return await asyncio.to_thread(self._deliver_sync, job)

    def _deliver_sync(self, job: DeliveryJob) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for record in job.records:
            if not self.local.mailbox_exists(record.recipient):
                outcomes.append(
                    PermFail(
                        Reply.of(550, "5.1.1", f"<{record.recipient}>: mailbox does not exist")
                    )
                )
                continue
            outcomes.append(
                self.maildir.deliver(
                    record.recipient,
                    job.body(),
                    return_path=job.message.sender,
                    original_recipient=record.original_recipient,
                    delivery_key=f"{int(job.message.received_at)}.{record.queue_id}R{record.record_id}",
                )
            )
        return outcomes
