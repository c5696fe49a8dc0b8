"""Transports that need no peer: ``discard`` and ``error:5.x.y text``.

Local transports: nothing leaves the machine (DESIGN's ``local/`` room).
"""

from __future__ import annotations

from collections.abc import Sequence

from postillon.core.outcome import Delivered, Outcome, PermFail, TempFail
from postillon.core.reply import Reply
from postillon.delivery.transport import DeliveryJob

DISCARDED = Reply.of(250, "2.0.0", "Discarded by configuration")


class DiscardTransport:
    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        return [Delivered(DISCARDED, "discard") for _ in job.records]


class ErrorTransport:
    async def deliver(self, job: DeliveryJob) -> Sequence[Outcome]:
        reply = job.route.error or Reply.of(550, "5.3.0", "Delivery refused by configuration")
        cls = PermFail if reply.is_permanent else TempFail
        return [cls(reply, "error route") for _ in job.records]
