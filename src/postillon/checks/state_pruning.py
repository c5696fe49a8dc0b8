"""Forget greylisting and rate-limit state nobody needs any more, now and then.

Greylisting rows unseen for ``[greylist] expiry`` and rate counters of ended windows no
longer change any answer (``greylist_state.decide`` and ``rate_counters`` ignore them),
so dropping them only bounds the tables. Every node of a cluster may run this: a delete
of rows already deleted is harmless. A failure is a log line and the next run tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from postillon.config.model import Config
from postillon.core.clock import Clock
from postillon.queue.store import PolicyStateStore

__all__ = ["StatePruner"]

log = logging.getLogger("postillon.checks")

INTERVAL = 3600.0  # seconds between runs


class StatePruner:
    def __init__(
        self,
        store: PolicyStateStore,
        clock: Clock,
        config: Callable[[], Config],
        *,
        interval: float = INTERVAL,
    ) -> None:
        self._store = store
        self._clock = clock
        self._config = config  # the config in effect (a reload may change the expiry)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> tuple[int, int]:
        """(greylist rows, rate counters) dropped."""
        now = self._clock.now()
        grey = rates = 0
        try:
            grey = await self._store.greylist.prune(now - self._config().greylist.expiry)
            rates = await self._store.rates.prune(now)
        except Exception as exc:
            log.warning("pruning greylisting and rate-limit state failed: %s", exc)
        return grey, rates

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.run_once()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
