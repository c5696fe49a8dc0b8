"""Queue a delivery status notification to a message's sender.

The runner (failures, delays, successes) and the operator's bounce (admin API
and ``postillon queue bounce``) send the same kind of notice the same way:
read what the notice returns of the original, build the RFC 3464 report, and
hand it to intake like any other message, from the null sender.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from postillon.dsn.bounce import DsnRecipient, build_dsn, read_for_dsn, returns_full_message
from postillon.queue.store import MessageInfo, NewRecipient, QueueStore


class NoticeIntake(Protocol):
    """What a notice needs of intake (``intake.Intake`` is one): the runner,
    which may not import intake, passes it through."""

    async def submit(
        self, sender: str, recipients: Sequence[NewRecipient], body: bytes, *, source: str
    ) -> str: ...


async def queue_notice(
    store: QueueStore,
    intake: NoticeIntake,
    hostname: str,
    message: MessageInfo,
    recipients: Sequence[DsnRecipient],
    now: float,
) -> str:
    """Queue one notice about ``recipients`` (all of one action) of ``message``
    to its sender and return the notice's queue id. The caller makes sure the
    sender is not the null sender (RFC 3461 6.2). Raises what intake raises."""
    full = returns_full_message(message.mail_params, message.size, recipients[0].action)
    original = await read_for_dsn(store.read_body(message.queue_id), full)
    report = build_dsn(
        hostname=hostname,
        queue_id=message.queue_id,
        sender=message.sender,
        mail_params=message.mail_params,
        received_at=message.received_at,
        recipients=recipients,
        original=original,
        original_size=message.size,
        now=now,
    )
    return await intake.submit("", [NewRecipient(message.sender)], report, source="bounce")
