"""The transport contract: what the runner hands a transport, and what it gets back.

Transports (``outbound/`` over SMTP and LMTP, ``local/`` for Maildir, discard
and error) depend on this module only, never on the runner, so a transport can
be built and tested without a queue runner and the runner can change without
touching any transport.

Contract, as a transaction:

1. The runner groups the leased records of one message by route
   (``group_by_route``): records with the same route travel together, one
   transport call and one body read for all of them.
2. It calls ``Transport.deliver(job)`` once per group. The transport reads the
   body with ``job.body()`` (an async iterator: the cached bytes of a message
   this process just committed, else the store's ``read_body``), as often as
   it needs.
3. The transport returns one ``Outcome`` per record of ``job.records``, in
   order (``Delivered``, ``TempFail``, ``PermFail``). Delivery problems are
   outcomes, never exceptions; an exception that escapes anyway, or a list of
   the wrong length, is recorded by the runner as a temporary failure of the
   whole group (``checked_outcomes``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from postillon.core.outcome import Outcome, TempFail
from postillon.core.reply import Reply
from postillon.queue.store import DeliveryRecord, MessageInfo, QueueStore
from postillon.routing.router import Route

WRONG_COUNT = Reply.of(451, "4.3.0", "Transport returned a wrong number of results")


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    message: MessageInfo
    records: tuple[DeliveryRecord, ...]
    route: Route
    store: QueueStore
    cached_body: bytes | None = None  # from the recent-message cache of this process

    async def body(self) -> AsyncIterator[bytes]:
        """The stored body in chunks (KeyError at the first chunk if the message is gone)."""
        if self.cached_body is not None:
            yield self.cached_body
            return
        async for chunk in self.store.read_body(self.message.queue_id):
            yield chunk


class Transport(Protocol):
    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        """Deliver ``job.records``; return one outcome per record, in order.

        Contract: never raises for delivery problems (they are outcomes); an
        exception that escapes anyway is recorded as a temporary failure.
        """
        ...


def group_by_route(
    records: Sequence[DeliveryRecord], route_of: Callable[[str], Route]
) -> list[tuple[Route, list[DeliveryRecord]]]:
    """The records grouped by route (``Route.key``), in order of first appearance."""
    groups: dict[str, tuple[Route, list[DeliveryRecord]]] = {}
    for record in records:
        route = route_of(record.recipient)
        groups.setdefault(route.key, (route, []))[1].append(record)
    return list(groups.values())


def checked_outcomes(outcomes: Sequence[Outcome], records: Sequence[object]) -> Sequence[Outcome]:
    """``outcomes`` if there is one per record, else a temporary failure for each."""
    if len(outcomes) != len(records):
        return [TempFail(WRONG_COUNT) for _ in records]
    return outcomes
