"""SMTPUTF8 without needless bounces (RFC 6531 §3.2), per recipient.

A message needs SMTPUTF8 at a next hop only for an address that cannot be
written in ASCII: one whose local part is not ASCII. A U-label domain goes as
its A-label (IDNA 2008, ``core.address.ascii_address``; the protocol core
writes it), and the SMTPUTF8 flag of an all-ASCII envelope is said only where
offered. So to a server without SMTPUTF8, only the recipients with a non-ASCII
local part are refused (550 5.6.7, a bounce); the others of the same delivery
go. A non-ASCII local part in the sender refuses the whole transaction (the
protocol core's own 5.6.7).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from postillon.core.address import ascii_address
from postillon.core.envelope import RcptParams
from postillon.core.reply import Reply
from postillon.outbound.session_types import SessionError, TransactionResult

__all__ = ["NON_ASCII_LOCAL_PART", "send_sendable"]

NON_ASCII_LOCAL_PART = Reply.of(
    550, "5.6.7", "Non-ASCII local part, SMTPUTF8 not supported by remote server"
)

Recipients = Sequence[tuple[str, RcptParams]]


def _refused(extensions: Mapping[str, str], recipients: Recipients) -> set[int]:
    if "SMTPUTF8" in extensions:
        return set()
    return {i for i, (address, _) in enumerate(recipients) if ascii_address(address) is None}


async def send_sendable(
    extensions: Mapping[str, str],
    recipients: Recipients,
    send: Callable[[Recipients], Awaitable[TransactionResult]],
) -> TransactionResult:
    """``send`` the recipients this server can take; the others get 5.6.7. The
    replies come back for all of ``recipients``, in order (also in the
    ``partial`` of a SessionError)."""
    refused = _refused(extensions, recipients)
    if not refused:
        return await send(recipients)
    kept = [r for i, r in enumerate(recipients) if i not in refused]
    if not kept:
        return TransactionResult((NON_ASCII_LOCAL_PART,) * len(recipients), None)
    try:
        result = await send(kept)
    except SessionError as exc:
        if exc.partial is not None:
            exc.partial = TransactionResult(
                _merge(len(recipients), refused, exc.partial.per_recipient),
                exc.partial.mail_reply,
            )
        raise
    return TransactionResult(
        _merge(len(recipients), refused, result.per_recipient), result.mail_reply
    )


def _merge(count: int, refused: set[int], replies: Sequence[Reply]) -> tuple[Reply, ...]:
    sent = iter(replies)
    return tuple(NON_ASCII_LOCAL_PART if i in refused else next(sent) for i in range(count))
