"""Postponing a suspended destination's due work in bulk, so fresh mail keeps its pace.

Design note
-----------
A destination that refuses connections is suspended by the first delivery that
reached none of its addresses (outbound/shaping.py, Postfix's dead destination);
every later delivery to it comes back "not attempted: suspended" without a
connection. That is cheap per record, but a retry wave of 100,000 records still
meant 100,000 claims, routes and outcome writes, claimed before fresh mail
(retries have the higher priority): fresh relay fell to about half its rate.

So the first record that comes back suspended makes the runner postpone every other
due record of its recipient domain past the suspension, in the store, a few thousand
per write (``QueueStore.postpone_domain``, queue/postpone.py), while the runner holds
its next claim (which would only meet the suspension record by record, ahead of fresh
mail: retries have the higher priority).
Attempts are unchanged (nothing was attempted); the records that were tried keep
their counted attempt and its reply; one log line says how many were postponed, to
when, and why. Records of messages past their lifetime stay due and are bounced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Final

from postillon.core.outcome import Outcome, TempFail
from postillon.queue.store import DeliveryRecord, QueueStore

log = logging.getLogger("postillon.runner")

CHUNK: Final = 5000  # records per write (~50 ms on SQLite): commits of fresh mail interleave
# The runner claims nothing new while a postponement runs, for up to this long: the
# claims would only meet the same suspension, record by record, ahead of fresh mail.
SETTLE: Final = 5.0
SPREAD: Final = 0.2  # the postponed come back over this share of the suspension


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


class Postponer:
    def __init__(self, store: QueueStore) -> None:
        self.store = store
        self._until: dict[str, float] = {}  # domain -> end of the postponement made
        self._tasks: set[asyncio.Task[int]] = set()

    def note(
        self, results: Sequence[tuple[DeliveryRecord, Outcome]], now: float, lifetime: float
    ) -> None:
        """Start postponing the domains whose records came back suspended (once per
        suspension)."""
        for domain, until in list(self._until.items()):
            if until <= now:  # bounded by the domains suspended right now
                del self._until[domain]
        for record, outcome in results:
            if not (isinstance(outcome, TempFail) and outcome.suspended):
                continue
            domain = _domain(record.recipient)
            until = now + outcome.retry_after
            if not domain or outcome.retry_after <= 0 or self._until.get(domain, 0) >= until - 1:
                continue
            self._until[domain] = until
            task = asyncio.create_task(self.postpone(domain, outcome, now, now - lifetime))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    async def postpone(
        self, domain: str, outcome: TempFail, now: float, expire_before: float
    ) -> int:
        """Postpone every due record of ``domain`` until the suspension ends; how many."""
        until = now + outcome.retry_after
        total = 0
        while True:
            moved = await self.store.postpone_domain(
                domain,
                now,
                until,
                spread=SPREAD * outcome.retry_after,
                expire_before=expire_before,
                reply=outcome.reply,
                limit=CHUNK,
            )
            total += moved
            if moved < CHUNK:
                break
        if total:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(until))
            log.info(
                "postponed %d due recipient(s) of %s until %s UTC (not attempted): %s",
                total,
                domain,
                when,
                outcome.reply.text,
            )
        return total

    async def settled(self, timeout: float = SETTLE) -> None:
        """Wait (up to ``timeout``) for the postponements running now."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def _done(self, task: asyncio.Task[int]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Harmless: those records are claimed and deferred one by one instead.
            log.warning("postponing a suspended destination's mail failed: %s", task.exception())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
