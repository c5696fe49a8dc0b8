"""RFC 9422 LIMITS as a client: a delivery with more recipients than the
server's ``RCPTMAX`` (``DEFAULT_RCPT_MAX``, 100, when it names none) is sent as
several transactions of at most that many
(instead of collecting 452 4.5.3 for the rest and retrying them later), and a
connection that has carried ``MAILMAX`` transactions is replaced by a new one
to the same address before the next (instead of taking the server's refusal).

Each transaction re-reads the body from the store. The replies of all parts
come back as one ``TransactionResult`` in the job's recipient order, so the
transport records them as it would one transaction's. When the connection
breaks in a later part, the earlier parts' replies stay settled (they were
delivered: never send them twice) and the unsent recipients get a 451, so
they are retried.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from postillon.core.reply import Reply
from postillon.outbound.session_types import SessionError, TransactionResult
from postillon.protocol.client_events import Extensions

__all__ = ["DEFAULT_RCPT_MAX", "NOT_SENT", "at_mail_max", "batches", "send_within_limits"]

# Without RCPTMAX, at most this many recipients per transaction (more go in the next
# one, on the same connection). RFC 5321 4.5.3.1.8: a server must take at least 100
# recipients per message, and many take no more: the rest would get 452 4.5.3 and wait
# for a retry (one message to 300 recipients at one provider: 200 delayed).
DEFAULT_RCPT_MAX = 100

# For recipients whose part of a split delivery was never sent.
NOT_SENT = Reply.of(451, "4.5.3", "Not sent: the connection ended before this part of the delivery")


class LimitedSession(Protocol):
    """What is needed of ``SmtpClientSession`` here."""

    @property
    def extensions(self) -> Mapping[str, str]: ...
    @property
    def usable(self) -> bool: ...
    @property
    def messages_sent(self) -> int: ...
    async def quit(self) -> None: ...


S = TypeVar("S", bound=LimitedSession)


def batches(count: int, rcpt_max: int | None) -> list[range]:
    """Recipient index ranges of at most ``rcpt_max`` (one range without a limit)."""
    size = rcpt_max if rcpt_max else max(count, 1)
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


def _limits(session: LimitedSession) -> dict[str, int]:
    ext = session.extensions
    return (ext if isinstance(ext, Extensions) else Extensions(ext)).limits


def at_mail_max(session: LimitedSession) -> bool:
    """The session has carried as many transactions as the server's MAILMAX."""
    mail_max = _limits(session).get("MAILMAX")
    return mail_max is not None and session.messages_sent >= mail_max


async def send_within_limits(
    session: S,
    count: int,
    send: Callable[[S, range], Awaitable[TransactionResult]],
    reconnect: Callable[[], Awaitable[S]],
) -> tuple[TransactionResult, S]:
    """Send ``count`` recipients through ``send(session, indexes)`` in parts that
    fit the server's RCPTMAX and MAILMAX; the combined result and the session
    last used (the caller pools or closes it)."""
    replies: list[Reply] = []
    mail_reply: Reply | None = None
    start = 0
    while start < count:
        if start and not session.usable and not at_mail_max(session):
            replies.extend([NOT_SENT] * (count - start))  # the server ended it (421)
            break
        if at_mail_max(session):  # RFC 9422 MAILMAX: a new connection for the rest
            await session.quit()
            try:
                session = await reconnect()
            except SessionError as exc:
                raise _partial(exc, replies + [NOT_SENT] * (count - start), mail_reply) from exc
        rcpt_max = _limits(session).get("RCPTMAX") or DEFAULT_RCPT_MAX
        part = range(start, min(count, start + rcpt_max))
        try:
            result = await send(session, part)
        except SessionError as exc:
            done = list(exc.partial.per_recipient) if exc.partial else [NOT_SENT] * len(part)
            rest = [NOT_SENT] * (count - part.stop)
            raise _partial(exc, replies + done + rest, mail_reply) from exc
        replies.extend(result.per_recipient)
        mail_reply = result.mail_reply
        start = part.stop
    return TransactionResult(tuple(replies), mail_reply), session


def _partial(exc: SessionError, replies: Sequence[Reply], mail_reply: Reply | None) -> SessionError:
    """``exc`` with the replies of the whole delivery so far (see settled_before_failure)."""
    return SessionError(
        exc.detail,
        reply=exc.reply,
        permanent=exc.permanent,
        partial=TransactionResult(tuple(replies), mail_reply),
        status=exc.status,
        tls_result=exc.tls_result,
    )
