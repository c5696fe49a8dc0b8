"""The DMARC observer the authentication check calls: counts in memory, flushes to the store.

:meth:`DmarcReportRecorder.evaluated` runs on the SMTP path (once per message whose
DMARC record asks for reports), so it only adds 1 to a counter in a dict: no I/O, no
await. :meth:`flush` hands the counters to ``store.policy_state.dmarc_reports.add`` (an
UPSERT that adds, so every node of a cluster contributes) every ``flush_interval``
seconds and once more at stop; a failed flush keeps its counts for the next one, and a
crash loses at most one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace

from postillon.core.clock import Clock
from postillon.core.dmarc import DmarcResultCount
from postillon.core.tlsrpt import utc_day
from postillon.queue.store import DmarcReportStore

__all__ = ["DmarcReportRecorder"]

log = logging.getLogger("postillon.dmarcrpt")

# Counters kept between flushes at most; past it new ones wait (a flood of distinct
# source IPs must not eat memory).
MAX_PENDING = 100_000


class DmarcReportRecorder:
    def __init__(
        self, store: DmarcReportStore, clock: Clock, *, flush_interval: float = 30.0
    ) -> None:
        self._store = store
        self._clock = clock
        self.flush_interval = flush_interval
        self._pending: dict[DmarcResultCount, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    def evaluated(self, row: DmarcResultCount) -> None:
        """``checks.authentication.DmarcObserver``: one evaluation (its day is stamped here)."""
        row = replace(row, day=utc_day(self._clock.now()), count=1)
        if row in self._pending:
            self._pending[row] += 1
        elif len(self._pending) < MAX_PENDING:
            self._pending[row] = 1

    @property
    def pending(self) -> int:
        return sum(self._pending.values())

    async def flush(self) -> None:
        async with self._flushing:
            batch, self._pending = self._pending, {}
            if not batch:
                return
            try:
                await self._store.add([row.with_count(n) for row, n in batch.items()])
            except Exception as exc:  # the store is down: keep the counts for the next try
                log.warning("DMARC report counters not saved (kept for the next try): %s", exc)
                for row, n in batch.items():
                    self._pending[row] = self._pending.get(row, 0) + n

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
