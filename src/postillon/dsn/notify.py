"""Queue a delivery status notification to a message's sender.

The runner (failures, delays, successes) and the operator's bounce (admin API
and ``postillon queue bounce``) send the same kind of notice the same way:
build the RFC 3464 report around what it returns of the original, and hand it
to intake like any other message, from the null sender.

The original streams from the store into the notice's intake transaction a
chunk at a time (RET=FULL may return up to ``FULL_RETURN_HARD_LIMIT`` bytes);
intake spools it to disk past its memory limit, as it does for any message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from postillon.core.envelope import MailParams
from postillon.dsn.bounce import (
    HEADER_LIMIT,
    DsnRecipient,
    dsn_frame,
    notice_params,
    returns_full_message,
)
from postillon.intake.headers import ClientInfo
from postillon.intake.intake import IntakeTransaction
from postillon.queue.store import MessageInfo, NewRecipient, QueueStore


class NoticeIntake(Protocol):
    """What a notice needs of intake (``intake.Intake`` is one): the runner,
    which may not import intake, passes it through."""

    def begin(
        self, sender: str, params: MailParams, client: ClientInfo, source: str = ...
    ) -> IntakeTransaction: ...


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
    frame = dsn_frame(
        hostname=hostname,
        queue_id=message.queue_id,
        sender=message.sender,
        mail_params=message.mail_params,
        received_at=message.received_at,
        recipients=recipients,
        original_size=message.size,
        now=now,
    )
    # REQUIRETLS kept (RFC 8689 §5), SMTPUTF8 and BODY=8BITMIME as the notice needs.
    params = notice_params(message.sender, message.mail_params, recipients)
    tx = intake.begin("", params, ClientInfo(), source="bounce")
    tx.add_recipient(NewRecipient(message.sender))
    try:
        tx.start_body()
        tx.write(frame.head)
        last = b""
        async for chunk in _returned(store, message.queue_id, full):
            tx.write(chunk)
            last = (last + chunk)[-2:]
        if last and last != b"\r\n":
            tx.write(b"\r\n")
        tx.write(frame.tail)
    except BaseException:
        tx.abort()
        raise
    return await tx.commit()


async def _returned(store: QueueStore, queue_id: str, full: bool) -> AsyncIterator[bytes]:
    """What the notice returns of the original: all of it, or its header section."""
    if full:
        async for chunk in store.read_body(queue_id):
            yield chunk
        return
    head = b""
    async for chunk in store.read_body(queue_id):
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            yield head[: end + 2]
            return
        if len(head) > HEADER_LIMIT:
            break
    yield head[:HEADER_LIMIT]
