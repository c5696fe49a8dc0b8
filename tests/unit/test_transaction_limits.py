"""RFC 9422 LIMITS: the client's parsing of the keyword and the splitting of a
delivery into transactions that fit RCPTMAX and MAILMAX (outbound/transaction_limits.py)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from postillon.core.reply import Reply
from postillon.outbound.session_types import SessionError, TransactionResult
from postillon.outbound.transaction_limits import (
    DEFAULT_RCPT_MAX,
    NOT_SENT,
    batches,
    send_within_limits,
)
from postillon.protocol.client_events import Extensions

OK = Reply.of(250, "2.0.0", "Ok")


def test_extensions_parse_limits_and_ignore_malformed_pairs() -> None:
    ext = Extensions.parse_ehlo(
        ("mx.test", "PIPELINING", "LIMITS RCPTMAX=100 MAILMAX=5 RCPTDOMAINMAX=x BAD=0 =3")
    )
    assert ext.limits == {"RCPTMAX": 100, "MAILMAX": 5}
    assert (ext.rcpt_max, ext.mail_max) == (100, 5)
    assert Extensions.parse_ehlo(("mx.test", "PIPELINING")).rcpt_max is None


def test_batches() -> None:
    assert batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert batches(5, None) == [range(0, 5)]
    assert batches(3, 10) == [range(0, 3)]


class Session:
    def __init__(self, limits: str, name: str) -> None:
        self.extensions: Mapping[str, str] = Extensions({"LIMITS": limits})
        self.usable = True
        self.messages_sent = 0
        self.name = name
        self.quit_called = False

    async def quit(self) -> None:
        self.quit_called = True
        self.usable = False


async def test_split_by_rcptmax_and_reconnect_at_mailmax() -> None:
    first = Session("RCPTMAX=2 MAILMAX=2", "first")
    fresh = Session("RCPTMAX=2 MAILMAX=2", "second")
    seen: list[tuple[str, list[int]]] = []

    async def send(session: Session, part: range) -> TransactionResult:
        seen.append((session.name, list(part)))
        session.messages_sent += 1
        return TransactionResult((OK,) * len(part), OK)

    async def reconnect() -> Session:
        return fresh

    result, last = await send_within_limits(first, 5, send, reconnect)
    assert seen == [("first", [0, 1]), ("first", [2, 3]), ("second", [4])]
    assert result.per_recipient == (OK,) * 5 and last is fresh and first.quit_called


async def test_a_broken_later_part_keeps_the_delivered_ones_settled() -> None:
    session = Session("RCPTMAX=2", "only")
    calls = 0

    async def send(session: Session, part: range) -> TransactionResult:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise SessionError("connection lost")
        return TransactionResult((OK,) * len(part), OK)

    async def reconnect() -> Session:
        raise AssertionError("no MAILMAX: no reconnect")

    with pytest.raises(SessionError) as caught:
        await send_within_limits(session, 5, send, reconnect)
    assert caught.value.partial is not None
    assert caught.value.partial.per_recipient == (OK, OK, NOT_SENT, NOT_SENT, NOT_SENT)


async def test_only_non_ascii_local_parts_are_refused_without_smtputf8() -> None:
    from postillon.core.envelope import RcptParams
    from postillon.outbound.smtputf8 import NON_ASCII_LOCAL_PART, send_sendable

    rcpts = [
        ("jö@d.test", RcptParams()),
        ("x@bücher.test", RcptParams()),
        ("y@d.test", RcptParams()),
    ]
    sent: list[list[str]] = []

    async def send(chosen: object) -> TransactionResult:
        addresses = [a for a, _ in chosen]  # type: ignore[attr-defined]
        sent.append(addresses)
        return TransactionResult((OK,) * len(addresses), OK)

    result = await send_sendable(Extensions({"8BITMIME": ""}), rcpts, send)
    assert sent == [["x@bücher.test", "y@d.test"]]  # A-labels are the core's business
    assert result.per_recipient == (NON_ASCII_LOCAL_PART, OK, OK)
    # With SMTPUTF8 offered, everyone goes.
    sent.clear()
    result = await send_sendable(Extensions({"SMTPUTF8": ""}), rcpts, send)
    assert sent == [[a for a, _ in rcpts]] and result.per_recipient == (OK,) * 3

    async def broken(chosen: object) -> TransactionResult:
        raise SessionError("lost", partial=TransactionResult((OK, NOT_SENT), OK))

    with pytest.raises(SessionError) as caught:
        await send_sendable(Extensions({}), rcpts, broken)
    assert caught.value.partial is not None
    assert caught.value.partial.per_recipient == (NON_ASCII_LOCAL_PART, OK, NOT_SENT)


async def test_without_rcptmax_at_most_100_recipients_per_transaction() -> None:
    """RFC 5321 4.5.3.1.8 promises 100 recipients per message, no more: 250 recipients
    to a server without LIMITS go as 100 + 100 + 50 on the same connection, instead of
    one transaction whose last 150 recipients may get 452 and wait for a retry."""
    session = Session("", "only")
    seen: list[int] = []

    async def send(session: Session, part: range) -> TransactionResult:
        seen.append(len(part))
        session.messages_sent += 1
        return TransactionResult((OK,) * len(part), OK)

    async def reconnect() -> Session:
        raise AssertionError("no MAILMAX: no reconnect")

    result, last = await send_within_limits(session, 250, send, reconnect)
    assert DEFAULT_RCPT_MAX == 100
    assert seen == [100, 100, 50] and len(result.per_recipient) == 250 and last is session
