"""The explain trace's recorder: steps buffered in memory, written to the store.

``Pipeline.note`` calls :meth:`TraceRecorder.record` for every decision, on the
event loop and on the mail path, so it only appends to a list. A background task
hands the batch to ``store.traces.add`` every ``flush_interval`` seconds (and once
more at stop), and drops steps older than ``keep_seconds`` once an hour. A failed
write keeps its steps for the next try, up to ``MAX_PENDING`` (past it, the oldest
are dropped: the trace is a diagnostic and must never cost memory without bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from postillon.core.clock import Clock
from postillon.core.trace import TraceStep
from postillon.queue.store import TraceStore

log = logging.getLogger("postillon.checks.trace")

MAX_PENDING = 200_000
PRUNE_EVERY = 3600.0


class TraceRecorder:
    def __init__(
        self,
        store: TraceStore,
        clock: Clock,
        *,
        flush_interval: float = 2.0,
        keep_seconds: float = 72 * 3600.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self.flush_interval = flush_interval
        self.keep_seconds = keep_seconds
        self._pending: list[TraceStep] = []
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        self._last_prune = 0.0

    def record(self, step: TraceStep) -> None:
        self._pending.append(step)
        if len(self._pending) > MAX_PENDING:
            del self._pending[: len(self._pending) - MAX_PENDING]

    async def flush(self) -> None:
        async with self._flushing:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                await self._store.add(batch)
            except Exception as exc:
                log.warning("decision trace: %d steps not written yet: %s", len(batch), exc)
                self._pending[:0] = batch[-MAX_PENDING:]

    async def prune(self) -> None:
        try:
            await self._store.prune(self._clock.now() - self.keep_seconds)
        except Exception as exc:
            log.warning("decision trace: prune failed: %s", exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            await self.flush()
            now = self._clock.now()
            if now - self._last_prune >= PRUNE_EVERY:
                self._last_prune = now
                await self.prune()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="decision-trace")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
