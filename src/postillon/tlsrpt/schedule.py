"""The daily run: at ``[tls_reports] hour`` (UTC), report the day that just ended.

RFC 8460 §4.1 reports cover UTC days; the run at ``hour`` reports the previous
UTC day (the counters of a node that flushes every ``flush_interval`` seconds are
complete by then), then prunes counters older than ``keep_days``. The clock and
the sleep are injected, so tests move time by hand and never wait.

Every node of a cluster runs this; the store's claim (``reporter``) lets one of
them send each report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from postillon.core.clock import Clock
from postillon.core.tlsrpt import utc_day

__all__ = ["DailyReports", "next_run"]

log = logging.getLogger("postillon.tlsrpt")

DAY = 86400


def next_run(now: float, hour: int) -> float:
    """The first ``hour``:00:00 UTC strictly after ``now``."""
    midnight = now - now % DAY
    at = midnight + hour * 3600
    return at if at > now else at + DAY


class DailyReports:
    """``run(day)`` once a day at ``hour`` for the UTC day before; ``prune(day)`` after
    it with the first day to keep."""

    def __init__(
        self,
        clock: Clock,
        hour: int,
        run: Callable[[str], Awaitable[object]],
        *,
        prune: Callable[[str], Awaitable[object]] | None = None,
        keep_days: int = 7,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        name: str = "TLS reports",
    ) -> None:
        self.name = name  # in the log lines of a failed run ("DMARC reports", ...)
        self._clock = clock
        self.hour = hour
        self._run = run
        self._prune = prune
        self.keep_days = keep_days
        self._sleep = sleep
        self._task: asyncio.Task[None] | None = None

    async def run_forever(self) -> None:
        while True:
            now = self._clock.now()
            await self._sleep(next_run(now, self.hour) - now)
            # The day before the run time: the one that ended at midnight.
            at = self._clock.now()
            await self.run_once(utc_day(at - DAY), utc_day(at - self.keep_days * DAY))

    async def run_once(self, day: str, keep_from: str) -> None:
        try:
            await self._run(day)
        except Exception:  # one bad day must not stop the next ones
            log.exception("%s for %s failed", self.name, day)
        if self._prune is not None:
            try:
                await self._prune(keep_from)
            except Exception:
                log.exception("pruning %s counters before %s failed", self.name, keep_from)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
